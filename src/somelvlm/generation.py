"""Generation exactly as LAVIS `Blip2VicunaInstruct.generate`, plus encode-once-ask-many, streaming
and candidate ranking (`predict_class`).

The LLM sees `[Q query embeddings][left pads][</s> prompt]` with position ids from the attention
mask (pads skipped). Decoding runs on the lean decoder (`decoding.py`) with transformers 4.33's
semantics, which LAVIS ran: `max_length` and `min_length` count a dummy start token, so by default
at most `max_length - 1 = 255` new tokens are produced and `min_length=1` is a no-op; the repetition
penalty covers that dummy id and the generated ids; beams are scored by 4.33's rules. Output ids
equal to 0 become 2, special ids are skipped, and the text is stripped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .decoding import LlamaDecoder, SamplingSettings, supports
from .processing import IGNORE_INDEX, pad_batch

DUMMY_START_ID = 1  # the Vicuna generation_config's bos, which transformers 4.33 put in front of outputs


@dataclass
class ImageFeatures:
    """Image embeddings after `ln_vision`: compute once, ask many questions.

    `embeds [U, tokens, width]` holds each distinct image once; `index [N]` (None: `arange(U)`) says
    which image each prompt row uses, so selecting rows never copies embeddings and the Q-Former
    computes its cross-attention keys/values once per image."""

    embeds: torch.Tensor
    index: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0] if self.index is None else self.index.shape[0]

    def rows(self) -> torch.Tensor:
        return torch.arange(self.embeds.shape[0], device=self.embeds.device) if self.index is None else self.index

    def select(self, indices: Sequence[int]) -> "ImageFeatures":
        """Rows for a batch of prompts (an index may repeat: one image, many prompts)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long, device=self.embeds.device)
        return ImageFeatures(self.embeds, self.rows().index_select(0, idx))

    @staticmethod
    def concat(parts: Sequence["ImageFeatures"]) -> "ImageFeatures":
        offsets, rows = 0, []
        for p in parts:
            rows.append(p.rows() + offsets)
            offsets += p.embeds.shape[0]
        return ImageFeatures(torch.cat([p.embeds for p in parts]), torch.cat(rows))


def _is_single_image(x: Any) -> bool:
    import numpy as np
    from PIL import Image

    return isinstance(x, (str, os.PathLike, bytes, bytearray, Image.Image)) or (
        isinstance(x, np.ndarray) and x.ndim in (2, 3) and x.dtype != object)


