"""Generation against independent references: a hand-rolled greedy loop over `model(...)` logits,
transformers' beam search on hand-built embeddings, and cross-checks between the serving paths."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from somelvlm import SoMeLVLM
from somelvlm.generation import encode_images, features_for, generate_ids, stream_text, transformers_kwargs
from somelvlm.logits import repetition_penalty
from somelvlm.options import GenerationOptions
from somelvlm.processing import SAMPLE_IMAGE, asset_path

IMG = str(asset_path(SAMPLE_IMAGE))
PROMPTS = ["What is in the image?", "Is this post hateful?", "Describe the sentiment.", "a",
           "Who posted this? Options: [male, female]", "Which hashtag fits? Choices: [#cat, #dog]",
           "Is this news true or false?", "Explain the user's personality in one sentence."]


def eos_model(seed: int = 0, strength: float = 0.9) -> SoMeLVLM:
    """The tiny model with an eos row that sometimes wins, so sequences end at different lengths."""
    from somelvlm.generation import llm_generate_inputs

    m = SoMeLVLM.from_config("tiny", seed=seed)
    with torch.no_grad():
        E, M = llm_generate_inputs(m, features_for(m, IMG, len(PROMPTS)), PROMPTS)
        h = m.llm.model(inputs_embeds=E, attention_mask=M).last_hidden_state[:, -1]
        top = m.llm.lm_head(h).max(-1).values.mean()
        hbar = h.mean(0)
        m.llm.lm_head.weight[2] = hbar / (hbar @ hbar) * top * strength
    return m


@pytest.fixture(scope="module")
def model():
    return eos_model()


def gen_ids(m, prompts, image=IMG, **kw):
    kw = {**dict(num_beams=1, max_length=256, min_length=1, max_new_tokens=16, min_new_tokens=None,
                 repetition_penalty=1.5, length_penalty=1.0, do_sample=False, top_p=0.9, temperature=1.0,
                 num_return_sequences=1), **kw}
    return generate_ids(m, features_for(m, image, len(prompts)), prompts, None,
                        transformers_kwargs(m, GenerationOptions(**kw)))


def strip_tail(ids: list[int], eos: int = 2, pad: int = 2000) -> list[int]:
    out = []
    for i in ids:
        if i in (eos, pad):
            break
        out.append(i)
    return out


def reference_greedy(m, prompt: str, steps: int, penalty: float = 1.5) -> list[int]:
    """LAVIS greedy with transformers 4.33 semantics, one full forward per step, no cache: the
    repetition penalty covers the dummy start id 1 and the generated ids, never the prompt."""
    proc = m.processor
    px = proc.images([IMG])
    q_ids, q_mask = proc.qformer_text([prompt])
    prompt_ids = proc.llm_tokenizer.encode(prompt)
    out: list[int] = []
    with torch.no_grad():
        image_embeds = m.encode_image(px)
        for _ in range(steps):
            ids = torch.tensor([prompt_ids + out])
            logits = m(image_embeds=image_embeds, input_ids=ids, qformer_input_ids=q_ids,
                       qformer_attention_mask=q_mask).logits[0, -1]
            for t in set([1] + out):
                logits[t] = logits[t] * penalty if logits[t] < 0 else logits[t] / penalty
            nxt = int(logits.argmax())
            if nxt == 2:
                break
            out.append(nxt)
    return out


def test_greedy_equals_hand_rolled_loop(model):
    got = gen_ids(model, PROMPTS)
    ended_early = 0
    for p, ids in zip(PROMPTS, got):
        ref = reference_greedy(model, p, 16)
        assert strip_tail(ids) == ref, p
        ended_early += len(ref) < 16
    assert 0 < ended_early < len(PROMPTS)  # the fixture really exercises eos and padding


def test_repetition_penalty_matches_4_33_rule():
    scores = torch.tensor([[2.0, -1.0, 3.0, -4.0, 0.5]])
    generated = torch.tensor([[3, 3, 4]])
    out = repetition_penalty(scores.clone(), generated, 2.0)
    assert out.tolist() == [[2.0, -2.0, 3.0, -8.0, 0.25]]  # ids 1 (dummy), 3, 4 penalised; 0, 2 untouched


def penalty_433(penalty: float):
    """transformers 4.33's repetition penalty as LAVIS ran it, for transformers 5's `generate` (which
    has no dummy start id in `input_ids`): the dummy id 1 and the generated ids."""
    def apply(input_ids, scores):
        ids = torch.cat([torch.ones_like(input_ids[:, :1]), input_ids], 1)
        picked = scores.gather(1, ids)
        return scores.scatter(1, ids, torch.where(picked < 0, picked * penalty, picked / penalty))
    return apply


def test_beam_equals_transformers_generate_on_same_embeddings(model):
    """`fast=False` hands our inputs to transformers' beam search; the layout, built here by hand:
    [queries][left pads][</s> prompt], mask zeros in the middle."""
    from transformers import GenerationConfig

    proc = model.processor
    prompts = PROMPTS[:4]
    with torch.no_grad():
        image_embeds = model.encode_image(proc.images([IMG])).expand(len(prompts), -1, -1)
        q_ids, q_mask = proc.qformer_text(prompts)
        queries = model.query_embeds(image_embeds, q_ids, q_mask)
        seqs = [proc.llm_tokenizer.encode(p) for p in prompts]
        width = max(map(len, seqs))
        ids = torch.tensor([[2000] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        E = torch.cat([queries, model.llm.get_input_embeddings()(ids)], 1)
        M = torch.cat([torch.ones(len(prompts), queries.shape[1], dtype=torch.long), mask], 1)
        ref = model.llm.generate(inputs_embeds=E, attention_mask=M, logits_processor=[penalty_433(1.5)],
                                 generation_config=GenerationConfig(num_beams=5, max_new_tokens=12, length_penalty=1.0,
                                                                    eos_token_id=2, pad_token_id=2000, do_sample=False))
    got = generate_ids(model, features_for(model, IMG, len(prompts)), prompts, None,
                       transformers_kwargs(model, GenerationOptions(max_new_tokens=12)))
    assert [strip_tail(r) for r in ref.tolist()] == [strip_tail(g) for g in got]
    texts = model.generate(IMG, prompts, max_new_tokens=12, fast=False)  # 5 beams, penalty 1.5
    assert texts == [proc.decode(r) for r in ref.tolist()]


@pytest.mark.parametrize("beams", [1, 5])
def test_batched_equals_one_by_one(model, beams):
    batched = model.generate(IMG, PROMPTS, num_beams=beams, max_new_tokens=10)
    single = [model.generate(IMG, [p], num_beams=beams, max_new_tokens=10)[0] for p in PROMPTS]
    assert batched == single


def test_mixed_images_batch_equals_one_by_one(model, tmp_path):
    import numpy as np
    from PIL import Image

    other = tmp_path / "other.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(other)
    images = [IMG, str(other), IMG, str(other)]
    batched = model.generate(images, PROMPTS[:4], num_beams=1, max_new_tokens=10)
    single = [model.generate(im, [p], num_beams=1, max_new_tokens=10)[0] for im, p in zip(images, PROMPTS[:4])]
    assert batched == single
    forced = dict(num_beams=1, max_new_tokens=10, min_length=6)  # non-empty answers
    assert model.generate(IMG, [PROMPTS[0]], **forced) != model.generate(str(other), [PROMPTS[0]], **forced)


def test_encode_once_equals_per_prompt(model, monkeypatch):
    calls = []
    real = model.vision.forward

    def counting(x):
        calls.append(x.shape[0])
        return real(x)

    monkeypatch.setattr(model.vision, "forward", counting)
    feats = model.encode_images(IMG)
    assert len(feats) == 1 and calls == [1]
    once = model.generate(feats, PROMPTS, num_beams=5, max_new_tokens=8)
    assert calls == [1]  # the vision tower ran once for 8 prompts
    per_prompt = [model.generate(IMG, [p], num_beams=5, max_new_tokens=8)[0] for p in PROMPTS]
    assert once == per_prompt
    calls.clear()
    model.generate(IMG, PROMPTS, num_beams=1, max_new_tokens=2)  # a single image for many prompts
    assert calls == [1]
    calls.clear()
    model.generate([IMG] * 8, PROMPTS, num_beams=1, max_new_tokens=2)  # the same path repeated
    assert calls == [1]


def test_tensor_images_accepted(model):
    px = model.processor.images([IMG, IMG])
    assert model.generate(px, PROMPTS[:2], num_beams=1, max_new_tokens=6) == \
        model.generate(IMG, PROMPTS[:2], num_beams=1, max_new_tokens=6)
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        model.generate([IMG] * 3, PROMPTS[:2])


@pytest.mark.parametrize("kw", [dict(), dict(do_sample=True, seed=3, top_p=0.8)])
def test_streaming_equals_non_streaming(model, kw):
    for p in PROMPTS[:4]:
        pieces = list(model.generate_stream(IMG, p, max_new_tokens=14, **kw))
        assert "".join(pieces) == model.generate(IMG, [p], num_beams=1, max_new_tokens=14, **kw)[0]
    with pytest.raises(ValueError, match="num_beams=1"):
        next(model.generate_stream(IMG, "x", num_beams=5))


def test_stream_text_never_takes_back():
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(asset_path("tiny-llm-tokenizer.model")))
    text = "  Hello  wörld 🙂 #tag 42  "
    ids = sp.encode(text)
    pieces = list(stream_text(sp.decode, ([i] for i in ids)))
    assert "".join(pieces) == sp.decode(ids).strip()
    assert all(p for p in pieces) and "\ufffd" not in "".join(pieces)


def test_sampling_is_seeded(model):
    a = model.generate(IMG, PROMPTS[:2], num_beams=1, do_sample=True, seed=5, max_new_tokens=8)
    b = model.generate(IMG, PROMPTS[:2], num_beams=1, do_sample=True, seed=5, max_new_tokens=8)
    c = model.generate(IMG, PROMPTS[:2], num_beams=1, do_sample=True, seed=6, max_new_tokens=8)
    assert a == b and a != c


def test_lavis_length_semantics(model):
    assert len(strip_tail(gen_ids(model, ["a"], max_new_tokens=None, max_length=6, repetition_penalty=1.0)[0])) <= 5
    ids = gen_ids(model, PROMPTS, max_new_tokens=None, max_length=12, min_length=9)
    assert all(len(strip_tail(x)) >= 8 for x in ids)  # LAVIS min_length counts the dummy start id


def test_rank_matches_hand_computed_log_likelihood(model):
    prompt = "Is the user likely to be male or female? Pick your answer from [male, female]."
    cands = ["male", "female", "neither of them"]
    ranked = model.rank(IMG, prompt, cands)
    assert [c for c, _ in ranked] == sorted(cands, key=lambda c: -dict(ranked)[c])
    tok = model.processor.llm_tokenizer
    px = model.processor.images([IMG])
    q_ids, q_mask = model.processor.qformer_text([prompt])
    p_ids = tok.encode(prompt)
    for cand, score in ranked:
        c_ids = tok.encode(cand, bos=False)
        with torch.no_grad():
            logits = model(pixel_values=px, input_ids=torch.tensor([p_ids + c_ids]), qformer_input_ids=q_ids,
                           qformer_attention_mask=q_mask).logits[0]
        logp = logits.log_softmax(-1)
        Q = 8
        want = sum(float(logp[Q + len(p_ids) - 1 + j, t]) for j, t in enumerate(c_ids))
        assert score == pytest.approx(want, abs=1e-4), cand
    norm = dict(model.rank(IMG, prompt, cands, normalize=True))
    assert norm["neither of them"] == pytest.approx(dict(ranked)["neither of them"] / len(tok.encode("neither of them", bos=False)), abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_precisions_run_without_dtype_errors(dtype, tmp_path):
    m = SoMeLVLM.from_config("tiny")
    m.save_pretrained(tmp_path / "m")
    for model in (SoMeLVLM.from_pretrained(tmp_path / "m", dtype=dtype), SoMeLVLM.from_config("tiny").to(dtype)):
        out = model.generate(IMG, PROMPTS[:2], max_new_tokens=4)
        assert len(out) == 2 and all(isinstance(o, str) for o in out)
        assert list(model.generate_stream(IMG, "hi", max_new_tokens=3)) is not None
        assert len(model.rank(IMG, "x?", ["a", "b"])) == 2
        loss = model.compute_loss(images=[IMG], prompts=["q"], answers=["a"])
        assert torch.isfinite(loss)
        emb = model.encode_images(IMG).embeds
        assert emb.dtype == torch.float32  # ln_vision always computes (and returns) fp32


def test_bf16_outputs_close_to_fp32(tmp_path):
    m = SoMeLVLM.from_config("tiny")
    px = m.processor.images([IMG])
    ids, mask = m.processor.prompts(["What is this?"])
    q, qm = m.processor.qformer_text(["What is this?"])
    with torch.no_grad():
        a = m(pixel_values=px, input_ids=ids, qformer_input_ids=q, qformer_attention_mask=qm).logits
        m.to_dtype(torch.bfloat16)
        b = m(pixel_values=px, input_ids=ids, qformer_input_ids=q, qformer_attention_mask=qm).logits
    assert b.dtype == torch.bfloat16
    assert_close(b.float(), a, atol=0.05, rtol=0.05)  # bf16 has ~3 significant digits


def test_errors_are_clear(model):
    with pytest.raises(TypeError, match="prompts must be strings"):
        model.generate(IMG, [1])
    bare = SoMeLVLM(model.config)
    with pytest.raises(RuntimeError, match="no tokenizers"):
        bare.generate(IMG, ["x"])
    with pytest.raises(FileNotFoundError, match="image not found"):
        model.generate("/nonexistent.jpg", ["x"])


def test_encode_images_batches(model):
    feats = encode_images(model, [IMG] * 5, batch_size=2)
    assert len(feats) == 5 and feats.embeds.shape[1:] == (17, 48)
    assert len(feats.select([0, 0, 4])) == 3


@pytest.mark.parametrize("kw", [
    dict(num_beams=1),
    dict(num_beams=1, min_length=8),
    dict(num_beams=1, repetition_penalty=1.0),
    dict(num_beams=1, do_sample=True, seed=11),
    dict(num_beams=1, do_sample=True, seed=12, top_p=0.5, top_k=20, temperature=0.7),
])
def test_lean_decoder_equals_transformers_generate(model, kw):
    """The lean decoder (default for num_beams=1) against transformers' own greedy/sampling loop."""
    fast = model.generate(IMG, PROMPTS, max_new_tokens=14, **kw)
    slow = model.generate(IMG, PROMPTS, max_new_tokens=14, fast=False, **kw)
    assert fast == slow


