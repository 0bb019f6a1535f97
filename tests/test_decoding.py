"""The lean decoder's batching: shared unpadded prompts, continuous batching, compiled steps.

References: `model.generate` on one prompt at a time (itself checked against transformers and a
hand-written 4.33 beam search in test_generation.py) and the static-cache decoder."""

from __future__ import annotations

import pytest
import torch
from test_generation import IMG, PROMPTS, eos_model

from somelvlm.decoding import Flight, LlamaDecoder
from somelvlm.generation import encode_images, llm_generate_inputs, sampling_settings
from somelvlm.options import GenerationOptions
from somelvlm.scheduler import Request, answer_stream

LONG = "Read the post and answer: " + " ".join(f"word{i}" for i in range(40)) + " Is it hateful?"


@pytest.fixture(scope="module")
def model():
    return eos_model()


@pytest.fixture(scope="module")
def feats(model):
    return encode_images(model, [IMG])


def greedy_settings(model, max_new_tokens: int):
    return sampling_settings(model, GenerationOptions(num_beams=1, max_new_tokens=max_new_tokens))


def alone(model, prompt, **kw):
    return model.generate(IMG, [prompt], **kw)


def test_prompt_stored_once_unpadded(model, feats):
    """5 beams share one copy of each prompt's keys, as long as that prompt (no pads); only the
    generated tokens are stored per beam."""
    prompts = ["a", LONG, PROMPTS[4]]
    E, M = llm_generate_inputs(model, feats.select([0, 0, 0]), prompts)
    flight = Flight(LlamaDecoder(model.llm), greedy_settings(model, 6), num_beams=5)
    flight.add([0, 1, 2], E, M)
    lengths = M.sum(1).tolist()
    assert len(set(lengths)) == 3
    for g, n in zip(flight.groups, lengths):
        assert g.length == n
        assert all(k.shape[:2] == (model.llm.config.num_key_value_heads, n) for k in g.prefix_k)
    assert flight.k[0].shape[0] == 15 and flight.k[0].shape[2] == 6  # rows x generated capacity
    flight.step()
    flight.step()
    assert [g.steps for g in flight.groups] == [2, 2, 2]


@pytest.mark.parametrize("beams", [1, 5])
@pytest.mark.parametrize("max_batch", [1, 3, 8])
def test_answer_stream_equals_each_alone(model, feats, beams, max_batch):
    prompts = PROMPTS + [LONG]
    opts = GenerationOptions(num_beams=beams, max_new_tokens=10)
    reqs = [Request(i, p, feats, opts) for i, p in enumerate(prompts)]
    got = dict(answer_stream(model, reqs, max_batch=max_batch))
    want = {i: alone(model, p, num_beams=beams, max_new_tokens=10) for i, p in enumerate(prompts)}
    assert got == want


def test_answer_stream_admits_as_others_finish(model, feats):
    """2 slots, a long answer first, then short ones: the short ones pass through the other slot
    while the long one runs (a static batch of 2 would hold them back until it ends)."""
    opts = GenerationOptions(num_beams=1, max_new_tokens=16)
    dec, s = LlamaDecoder(model.llm), greedy_settings(model, 16)
    steps = {p: len(list(dec.decode(*llm_generate_inputs(model, feats, [p]), s))) for p in PROMPTS}
    longs = [p for p in PROMPTS if steps[p] == 16]
    shorts = [p for p in PROMPTS if steps[p] < 8]
    assert len(longs) >= 2 and len(shorts) >= 2  # the fixture really mixes answer lengths
    ordered = longs[:1] + shorts + longs[1:]
    reqs = [Request(i, p, feats, opts) for i, p in enumerate(ordered)]
    order = [k for k, _ in answer_stream(model, reqs, max_batch=2)]
    n = len(shorts)
    assert order[:n + 1] == list(range(1, n + 1)) + [0]  # the shorts went through the second slot
    assert sorted(order) == list(range(len(ordered)))