@torch.inference_mode()
def encode_images(model: Any, images: Any, batch_size: int = 16) -> ImageFeatures:
    """Run the vision tower (+ `ln_vision`) over images: paths, PIL, bytes, arrays or `[B,3,S,S]`."""
    if isinstance(images, ImageFeatures):
        return images
    proc = model.require_processor()
    if isinstance(images, torch.Tensor):
        pixels = proc.images(images)
        chunks = [pixels[i:i + batch_size] for i in range(0, len(pixels), batch_size)]
    else:
        items = [images] if _is_single_image(images) else list(images)
        if not items:
            raise ValueError("no images given")
        chunks = [proc.images(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    return ImageFeatures(torch.cat([model.encode_image(c) for c in chunks]))


def features_for(model: Any, images: Any, n: int) -> ImageFeatures:
    """Image features for `n` prompts: one image (or feature row) is shared by all prompts; a list of
    `n` images is encoded once per distinct path (or object)."""
    if images is None:
        raise ValueError("images are required")
    if not isinstance(images, (ImageFeatures, torch.Tensor)) and not _is_single_image(images):
        items = list(images)
        if len(items) not in (1, n):
            raise ValueError(f"{len(items)} images for {n} prompts: give one image per prompt, or one for all")
        keys = [os.fspath(x) if isinstance(x, (str, os.PathLike)) else id(x) for x in items]
        slot: dict[Any, int] = {}
        unique = []
        for k, x in zip(keys, items):
            if k not in slot:
                slot[k] = len(unique)
                unique.append(x)
        feats = encode_images(model, unique)
        return feats.select([slot[k] for k in keys] if len(items) == n else [0] * n)
    feats = encode_images(model, images)
    if len(feats) == n:
        return feats
    if len(feats) == 1:
        return feats.select([0] * n)
    raise ValueError(f"{len(feats)} images for {n} prompts: give one image per prompt, or one for all")


class LavisRepetitionPenalty:
    """transformers 4.33's repetition penalty as LAVIS ran it: applied to every id in the decoder's
    `input_ids`, which held a dummy start id (`<s>` = 1) before the generated ids (never the prompt):
    `s * p` where `s < 0`, else `s / p`. (transformers 5 has no dummy id, so it would skip id 1.)"""

    def __init__(self, penalty: float, dummy_id: int = DUMMY_START_ID) -> None:
        self.penalty = penalty
        self.dummy_id = dummy_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        dummy = input_ids.new_full((input_ids.shape[0], 1), self.dummy_id)
        ids = torch.cat([dummy, input_ids], dim=1)
        picked = scores.gather(1, ids)
        picked = torch.where(picked < 0, picked * self.penalty, picked / self.penalty)
        return scores.scatter(1, ids, picked)


def new_token_limits(max_length: int, min_length: int, max_new_tokens: int | None,
                     min_new_tokens: int | None) -> tuple[int, int]:
    """LAVIS's `max_length`/`min_length` count the dummy start token; explicit `*_new_tokens` win."""
    if max_new_tokens is None:
        max_new_tokens = max_length - 1
    if min_new_tokens is None:
        min_new_tokens = max(min_length - 1, 0)
    if max_new_tokens < 1:
        raise ValueError(f"nothing to generate: max_new_tokens={max_new_tokens}")
    return max_new_tokens, min_new_tokens


def _generation_kwargs(model: Any, num_beams: int, max_length: int, min_length: int,
                       max_new_tokens: int | None, min_new_tokens: int | None, repetition_penalty: float,
                       length_penalty: float, do_sample: bool, top_p: float, temperature: float,
                       num_return_sequences: int, top_k: int = 50, **extra: Any) -> dict[str, Any]:
    from transformers import GenerationConfig, LogitsProcessorList

    llm = model.config.llm
    max_new_tokens, min_new_tokens = new_token_limits(max_length, min_length, max_new_tokens, min_new_tokens)
    cfg = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
               length_penalty=length_penalty, do_sample=do_sample, num_return_sequences=num_return_sequences,
               eos_token_id=llm.eos_id, pad_token_id=llm.pad_id, bos_token_id=DUMMY_START_ID, use_cache=True)
    if do_sample:
        cfg.update(top_p=top_p, temperature=temperature, top_k=top_k)
    direct = {k: extra.pop(k) for k in _GENERATE_ARGS if k in extra}
    cfg.update(extra)
    processors = LogitsProcessorList(direct.pop("logits_processor", None) or [])
    if repetition_penalty != 1.0:
        processors.insert(0, LavisRepetitionPenalty(repetition_penalty))
    return {"generation_config": GenerationConfig(**cfg), "logits_processor": processors, **direct}


_GENERATE_ARGS = ("streamer", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn")


@torch.inference_mode()
def llm_generate_inputs(model: Any, feats: ImageFeatures, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`inputs_embeds [B, Q+L, D]` and `attention_mask [B, Q+L]` in LAVIS's generation layout."""
    proc = model.require_processor()
    q_ids, q_mask = proc.qformer_text(prompts)
    ids, mask = proc.prompts(prompts, side="left")
    queries = model.query_embeds(feats.embeds, q_ids, q_mask, image_index=feats.index)
    inputs, full_mask, _ = model.llm_inputs(queries, ids, mask)
    return inputs, full_mask


def _as_list(prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts is None:
        raise ValueError("prompts are required")
    prompts = list(prompts)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be strings")
    return prompts


@torch.inference_mode()
def generate(
    model: Any,
    images: Any = None,
    prompts: str | Sequence[str] | None = None,
    num_beams: int = 5,
    max_length: int = 256,
    min_length: int = 1,
    max_new_tokens: int | None = None,
    min_new_tokens: int | None = None,
    repetition_penalty: float = 1.5,
    length_penalty: float = 1.0,
    do_sample: bool = False,
    top_p: float = 0.9,
    top_k: int = 50,
    temperature: float = 1.0,
    num_return_sequences: int = 1,
    batch_size: int | None = None,
    seed: int | None = None,
    fast: bool = True,
    **extra: Any,
) -> list[str]:
    """Answers for `prompts` (one per prompt, times `num_return_sequences`), LAVIS defaults.

    `images`: one image for all prompts, one per prompt, a `[B,3,S,S]` tensor, or `ImageFeatures`
    from `encode_images`. `max_new_tokens` overrides LAVIS's `max_length` (which counts a dummy
    start token: 255 new tokens by default). `batch_size` splits long prompt lists. Greedy,
    sampling and beam search run on somelvlm's lean decoder with transformers 4.33's semantics,
    which LAVIS's outputs depend on (`fast=False`: transformers 5's own `generate`, whose beam
    search scores truncated beams and stops differently); beam *sampling* (`do_sample` with
    `num_beams > 1`) always uses transformers. `top_k=50` is 4.33's default, which LAVIS sampling used.
    """
    prompts = _as_list(prompts)
    feats = features_for(model, images, len(prompts))
    if seed is not None:
        torch.manual_seed(seed)
    proc = model.require_processor()
    lean = fast and not extra and supports(model.llm) and (num_beams == 1 or not do_sample)
    if lean and (num_beams > 1 or num_return_sequences == 1):
        settings = sampling_settings(model, max_length, min_length, max_new_tokens, min_new_tokens,
                                     repetition_penalty, do_sample, top_p, top_k, temperature)
        ids = fast_generate_ids(model, feats, prompts, batch_size, settings, num_beams, length_penalty,
                                num_return_sequences)
    else:
        gen = _generation_kwargs(model, num_beams, max_length, min_length, max_new_tokens, min_new_tokens,
                                 repetition_penalty, length_penalty, do_sample, top_p, temperature,
                                 num_return_sequences, top_k=top_k, **extra)
        ids = generate_ids(model, feats, prompts, batch_size, gen)
    return [proc.decode(row) for row in ids]


def sampling_settings(model: Any, max_length: int = 256, min_length: int = 1, max_new_tokens: int | None = None,
                      min_new_tokens: int | None = None, repetition_penalty: float = 1.5, do_sample: bool = False,
                      top_p: float = 0.9, top_k: int = 50, temperature: float = 1.0) -> SamplingSettings:
    max_new, min_new = new_token_limits(max_length, min_length, max_new_tokens, min_new_tokens)
    llm = model.config.llm
    return SamplingSettings(max_new_tokens=max_new, min_new_tokens=min_new, repetition_penalty=repetition_penalty,
                            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                            eos_id=llm.eos_id, pad_id=llm.pad_id, dummy_id=DUMMY_START_ID)


def fast_generate_ids(model: Any, feats: ImageFeatures, prompts: list[str], batch_size: int | None,
                      settings: SamplingSettings, num_beams: int = 1, length_penalty: float = 1.0,
                      num_return_sequences: int = 1) -> list[list[int]]:
    """New token ids per answer from the lean decoder (greedy, sampling, or 4.33-rule beam search)."""
    decoder = LlamaDecoder(model.llm)
    step = batch_size or len(prompts)
    out: list[list[int]] = []
    for i in range(0, len(prompts), step):
        part = prompts[i:i + step]
        inputs, mask = llm_generate_inputs(model, feats.select(range(i, i + len(part))), part)
        if num_beams > 1:
            out.extend(decoder.beam_search(inputs, mask, settings, num_beams, length_penalty, num_return_sequences))
        else:
            tokens = torch.stack(list(decoder.decode(inputs, mask, settings)), dim=1)  # [B, new]
            out.extend(row.tolist() for row in tokens)
    return out


def generate_ids(model: Any, feats: ImageFeatures, prompts: list[str], batch_size: int | None,
                 gen: dict[str, Any]) -> list[list[int]]:
    """New token ids per answer (before LAVIS's decoding rules), `batch_size` prompts per call."""
    step = batch_size or len(prompts)
    out: list[list[int]] = []
    for i in range(0, len(prompts), step):
        part = prompts[i:i + step]
        inputs, mask = llm_generate_inputs(model, feats.select(range(i, i + len(part))), part)
        seqs = model.llm.generate(inputs_embeds=inputs, attention_mask=mask, **gen)
        out.extend(row.tolist() for row in seqs)
    return out


def stream_text(decode, id_chunks: Iterator[list[int]]) -> Iterator[str]:
    """Turn growing id lists into text deltas whose concatenation is `decode(all ids).strip()`.

    Trailing whitespace and incomplete UTF-8 (byte-fallback pieces) are held back until more text
    arrives, so no delta is ever taken back."""
    ids: list[int] = []
    emitted = ""
    for chunk in id_chunks:
        ids.extend(chunk)
        text = decode(ids).lstrip()
        safe = text.rstrip()
        cut = safe.find("\ufffd")
        if cut >= 0:
            safe = safe[:cut]
        if len(safe) > len(emitted) and safe.startswith(emitted):
            yield safe[len(emitted):]
            emitted = safe
    final = decode(ids).strip()
    if final.startswith(emitted):
        if len(final) > len(emitted):
            yield final[len(emitted):]
    else:  # cannot happen for SentencePiece; keep the promise that the pieces join to the answer
        raise RuntimeError("streamed text diverged from the final decoding")


def generate_stream(model: Any, image: Any, prompt: str, num_beams: int = 1, **kwargs: Any) -> Iterator[str]:
    """Yield text pieces as the model produces them; `"".join(...)` equals `generate(...)[0]`
    with the same settings. Beam search cannot stream (its best beam is only known at the end)."""
    if num_beams != 1:
        raise ValueError("streaming works with num_beams=1 (greedy or sampling)")
    unknown = set(kwargs) - {"max_length", "min_length", "max_new_tokens", "min_new_tokens", "repetition_penalty",
                             "do_sample", "top_p", "top_k", "temperature", "seed", "length_penalty"}
    if unknown:
        raise TypeError(f"generate_stream got unsupported arguments {sorted(unknown)}")
    kwargs.pop("length_penalty", None)  # no effect without beams
    seed = kwargs.pop("seed", None)
    proc = model.require_processor()
    feats = features_for(model, image, 1)
    if seed is not None:
        torch.manual_seed(seed)
    settings = sampling_settings(model, **kwargs)
    with torch.inference_mode():
        inputs, mask = llm_generate_inputs(model, feats, [prompt])
        steps = LlamaDecoder(model.llm).decode(inputs, mask, settings)
        yield from stream_text(proc.llm_tokenizer.decode, ([int(t[0])] for t in steps))


@torch.inference_mode()
def rank(model: Any, image: Any, prompt: str, candidates: Sequence[str], normalize: bool = False,
         batch_size: int = 32) -> list[tuple[str, float]]:
    """Score each candidate answer by its log-likelihood after the prompt (LAVIS `predict_class`)
    and return `(candidate, score)` sorted best first.

    LAVIS ranks by the LM loss averaged over the padded length of a candidate batch, i.e. by the
    *sum* of the candidate tokens' log-probabilities (`normalize=False`, the default); with
    `normalize=True` the score is the mean per token. Candidates are scored without a closing `</s>`.
    """
    candidates = list(candidates)
    if not candidates:
        raise ValueError("no candidates to rank")
    proc = model.require_processor()
    tok = proc.llm_tokenizer
    feats = features_for(model, image, 1)
    prompt_ids = tok.encode(prompt)
    q_ids, q_mask = proc.qformer_text([prompt])
    queries = model.query_embeds(feats.embeds, q_ids, q_mask, image_index=feats.index)  # [1, Q, D]: shared
    scores: list[float] = []
    for s in range(0, len(candidates), batch_size):
        part = candidates[s:s + batch_size]
        cand_ids = [tok.encode(c, bos=False) for c in part]
        seqs = [prompt_ids + c for c in cand_ids]
        labels = [[IGNORE_INDEX] * len(prompt_ids) + c for c in cand_ids]
        ids, mask = pad_batch(seqs, tok.pad_id, "right")
        lab, _ = pad_batch(labels, IGNORE_INDEX, "right")
        inputs, full_mask, pos = model.llm_inputs(queries.expand(len(part), -1, -1), ids, mask)
        logits = model.llm(inputs_embeds=inputs, attention_mask=full_mask, position_ids=pos, use_cache=False).logits
        Q = queries.shape[1]
        logp = logits[:, Q:-1].float().log_softmax(-1)  # predicts text positions 1..L-1
        target = lab[:, 1:].to(logp.device)
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (target != IGNORE_INDEX)
        total = picked.sum(-1)
        counts = (target != IGNORE_INDEX).sum(-1).clamp(min=1)
        scores.extend((total / counts if normalize else total).tolist())
    return sorted(zip(candidates, scores), key=lambda cs: -cs[1])