def test_lean_decoder_logits_match_hf_forward(model):
    from somelvlm.decoding import LlamaDecoder
    from somelvlm.generation import llm_generate_inputs

    feats = features_for(model, IMG, 3)
    with torch.no_grad():
        E, M = llm_generate_inputs(model, feats, PROMPTS[:3])  # left padded
        pos = (M.cumsum(-1) - 1).clamp(min=0)
        ref = model.llm(inputs_embeds=E, attention_mask=M, position_ids=pos).logits[:, -1]
        dec = LlamaDecoder(model.llm)
        cache = dec.new_cache(3, E.shape[1] + 1, E.dtype, E.device)
        got = dec.forward(E, pos, cache, M)
        assert_close(got, ref, atol=1e-5, rtol=1e-5)
        # one more step through the cache == a full forward over the extended sequence
        nxt = got.argmax(-1)
        step = dec.forward(model.llm.get_input_embeddings()(nxt[:, None]), pos[:, -1:] + 1, cache,
                           torch.cat([M, M.new_ones(3, 1)], 1))
        E2 = torch.cat([E, model.llm.get_input_embeddings()(nxt[:, None])], 1)
        M2 = torch.cat([M, M.new_ones(3, 1)], 1)
        ref2 = model.llm(inputs_embeds=E2, attention_mask=M2, position_ids=(M2.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        assert_close(step, ref2, atol=1e-5, rtol=1e-5)


def test_row_prefill_equals_padded_prefill(model):
    """Skipping the pads in prefill (used for batches with much padding) changes nothing."""
    from somelvlm.decoding import LlamaDecoder
    from somelvlm.generation import llm_generate_inputs

    with torch.no_grad():
        E, M = llm_generate_inputs(model, features_for(model, IMG, 4), ["a", PROMPTS[4], "b c", PROMPTS[7]])
        assert M.sum() < 0.8 * M.numel()
        dec = LlamaDecoder(model.llm)
        padded, rows = (dec.new_cache(4, E.shape[1] + 1, E.dtype, E.device) for _ in range(2))
        a = dec.forward(E, (M.cumsum(-1) - 1).clamp(min=0), padded, M)
        b = dec.prefill_rows(E, M, rows)
        assert_close(a, b, atol=1e-5, rtol=1e-5)
        for i in range(len(padded.k)):
            real = M.bool()[:, None, :, None].expand_as(padded.k[i][:, :, :E.shape[1]])
            assert_close(padded.k[i][:, :, :E.shape[1]][real], rows.k[i][:, :, :E.shape[1]][real], atol=1e-5, rtol=1e-5)


def reference_beam_433(m, prompt: str, num_beams: int, max_length: int, min_length: int = 1,
                       penalty: float = 1.5, length_penalty: float = 1.0) -> list[int]:
    """LAVIS beam search as transformers 4.33 ran it (lavis.md 4.4), written out plainly: no cache (one
    full forward per step), every hypothesis starts with the dummy id 1, which counts in its length
    and in the repetition penalty; log-softmax, then penalty and min length, then + beam score; the
    top 2*beams candidates in order: an eos ranked below num_beams is ignored, other eos close a
    hypothesis (score = sum / len ** lp, len without the eos); a prompt is done when num_beams
    hypotheses exist and the worst beats max(candidates) / (len + 1) ** lp; beams still running at
    max_length are added with len = max_length."""
    proc = m.processor
    q_ids, q_mask = proc.qformer_text([prompt])
    prompt_ids = proc.llm_tokenizer.encode(prompt)
    with torch.no_grad():
        image_embeds = m.encode_image(proc.images([IMG]))
        beams = [([1], 0.0)] + [([1], -1e9)] * (num_beams - 1)
        finished: list[tuple[float, list[int]]] = []

        def add(tokens, total):
            finished.append((total / len(tokens) ** length_penalty, tokens))
            finished.sort(key=lambda x: x[0])
            if len(finished) > num_beams:
                finished.pop(0)

        while True:
            cands = []
            for b, (tokens, total) in enumerate(beams):
                ids = torch.tensor([prompt_ids + tokens[1:]])
                logits = m(image_embeds=image_embeds, input_ids=ids, qformer_input_ids=q_ids,
                           qformer_attention_mask=q_mask).logits[0, -1].float()
                logp = logits.log_softmax(-1)
                for t in set(tokens):
                    logp[t] = logp[t] * penalty if logp[t] < 0 else logp[t] / penalty
                if len(tokens) < min_length:
                    logp[2] = -float("inf")
                vals, idx = (logp + total).topk(2 * num_beams)
                cands += [(float(v), b, int(i)) for v, i in zip(vals, idx)]
            cands.sort(key=lambda c: -c[0])
            cands = cands[: 2 * num_beams]
            nxt = []
            for rank, (score, b, tok) in enumerate(cands):
                if tok == 2:
                    if rank < num_beams:
                        add(beams[b][0], score)
                else:
                    nxt.append((beams[b][0] + [tok], score))
                if len(nxt) == num_beams:
                    break
            length = len(beams[0][0])
            done = len(finished) >= num_beams and finished[0][0] >= cands[0][0] / (length + 1) ** length_penalty
            beams = nxt
            if done:
                break
            if len(beams[0][0]) >= max_length:
                for tokens, total in beams:
                    add(tokens, total)
                break
    return max(finished, key=lambda x: x[0])[1][1:]


@pytest.mark.parametrize("max_length,length_penalty,min_length", [(12, 1.0, 1), (20, 1.0, 1), (16, 0.0, 1),
                                                                   (16, -1.0, 6), (18, 2.0, 1)])
def test_beam_search_follows_transformers_4_33(model, max_length, length_penalty, min_length):
    """LAVIS's default decoding: 5 beams, LAVIS length semantics, the 4.33 scorer (truncated beams scored
    by max_length, the (len+1) early-stop check)."""
    prompts = PROMPTS[:5]
    got = model.generate(IMG, prompts, num_beams=5, max_length=max_length, min_length=min_length,
                         length_penalty=length_penalty)
    want = [model.processor.decode(reference_beam_433(model, p, 5, max_length, min_length,
                                                      length_penalty=length_penalty)) for p in prompts]
    assert got == want


@pytest.mark.parametrize("max_length", [12, 16])
def test_beam_search_where_transformers_5_differs(max_length):
    """A model and settings where transformers 5's beam search picks other answers than 4.33 (which
    LAVIS ran): ours must follow 4.33."""
    m = eos_model(seed=1, strength=1.0)
    prompts = [PROMPTS[i] for i in (0, 1, 6, 2)]
    got = m.generate(IMG, prompts, num_beams=5, max_length=max_length)
    want = [m.processor.decode(reference_beam_433(m, p, 5, max_length)) for p in prompts]
    assert got == want
    assert got != m.generate(IMG, prompts, num_beams=5, max_length=max_length, fast=False)


# ------------------------------------------------------------------------------------------------
# Plain-text posts: the LLM alone on LAVIS's tokenization ([2] + sentencepiece), no soft prompt
# ------------------------------------------------------------------------------------------------
def test_text_only_equals_llama_for_causal_lm(model):
    """Greedy tokens and ranking scores of a text-only post equal `LlamaForCausalLM` on the same ids."""
    tok = model.processor.llm_tokenizer
    for p in PROMPTS[:4]:
        ids = tok.encode(p)
        assert ids[0] == 2  # LAVIS: every LLM prompt starts with </s>
        with torch.no_grad():
            ref = model.llm.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     do_sample=False, num_beams=1, max_new_tokens=10, eos_token_id=2,
                                     pad_token_id=2000)[0, len(ids):].tolist()
        got = gen_ids(model, [p], image=None, max_new_tokens=10, repetition_penalty=1.0)[0]
        assert strip_tail(got) == strip_tail(ref), p
        assert model.generate(None, [p], num_beams=1, max_new_tokens=10, repetition_penalty=1.0) == \
            [model.processor.decode(ref)]
    prompt, cands = "Is this post hateful? Answer yes or no.", ["yes", "no", "not sure"]
    p_ids = tok.encode(prompt)
    for cand, score in model.rank(None, prompt, cands):
        c_ids = tok.encode(cand, bos=False)
        with torch.no_grad():
            logp = model.llm(input_ids=torch.tensor([p_ids + c_ids])).logits[0].log_softmax(-1)
        want = sum(float(logp[len(p_ids) - 1 + j, t]) for j, t in enumerate(c_ids))
        assert score == pytest.approx(want, abs=1e-4), cand


def test_text_only_stream_and_beams(model):
    for p in PROMPTS[:3]:
        assert "".join(model.generate_stream(None, p, max_new_tokens=12)) == \
            model.generate(None, [p], num_beams=1, max_new_tokens=12)[0]
    with torch.no_grad():  # beam search on the same ids through transformers (LAVIS penalty by hand)
        ids = model.processor.llm_tokenizer.encode(PROMPTS[1])
        ref = model.llm.generate(input_ids=torch.tensor([ids]), num_beams=5, max_new_tokens=12, do_sample=False,
                                 eos_token_id=2, pad_token_id=2000, logits_processor=[penalty_433_ids(1.5, len(ids))])
    assert model.generate(None, [PROMPTS[1]], max_new_tokens=12, fast=False) == \
        [model.processor.decode(ref[0, len(ids):].tolist())]


def penalty_433_ids(penalty: float, prompt_len: int):
    """`penalty_433` for a `generate` given `input_ids`: the prompt is not penalised."""
    inner = penalty_433(penalty)
    return lambda input_ids, scores: inner(input_ids[:, prompt_len:], scores)


@pytest.mark.parametrize("beams", [1, 5])
def test_mixed_text_and_image_batch_equals_one_by_one(model, beams, tmp_path):
    import numpy as np
    from PIL import Image

    other = tmp_path / "other.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(other)
    images = [IMG, None, str(other), None, IMG, None]
    prompts = PROMPTS[:6]
    kw = dict(num_beams=beams, max_new_tokens=10)
    batched = model.generate(images, prompts, **kw)
    single = [model.generate(im, [p], **kw)[0] for im, p in zip(images, prompts)]
    assert batched == single
    assert model.generate(images, prompts, batch_size=4, **kw) == single
    text_only = [model.generate(None, [p], **kw)[0] for p in prompts]
    assert [a == b for a, b in zip(single, text_only)] != [True] * 6  # the image rows really used their image


def test_features_with_text_only_rows(model):
    from somelvlm.generation import NO_IMAGE, ImageFeatures

    feats = features_for(model, [None, IMG, None, IMG], 4)
    assert feats.rows().tolist() == [NO_IMAGE, 0, NO_IMAGE, 0] and feats.embeds.shape[0] == 1
    both = ImageFeatures.concat([feats.select([0, 1]), model.encode_images(IMG)])
    assert both.rows().tolist() == [NO_IMAGE, 0, 1]
    assert features_for(model, None, 3) is None and features_for(model, [None, None], 2) is None
    prompts = PROMPTS[:3]
    assert model.generate(both, prompts, num_beams=1, max_new_tokens=6) == \
        [model.generate(im, [p], num_beams=1, max_new_tokens=6)[0] for im, p in zip([None, IMG, IMG], prompts)]
