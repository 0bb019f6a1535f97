"""Generation exactly as LAVIS `Blip2VicunaInstruct.generate`, plus encode-once-ask-many, streaming,
plain-text posts and candidate ranking (`predict_class`).

The LLM sees `[Q query embeddings][left pads][</s> prompt]` with position ids from the attention
mask (pads skipped). A post without an image (text-only mode, our choice: LAVIS always has an
image) is `[left pads][</s> prompt]`: the same LAVIS tokenization, no soft prompt; in a batch that
mixes both, a text-only row's query slots are masked out like pads, so it computes what it would
alone. Decoding options are one `GenerationOptions` (defaults: `model.generation_options`, LAVIS's
unless the model folder says otherwise), validated before any work. Decoding runs on the lean decoder
(`decoding.py`) with transformers 4.33's semantics, which LAVIS ran: `max_length` and `min_length`
count a dummy start token; the logits processing lives in `logits.py`; beams are scored by 4.33's
rules. Output ids equal to 0 become 2, special ids are skipped, and the text is stripped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessorList

from .decoding import LlamaDecoder, supports
from .logits import DUMMY_START_ID, LavisLogitsProcessor, SamplingSettings
from .options import GenerationOptions
from .processing import IGNORE_INDEX, pad_batch

NO_IMAGE = -1  # `ImageFeatures.index` value of a text-only row


@dataclass
class ImageFeatures:
    """Image embeddings after `ln_vision`: compute once, ask many questions.

    `embeds [U, tokens, width]` holds each distinct image once; `index [N]` (None: `arange(U)`) says
    which image each prompt row uses, so selecting rows never copies embeddings and the Q-Former
    computes its cross-attention keys/values once per image. `NO_IMAGE` (-1) marks a text-only row."""

    embeds: torch.Tensor
    index: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0] if self.index is None else self.index.shape[0]

    def rows(self) -> torch.Tensor:
        return torch.arange(self.embeds.shape[0], device=self.embeds.device) if self.index is None else self.index

    def has_image(self) -> torch.Tensor:
        """`[N]` bool: which rows have an image."""
        return self.rows() != NO_IMAGE

    def select(self, indices: Sequence[int]) -> "ImageFeatures":
        """Rows for a batch of prompts (an index may repeat: one image, many prompts)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long, device=self.embeds.device)
        return ImageFeatures(self.embeds, self.rows().index_select(0, idx))

    @staticmethod
    def concat(parts: Sequence["ImageFeatures"]) -> "ImageFeatures":
        offsets, rows = 0, []
        for p in parts:
            r = p.rows()
            rows.append(torch.where(r == NO_IMAGE, r, r + offsets))
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


def _image_list(images: Any, n: int) -> list[Any] | None:
    """`images` as one entry per prompt (None = text only), or None when it is one image, a tensor or
    `ImageFeatures` (checked by `features_for`)."""
    if images is None:
        return [None] * n
    if isinstance(images, (ImageFeatures, torch.Tensor)) or _is_single_image(images):
        return None
    items = list(images)
    if len(items) == 1:
        return items * n
    if len(items) != n:
        raise ValueError(f"{len(items)} images for {n} prompts: give one image per prompt, or one for all")
    return items


def rows_with_image(images: Any, n: int) -> list[bool]:
    """Which of `n` prompts have an image (`images` as `generate` takes them; None entries: text only)."""
    if isinstance(images, ImageFeatures) and len(images) == n:
        return images.has_image().tolist()
    items = _image_list(images, n)
    return [True] * n if items is None else [x is not None for x in items]


