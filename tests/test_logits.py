"""logits.py against transformers' own processors and warpers (run the way 4.33 ran them for LAVIS),
and its use by both decoding paths."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from somelvlm import SoMeLVLM
from somelvlm.logits import LavisLogitsProcessor, SamplingSettings, process_scores, repetition_penalty
from somelvlm.processing import SAMPLE_IMAGE, asset_path

IMG = str(asset_path(SAMPLE_IMAGE))
V = 300


def reference(scores, generated, step, s: SamplingSettings, keep: int = 1):
    """transformers' processors in 4.33's order; the dummy start id sits in front of `input_ids` as in 4.33."""
    ids = torch.cat([torch.full((generated.shape[0], 1), 1), generated], 1)
    procs = LogitsProcessorList()
    if s.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
    # 4.33's MinNewTokens counts from the prompt length; here the "prompt" is the dummy id
    procs.append(MinNewTokensLengthLogitsProcessor(1, s.min_new_tokens, s.eos_id))
    if s.do_sample:
        if s.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k:
            procs.append(TopKLogitsWarper(s.top_k, min_tokens_to_keep=keep))
        if s.top_p < 1.0:
            procs.append(TopPLogitsWarper(s.top_p, min_tokens_to_keep=keep))
    assert ids.shape[1] - 1 == step
    return procs(ids, scores.clone())


@pytest.mark.parametrize("kw", [
    dict(repetition_penalty=1.5),
    dict(repetition_penalty=1.5, min_new_tokens=5),
    dict(repetition_penalty=0.7, do_sample=True, temperature=0.6, top_k=20, top_p=0.8),
    dict(repetition_penalty=1.0, do_sample=True, top_k=0, top_p=0.3),
    dict(repetition_penalty=1.2, do_sample=True, top_k=1, top_p=0.05, min_tokens_to_keep=2),
    dict(repetition_penalty=1.5, do_sample=True, temperature=1.7, top_k=50, top_p=0.9, min_new_tokens=9),
])
@pytest.mark.parametrize("step", [0, 3, 7])
def test_process_scores_equals_transformers_processors(kw, step):
    g = torch.Generator().manual_seed(step)
    s = SamplingSettings(max_new_tokens=20, eos_id=2, **kw)
    scores = torch.randn(4, V, generator=g) * 3
    generated = torch.randint(0, V, (4, step), generator=g)
    want = reference(scores, generated, step, s, keep=s.min_tokens_to_keep)
    got = process_scores(scores.clone(), generated, step, s)
    assert torch.equal(torch.isinf(got), torch.isinf(want))  # the same tokens are filtered out
    assert_close(got, want, rtol=1e-6, atol=1e-6)  # and the rest equals (float arithmetic in the same order)
    via_hf = LavisLogitsProcessor(s)(generated, scores.clone())  # transformers 5: generated ids only
    assert torch.equal(via_hf, got)


def test_repetition_penalty_matches_4_33_rule():
    scores = torch.tensor([[2.0, -1.0, 3.0, -4.0, 0.5]])
    out = repetition_penalty(scores, torch.tensor([[3, 3, 4]]), 2.0)
    assert out.tolist() == [[2.0, -2.0, 3.0, -8.0, 0.25]]  # ids 1 (dummy), 3, 4 penalised; 0, 2 untouched
    assert repetition_penalty(scores, torch.tensor([[3]]), 2.0, dummy_id=None)[0, 1] == -1.0


@pytest.fixture(scope="module")
def model():
    return SoMeLVLM.from_config("tiny")


PROMPTS = ["What is in the image?", "Is this post hateful?", "a", "Describe the sentiment of the post."]


@pytest.mark.parametrize("beams", [1, 3])
def test_temperature_zero_sampling_is_greedy(model, beams):
    """Documented rule: do_sample at temperature 0 decodes greedily (beam search with beams), on both paths."""
    greedy = model.generate(IMG, PROMPTS, num_beams=beams, max_new_tokens=8)
    for fast in (True, False):
        assert model.generate(IMG, PROMPTS, num_beams=beams, max_new_tokens=8, do_sample=True, temperature=0.0,
                              seed=1, fast=fast) == greedy

