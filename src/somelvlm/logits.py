"""Logits processing, the one copy: what transformers 4.33 (which LAVIS ran) did to the next-token
scores, in its order.

1. repetition penalty over the generated ids *and* the dummy start id (`<s>` = 1) that 4.33 put in
   front of the outputs (never the prompt): `s * p` where `s < 0`, else `s / p`;
2. min new tokens: eos is banned until `min_new_tokens` tokens exist;
3. sampling only: temperature, top-k, top-p (nucleus), keeping at least `min_tokens_to_keep`
   tokens (4.33: 2 for beam sampling, else 1).

`process_scores` serves the lean decoder (`decoding.py`); `LavisLogitsProcessor` wraps it as a
transformers `LogitsProcessor` for `transformers`' own `generate` (the fallback), which then must
not add processors of its own (`generation.transformers_kwargs` switches them off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from .options import GenerationOptions

DUMMY_START_ID = 1  # the Vicuna generation_config's bos, which transformers 4.33 put in front of outputs


@dataclass
class SamplingSettings:
    """Per-step decoding settings in new-token units (see `GenerationOptions` for LAVIS's units)."""

    max_new_tokens: int
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    eos_id: int = 2
    pad_id: int = 0
    dummy_id: int | None = DUMMY_START_ID  # LAVIS: the repetition penalty also covers this id (transformers 4.33)
    min_tokens_to_keep: int = 1

    @classmethod
    def from_options(cls, options: GenerationOptions, eos_id: int, pad_id: int) -> "SamplingSettings":
        """`options` in per-step form. Sampling at temperature 0 is greedy (`options.greedy`)."""
        max_new, min_new = options.new_token_limits()
        return cls(max_new_tokens=max_new, min_new_tokens=min_new, repetition_penalty=options.repetition_penalty,
                   do_sample=not options.greedy, temperature=options.temperature, top_k=options.top_k,
                   top_p=options.top_p, eos_id=eos_id, pad_id=pad_id,
                   min_tokens_to_keep=2 if options.num_beams > 1 else 1)


def repetition_penalty(scores: torch.Tensor, generated: torch.Tensor, penalty: float,
                       dummy_id: int | None = DUMMY_START_ID) -> torch.Tensor:
    """transformers 4.33's penalty on `scores [B, V]` for the ids in `generated [B, T]` (plus `dummy_id`)."""
    ids = generated
    if dummy_id is not None:
        ids = torch.cat([generated.new_full((generated.shape[0], 1), dummy_id), generated], dim=1)
    picked = scores.gather(1, ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return scores.scatter(1, ids, picked)


def process_scores(logits: torch.Tensor, generated: torch.Tensor, step: int, s: SamplingSettings) -> torch.Tensor:
    """`generate`'s logits processors and warpers, in its order: repetition penalty, min new tokens,
    then (sampling) temperature, top-k, top-p. `step` = tokens generated so far."""
    scores = logits
    if s.repetition_penalty != 1.0:
        scores = repetition_penalty(scores, generated, s.repetition_penalty, s.dummy_id)
    if step < s.min_new_tokens:
        scores = scores.clone()
        scores[:, s.eos_id] = -float("inf")
    if not s.do_sample:
        return scores
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if s.top_k and s.top_k > 0:
        k = min(max(s.top_k, s.min_tokens_to_keep), scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if s.top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - s.top_p)
        remove[..., -s.min_tokens_to_keep:] = False  # keep the most likely token(s)
        scores = scores.masked_fill(remove.scatter(1, sorted_idx, remove), -float("inf"))
    return scores


class LavisLogitsProcessor(LogitsProcessor):
    """`process_scores` for transformers' `generate`, which passes the generated ids only (no dummy
    id: transformers 5 starts `input_ids` empty when given `inputs_embeds`)."""

    def __init__(self, settings: SamplingSettings) -> None:
        self.settings = settings

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return process_scores(scores, input_ids, input_ids.shape[1], self.settings)