def features_for(model: Any, images: Any, n: int) -> ImageFeatures | None:
    """Image features for `n` prompts (None: no prompt has an image). One image (or feature row) is
    shared by all prompts; a list of `n` images (None = that prompt is text only) is encoded once per
    distinct path (or object)."""
    items = _image_list(images, n)
    if items is not None:
        keys = [None if x is None else os.fspath(x) if isinstance(x, (str, os.PathLike)) else id(x) for x in items]
        slot: dict[Any, int] = {}
        unique = []
        for k, x in zip(keys, items):
            if x is not None and k not in slot:
                slot[k] = len(unique)
                unique.append(x)
        if not unique:
            return None
        embeds = encode_images(model, unique).embeds
        index = [NO_IMAGE if k is None else slot[k] for k in keys]
        return ImageFeatures(embeds, torch.tensor(index, dtype=torch.long, device=embeds.device))
    feats = encode_images(model, images)
    if len(feats) == n:
        return feats
    if len(feats) == 1:
        return feats.select([0] * n)
    raise ValueError(f"{len(feats)} images for {n} prompts: give one image per prompt, or one for all")


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------
def resolve_options(model: Any, options: GenerationOptions | None = None, **overrides: Any) -> GenerationOptions:
    """`options` (default: the model's `generation_options`, else LAVIS's) with `overrides` applied.
    An unknown override is a ValueError naming it; values are type-checked."""
    base = options if options is not None else getattr(model, "generation_options", None) or GenerationOptions()
    if not isinstance(base, GenerationOptions):
        raise TypeError(f"options must be a GenerationOptions, got {type(base).__name__}")
    if not overrides:
        return base
    return GenerationOptions.from_dict({**base.to_dict(), **overrides}, source="generate")


def check_lengths(model: Any, options: GenerationOptions, prompts: Sequence[str], with_image: Sequence[bool]) -> None:
    """Refuse (ValueError) prompts that, with their soft prompt and the new tokens, do not fit the LLM's
    positions. LAVIS never truncates a prompt at generation, so neither do we."""
    tok = model.require_processor().llm_tokenizer
    limit = model.config.llm.max_positions
    queries = model.query_tokens.shape[1]
    lengths = [len(tok.encode(p)) for p in prompts]
    totals = [n + (queries if img else 0) for n, img in zip(lengths, with_image)]
    worst = max(range(len(totals)), key=totals.__getitem__)
    if totals[worst] >= limit:
        which = f"prompt {worst + 1} of {len(totals)}" if len(totals) > 1 else "the prompt"
        soft = f" + {queries} query tokens" if with_image[worst] else ""
        raise ValueError(f"{which} is too long: {lengths[worst]} tokens{soft} leave no room for an answer in the "
                         f"model's {limit} positions (LAVIS does not truncate prompts at generation); shorten it")
    options.validate(max_positions=limit, prompt_tokens=totals[worst])


def sampling_settings(model: Any, options: GenerationOptions) -> SamplingSettings:
    llm = model.config.llm
    return SamplingSettings.from_options(options, eos_id=llm.eos_id, pad_id=llm.pad_id)


def transformers_kwargs(model: Any, options: GenerationOptions) -> dict[str, Any]:
    """Keywords for `model.llm.generate`: its search loop, our logits processing (`logits.py`; every
    processor transformers would add itself is switched off)."""
    llm = model.config.llm
    max_new, _ = options.new_token_limits()
    cfg = GenerationConfig(num_beams=options.num_beams, max_new_tokens=max_new, length_penalty=options.length_penalty,
                           do_sample=not options.greedy, num_return_sequences=options.num_return_sequences,
                           eos_token_id=llm.eos_id, pad_token_id=llm.pad_id, bos_token_id=DUMMY_START_ID,
                           use_cache=True)
    if cfg.do_sample:
        cfg.update(temperature=1.0, top_k=0, top_p=1.0)
    processors = LogitsProcessorList([LavisLogitsProcessor(sampling_settings(model, options))])
    return {"generation_config": cfg, "logits_processor": processors}


