"""Continuous batching: answer a stream of requests, keeping up to `max_batch` prompts in flight.

A static batch waits for its slowest answer; here a prompt that finishes leaves the batch at once
and the next request takes its place (`decoding.Flight`). Each prompt is prefilled alone (its
Q-Former and LLM prompt pass are exactly those of `model.generate(image, [prompt])`) and attends
only to its own keys, so an answer does not depend on which other requests share the batch or on
`max_batch` (fp32, greedy and beam search; tested).

Why a static batch's answer can depend on `--batch-size`: `generate` on a list pads the prompts to
the longest one (Q-Former text and LLM prompt) and runs them as one matrix product. Padded
positions are masked exactly, but the sums are taken in another order over another shape, so the
logits differ in the last bits (~1e-6 in fp32, ~1e-2 in bf16/fp16); when two candidates are that
close (a near-tie between beams, or greedy argmax), the chosen token flips. In fp32 this is rare,
in half precision it is common. This scheduler removes the padding from the comparison (only the
shared linear layers see a batch, whose rows BLAS computes independently), which is why it is
the answering loop's path.

Requests the flight cannot decode (sampling, or several greedy sequences per prompt) are answered
alone by `model.generate` as they arrive: sampled answers depend on the random stream, which a
shared batch would interleave.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from .decoding import Flight, LlamaDecoder, supports
from .generation import ImageFeatures, check_lengths, llm_generate_inputs, sampling_settings
from .options import GenerationOptions


@dataclass
class Request:
    """One prompt to answer. `image`: one row of `ImageFeatures` (from `encode_images`), or None
    for a text-only post."""

    key: Any
    prompt: str
    image: ImageFeatures | None = None
    options: GenerationOptions = field(default_factory=GenerationOptions)


def _flight_options(o: GenerationOptions) -> tuple | None:
    """What must be equal for requests to share a flight (None: the flight cannot decode it)."""
    if not o.greedy or (o.num_beams == 1 and o.num_return_sequences > 1):
        return None
    return (o.num_beams, o.new_token_limits(), o.repetition_penalty, o.length_penalty, o.num_return_sequences)


def _inputs(model: Any, request: Request) -> tuple[torch.Tensor, torch.Tensor]:
    """The request's LLM inputs exactly as `generate(image, [prompt])` builds them (text only: the
    LLM alone on LAVIS's tokenization, no soft prompt)."""
    if request.image is not None and len(request.image) != 1:
        raise ValueError(f"request {request.key!r}: expected one image row, got {len(request.image)}")
    with_image = request.image is not None and bool(request.image.has_image().all())
    check_lengths(model, request.options, [request.prompt], [with_image])
    return llm_generate_inputs(model, request.image, [request.prompt])


@torch.inference_mode()
def answer_stream(model: Any, requests: Iterable[Request], max_batch: int = 8) -> Iterator[tuple[Any, list[str]]]:
    """Yield `(key, answers)` for each request as soon as it is answered (not in input order);
    `answers` has `num_return_sequences` texts. Up to `max_batch` prompts (each with its beams) are
    decoded together; requests with other decoding options form their own flight."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    proc = model.require_processor()
    decoder = LlamaDecoder(model.llm) if supports(model.llm) else None
    flights: dict[tuple, Flight] = {}
    keys: dict[int, Any] = {}  # flight-internal id -> request key (request keys may repeat)
    pending = iter(requests)
    counter = itertools.count()
    exhausted = False
    while True:
        while not exhausted and sum(len(f.groups) for f in flights.values()) < max_batch:
            req = next(pending, None)
            if req is None:
                exhausted = True
                break
            req.options.validate()  # before any work; the prompt length is checked by `_inputs`
            fkey = _flight_options(req.options) if decoder is not None else None
            if fkey is None:
                yield req.key, model.generate(req.image, [req.prompt], options=req.options)
                continue
            if fkey not in flights:
                o = req.options
                flights[fkey] = Flight(decoder, sampling_settings(model, o), o.num_beams, o.length_penalty,
                                       o.num_return_sequences)
            inputs, mask = _inputs(model, req)
            uid = next(counter)
            keys[uid] = req.key
            flights[fkey].add([uid], inputs, mask)
        live = [f for f in flights.values() if f.groups]
        if not live:
            if exhausted:
                return
            continue
        for flight in live:
            _, done = flight.step()
            for uid, seqs in done.items():
                yield keys.pop(uid), [proc.decode(ids) for ids in seqs]