def test_answer_stream_mixed_options_and_repeated_keys(model, feats):
    greedy = GenerationOptions(num_beams=1, max_new_tokens=8)
    beam = GenerationOptions(num_beams=3, max_new_tokens=8, num_return_sequences=2, length_penalty=0.5)
    sample = GenerationOptions(num_beams=1, max_new_tokens=8, do_sample=True, seed=3)
    reqs = [Request("x", PROMPTS[0], feats, greedy), Request("y", PROMPTS[1], feats, beam),
            Request("z", PROMPTS[2], feats, sample), Request("x", PROMPTS[3], feats, greedy)]
    got = sorted(answer_stream(model, reqs, max_batch=4))
    want = sorted([("x", alone(model, PROMPTS[0], num_beams=1, max_new_tokens=8)),
                   ("y", alone(model, PROMPTS[1], num_beams=3, max_new_tokens=8, num_return_sequences=2,
                               length_penalty=0.5)),
                   ("z", alone(model, PROMPTS[2], num_beams=1, max_new_tokens=8, do_sample=True, seed=3)),
                   ("x", alone(model, PROMPTS[3], num_beams=1, max_new_tokens=8))])
    assert got == want
    assert len(dict(got)["y"]) == 2


def test_answer_stream_rejects_bad_input(model, feats):
    with pytest.raises(ValueError, match="max_batch"):
        list(answer_stream(model, [], max_batch=0))
    with pytest.raises(ValueError, match="one image row"):
        list(answer_stream(model, [Request(0, "a", encode_images(model, [IMG, IMG]))]))
    with pytest.raises(ValueError, match="num_beams"):
        list(answer_stream(model, [Request(0, "a", feats, GenerationOptions(num_beams=0))]))


def test_greedy_flight_equals_static_cache(model, feats):
    """The ragged flight and the padded static cache (used for sampling and compiled steps) agree."""
    prompts = PROMPTS[:4] + [LONG]
    E, M = llm_generate_inputs(model, feats.select([0] * len(prompts)), prompts)
    s = greedy_settings(model, 12)
    dec = LlamaDecoder(model.llm)
    ragged = torch.stack(list(dec.decode(E, M, s)), 1)
    static = torch.stack(list(dec._decode_static(E, M, s)), 1)
    assert torch.equal(ragged, static)


@pytest.mark.slow
def test_compiled_static_step_same_tokens(model, feats):
    """`torch.compile(mode="reduce-overhead")` of the static-shape step (works on CPU too) gives the
    same tokens as the eager step and the ragged flight."""
    prompts = PROMPTS[:3] + [LONG]
    E, M = llm_generate_inputs(model, feats.select([0] * len(prompts)), prompts)
    s = greedy_settings(model, 10)
    eager = torch.stack(list(LlamaDecoder(model.llm, compile=False)._decode_static(E, M, s)), 1)
    compiled = torch.stack(list(LlamaDecoder(model.llm, compile=True).decode(E, M, s)), 1)
    ragged = torch.stack(list(LlamaDecoder(model.llm, compile=False).decode(E, M, s)), 1)
    assert torch.equal(compiled, eager) and torch.equal(eager, ragged)


@pytest.mark.parametrize("beams", [1, 4])
def test_packed_attention_equals_per_prompt_loop(model, feats, monkeypatch, beams):
    """The GPU layout (prompts packed side by side, one masked softmax for all rows), forced on CPU,
    gives the per-prompt loop's answers, also while prompts join and leave."""
    prompts = PROMPTS + [LONG]
    opts = GenerationOptions(num_beams=beams, max_new_tokens=10)
    reqs = [Request(i, p, feats, opts) for i, p in enumerate(prompts)]
    loop = dict(answer_stream(model, reqs, max_batch=3))
    monkeypatch.setattr(Flight, "packed_default", True)
    packed = dict(answer_stream(model, reqs, max_batch=3))
    assert packed == loop


@pytest.mark.parametrize("beams", [1, 3])
def test_answer_stream_text_only_requests(model, feats, beams):
    """Text-only posts (no image) share flights with image posts; each answer equals generate alone."""
    opts = GenerationOptions(num_beams=beams, max_new_tokens=8)
    reqs = [Request(i, p, None if i % 2 else feats, opts) for i, p in enumerate(PROMPTS[:6])]
    got = dict(answer_stream(model, reqs, max_batch=3))
    want = {r.key: model.generate(None if r.image is None else IMG, [r.prompt], options=opts) for r in reqs}
    assert got == want