# ------------------------------------------------------------------------------------------------
# LLM inputs
# ------------------------------------------------------------------------------------------------
@torch.inference_mode()
def soft_prompt(model: Any, feats: ImageFeatures | None, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The projected queries `[B, Q, D]` of the rows with an image (zeros elsewhere) and that row mask
    `[B]`; `Q = 0` when no row has an image."""
    B = len(prompts)
    has = torch.zeros(B, dtype=torch.bool) if feats is None else feats.has_image().cpu()
    if not bool(has.any()):
        return torch.zeros(B, 0, model.config.llm.hidden, device=model.device), has
    sel = has.nonzero().squeeze(1)
    q_ids, q_mask = model.require_processor().qformer_text([prompts[i] for i in sel.tolist()])
    rows = feats.rows().index_select(0, sel.to(feats.embeds.device))
    queries = model.query_embeds(feats.embeds, q_ids, q_mask, image_index=rows)  # [B', Q, D]
    if bool(has.all()):
        return queries, has
    out = queries.new_zeros(B, *queries.shape[1:])
    out[sel.to(out.device)] = queries
    return out, has


@torch.inference_mode()
def llm_generate_inputs(model: Any, feats: ImageFeatures | None,
                        prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """`inputs_embeds [B, Q+L, D]` and `attention_mask [B, Q+L]` in LAVIS's generation layout; a
    text-only row's Q query slots are masked out (Q = 0 when no row has an image)."""
    ids, mask = model.require_processor().prompts(prompts, side="left")
    queries, has = soft_prompt(model, feats, prompts)
    inputs, full_mask, _ = model.llm_inputs(queries, ids, mask)
    full_mask[:, :queries.shape[1]] = has[:, None].to(full_mask)
    return inputs, full_mask


def _as_list(prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts is None:
        raise ValueError("prompts are required")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be strings")
    return prompts


def _prepare(model: Any, images: Any, prompts: list[str], options: GenerationOptions | None,
             overrides: dict[str, Any]) -> tuple[GenerationOptions, ImageFeatures | None]:
    """Options resolved and checked against the prompts' lengths (before any model work), then the
    image features."""
    opts = resolve_options(model, options, **overrides).validate()
    check_lengths(model, opts, prompts, rows_with_image(images, len(prompts)))
    return opts, features_for(model, images, len(prompts))


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------
@torch.inference_mode()
def generate(model: Any, images: Any = None, prompts: str | Sequence[str] | None = None,
             options: GenerationOptions | None = None, *, batch_size: int | None = None, fast: bool = True,
             **overrides: Any) -> list[str]:
    """Answers for `prompts` (one per prompt, times `num_return_sequences`).

    `images`: one image for all prompts, one per prompt (None entries: that post is text only),
    None (all text only), a `[B,3,S,S]` tensor, or `ImageFeatures` from `encode_images`.
    `options`/`overrides`: `GenerationOptions` and any of its fields by name (default: the model's
    `generation_options`, LAVIS's: 5 beams, `max_length=256` counting a dummy start token, so 255 new
    tokens, ...); an unknown name or a bad value is a ValueError before any work. `batch_size`
    splits long prompt lists. Greedy, sampling and beam search run on somelvlm's lean decoder with
    transformers 4.33's semantics, which LAVIS's outputs depend on (`fast=False`: transformers 5's
    own `generate` with our logits processing, whose beam search scores truncated beams and stops
    differently); beam *sampling* (`do_sample` with `num_beams > 1`) and several sampled answers per
    prompt always use transformers. Sampling at `temperature=0` is greedy.
    """
    prompts = _as_list(prompts)
    opts, feats = _prepare(model, images, prompts, options, overrides)
    if opts.seed is not None:
        torch.manual_seed(opts.seed)
    one = opts.num_beams == 1 and opts.num_return_sequences == 1
    if fast and supports(model.llm) and (one or (opts.num_beams > 1 and opts.greedy)):
        ids = fast_generate_ids(model, feats, prompts, batch_size, opts)
    else:
        ids = generate_ids(model, feats, prompts, batch_size, transformers_kwargs(model, opts))
    proc = model.require_processor()
    return [proc.decode(row) for row in ids]


def _chunks(feats: ImageFeatures | None, prompts: list[str],
            batch_size: int | None) -> Iterator[tuple[ImageFeatures | None, list[str]]]:
    step = batch_size or len(prompts)
    for i in range(0, len(prompts), step):
        part = prompts[i:i + step]
        yield (None if feats is None else feats.select(range(i, i + len(part)))), part


def fast_generate_ids(model: Any, feats: ImageFeatures | None, prompts: list[str], batch_size: int | None,
                      options: GenerationOptions) -> list[list[int]]:
    """New token ids per answer from the lean decoder (greedy, sampling, or 4.33-rule beam search)."""
    decoder = LlamaDecoder(model.llm)
    settings = sampling_settings(model, options)
    out: list[list[int]] = []
    for part_feats, part in _chunks(feats, prompts, batch_size):
        inputs, mask = llm_generate_inputs(model, part_feats, part)
        if options.num_beams > 1:
            out.extend(decoder.beam_search(inputs, mask, settings, options.num_beams, options.length_penalty,
                                           options.num_return_sequences))
        else:
            tokens = torch.stack(list(decoder.decode(inputs, mask, settings)), dim=1)  # [B, new]
            out.extend(row.tolist() for row in tokens)
    return out


def generate_ids(model: Any, feats: ImageFeatures | None, prompts: list[str], batch_size: int | None,
                 gen: dict[str, Any]) -> list[list[int]]:
    """New token ids per answer from transformers' `generate` (`gen`: `transformers_kwargs`)."""
    out: list[list[int]] = []
    for part_feats, part in _chunks(feats, prompts, batch_size):
        inputs, mask = llm_generate_inputs(model, part_feats, part)
        seqs = model.llm.generate(inputs_embeds=inputs, attention_mask=mask, **gen)
        out.extend(row.tolist() for row in seqs)
    return out


# ------------------------------------------------------------------------------------------------
# Streaming
# ------------------------------------------------------------------------------------------------
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


def stream_options(options: GenerationOptions) -> GenerationOptions:
    """The options streaming decodes with: one beam and one answer (a beam search's best beam is only
    known at the end), greedy or sampling as `options` say."""
    return options.replace(num_beams=1, num_return_sequences=1)


def streaming_note(options: GenerationOptions) -> str | None:
    """None when streaming decodes what `generate` would with `options`; else why it cannot."""
    if options.num_beams == 1 and options.num_return_sequences == 1:
        return None
    how = "greedy search" if stream_options(options).greedy else "sampling"
    if options.num_beams > 1:
        asked = "beam sampling" if not options.greedy else "beam search"
        return (f"a beam search cannot stream (its best answer is known only at the end): streaming decodes one "
                f"answer with 1 beam ({how}), not {asked} with num_beams={options.num_beams}")
    return (f"streaming decodes one answer ({how}), not num_return_sequences={options.num_return_sequences}")


def generate_stream(model: Any, image: Any, prompt: str, options: GenerationOptions | None = None,
                    **overrides: Any) -> Iterator[str]:
    """Yield text pieces as the model produces them; `"".join(...)` equals `generate(...)[0]` with
    `stream_options` of the same options. `image=None`: a text-only post. Streaming decodes one beam
    (greedy, or sampling with `do_sample`); asking for `num_beams > 1` here (or in `options`) is a
    ValueError saying why (`streaming_note`), while beams from the model's defaults become one. Options are checked
    when this is called, before the first piece is asked for."""
    resolved = resolve_options(model, options, **overrides)
    asked = options is not None or "num_beams" in overrides or "num_return_sequences" in overrides
    note = streaming_note(resolved) if asked else None  # beams from the model's defaults become one
    if note:
        raise ValueError(f"{note}; use num_beams=1")
    prompts = _as_list(prompt)
    if len(prompts) != 1:
        raise ValueError("generate_stream answers one prompt")
    opts, feats = _prepare(model, image, prompts, stream_options(resolved), {})
    return _stream(model, feats, prompts, opts)


def _stream(model: Any, feats: ImageFeatures | None, prompts: list[str], opts: GenerationOptions) -> Iterator[str]:
    if opts.seed is not None:
        torch.manual_seed(opts.seed)
    decode = model.require_processor().llm_tokenizer.decode
    with torch.inference_mode():
        inputs, mask = llm_generate_inputs(model, feats, prompts)
        steps = LlamaDecoder(model.llm).decode(inputs, mask, sampling_settings(model, opts))
        yield from stream_text(decode, ([int(t[0])] for t in steps))


# ------------------------------------------------------------------------------------------------
# Ranking
# ------------------------------------------------------------------------------------------------
@torch.inference_mode()
def rank(model: Any, image: Any, prompt: str, candidates: Sequence[str], normalize: bool = False,
         batch_size: int = 32) -> list[tuple[str, float]]:
    """Score each candidate answer by its log-likelihood after the prompt (LAVIS `predict_class`)
    and return `(candidate, score)` sorted best first. `image=None`: a text-only post.

    LAVIS ranks by the LM loss averaged over the padded length of a candidate batch, i.e. by the
    *sum* of the candidate tokens' log-probabilities (`normalize=False`, the default); with
    `normalize=True` the score is the mean per token. Candidates are scored without a closing `</s>`.
    """
    candidates = list(candidates)
    if not candidates:
        raise ValueError("no candidates to rank")
    tok = model.require_processor().llm_tokenizer
    queries, _ = soft_prompt(model, features_for(model, image, 1), [prompt])  # [1, Q, D]: shared
    prompt_ids = tok.encode(prompt)
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
