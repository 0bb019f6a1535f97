"""Parity of the whole model with transformers' InstructBLIP, loaded through the released LAVIS files."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.testing import assert_close

from reference import IMAGE_TOKEN, TINY_PIECES, hf_input_ids
from somelvlm import SoMeLVLM, SoMeLVLMConfig

ATOL, RTOL = 1e-5, 1e-5  # fp32; the two implementations differ only in kernel rounding


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(7)
    px = torch.randn(2, 3, 56, 56, generator=g)
    q_ids = torch.randint(1000, 30000, (2, 9), generator=g)
    q_ids[:, 0], q_ids[0, -1], q_ids[1, -4] = 101, 102, 102
    q_mask = torch.ones_like(q_ids)
    q_mask[1, -3:] = 0  # one padded instruction
    q_ids[1, -3:] = 0
    ids = torch.randint(3, TINY_PIECES, (2, 7), generator=g)
    ids[:, 0] = 2
    return px, q_ids, q_mask, ids


def test_loads_released_layout(loaded, caplog):
    assert loaded.vision.cfg.depth == 2 and len(loaded.vision.blocks) == 2
    assert loaded.llm.config.vocab_size == TINY_PIECES + 1
    assert loaded.config.llm.pad_id == TINY_PIECES
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_vit_extra_block_dropped_with_info(lavis_files, tiny_cfg, caplog):
    with caplog.at_level(logging.INFO, logger="somelvlm"):
        SoMeLVLM.from_lavis(config=tiny_cfg, **lavis_files)
    assert any("dropped 1 unused ViT block(s) [2]" in r.getMessage() for r in caplog.records)


def test_vision_matches_hf(loaded, hf_ref, inputs):
    px = inputs[0]
    with torch.no_grad():
        ours = loaded.vision(px)
        vm = hf_ref.vision_model
        theirs = vm.encoder(vm.embeddings(px)).last_hidden_state
        assert ours.shape == (2, 17, 48)
        assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
        assert_close(loaded.encode_image(px), vm(px).last_hidden_state, atol=ATOL, rtol=RTOL)


def test_qformer_and_projection_match_hf(loaded, hf_ref, inputs):
    px, q_ids, q_mask, _ = inputs
    with torch.no_grad():
        image_embeds = loaded.encode_image(px)
        ours_q = loaded.qformer(loaded.query_tokens.expand(2, -1, -1), image_embeds, q_ids, q_mask)[:, :8]
        full_mask = torch.cat([torch.ones(2, 8, dtype=torch.long), q_mask], 1)
        theirs_q = hf_ref.qformer(input_ids=q_ids, attention_mask=full_mask,
                                  query_embeds=hf_ref.query_tokens.expand(2, -1, -1),
                                  encoder_hidden_states=image_embeds,
                                  encoder_attention_mask=torch.ones(2, 17, dtype=torch.long)).last_hidden_state[:, :8]
        assert_close(ours_q, theirs_q, atol=ATOL, rtol=RTOL)
        ours_p = loaded.query_embeds(image_embeds, q_ids, q_mask)
        assert ours_p.shape == (2, 8, 96)
        assert_close(ours_p, hf_ref.language_projection(theirs_q), atol=ATOL, rtol=RTOL)


def test_logits_and_loss_match_hf(loaded, hf_ref, inputs):
    px, q_ids, q_mask, ids = inputs
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        ours = loaded(pixel_values=px, input_ids=ids, attention_mask=torch.ones_like(ids),
                      qformer_input_ids=q_ids, qformer_attention_mask=q_mask, labels=labels)
        hf_labels = torch.cat([torch.full((2, 8), -100), labels], 1)
        theirs = hf_ref(pixel_values=px, qformer_input_ids=q_ids, qformer_attention_mask=q_mask,
                        input_ids=hf_input_ids(8, ids), labels=hf_labels)
    assert ours.logits.shape == (2, 8 + 7, TINY_PIECES + 1)
    assert_close(ours.logits, theirs.logits, atol=ATOL, rtol=RTOL)
    assert_close(ours.loss, theirs.loss, atol=ATOL, rtol=RTOL)


def test_pad_row_is_documented_value(loaded):
    from reference import documented_pad_rows

    emb, head = documented_pad_rows(96)
    # the row is appended in the LLM file dtype (fp16 here) and then loaded as fp32
    assert_close(loaded.llm.get_input_embeddings().weight[TINY_PIECES], emb.half().float(), atol=0, rtol=0)
    assert_close(loaded.llm.get_output_embeddings().weight[TINY_PIECES], head.half().float(), atol=0, rtol=0)


def test_left_padding_between_queries_and_prompt_is_invisible(loaded, inputs):
    px, q_ids, q_mask, ids = inputs
    short = ids[:1, :4]
    padded = torch.cat([torch.full((1, 3), TINY_PIECES), short], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        a = loaded(pixel_values=px[:1], input_ids=short, qformer_input_ids=q_ids[:1], qformer_attention_mask=q_mask[:1]).logits
        b = loaded(pixel_values=px[:1], input_ids=padded, attention_mask=mask, qformer_input_ids=q_ids[:1],
                   qformer_attention_mask=q_mask[:1]).logits
    assert_close(b[:, :8], a[:, :8], atol=ATOL, rtol=RTOL)
    assert_close(b[:, -4:], a[:, -4:], atol=ATOL, rtol=RTOL)


def test_exact_and_sdpa_paths_agree(lavis_files, tiny_cfg, inputs):
    px, q_ids, q_mask, ids = inputs
    sdpa = SoMeLVLM.from_lavis(config=tiny_cfg, **lavis_files)
    exact = SoMeLVLM.from_lavis(config=tiny_cfg.replace(attn_implementation="exact"), **lavis_files)
    assert exact.vision.blocks[0].attn.exact and not sdpa.vision.blocks[0].attn.exact
    with torch.no_grad():
        a = sdpa(pixel_values=px, input_ids=ids, qformer_input_ids=q_ids, qformer_attention_mask=q_mask).logits
        b = exact(pixel_values=px, input_ids=ids, qformer_input_ids=q_ids, qformer_attention_mask=q_mask).logits
    assert_close(a, b, atol=ATOL, rtol=RTOL)
    sdpa.set_attention("exact")
    with torch.no_grad():
        c = sdpa(pixel_values=px, input_ids=ids, qformer_input_ids=q_ids, qformer_attention_mask=q_mask).logits
    assert torch.equal(b, c)


def test_from_config_and_public_api():
    cfg = SoMeLVLMConfig.from_dict({"vision": {"image_size": 56, "patch_size": 14, "width": 48, "depth": 1,
                                               "heads": 4, "mlp_dim": 64},
                                    "qformer": {"hidden": 64, "layers": 2, "heads": 4, "ffn": 64,
                                                "num_queries": 8, "vocab_size": 30523}}).replace(
        llm=SoMeLVLMConfig.preset("tiny").llm)
    m = SoMeLVLM.from_config(cfg)
    for name in ("vision", "ln_vision", "qformer", "query_tokens", "proj", "llm"):
        assert hasattr(m, name)
    px = torch.randn(1, 3, 56, 56)
    assert m.vision(px).shape == (1, 17, 48)
    emb = m.encode_image(px)
    assert emb.dtype == torch.float32
    q = m.query_embeds(emb, torch.tensor([[101, 2000, 102]]), torch.ones(1, 3, dtype=torch.long))
    assert q.shape == (1, 8, 96)


def test_ln_vision_is_fp32_with_lavis_eps():
    m = SoMeLVLM.from_config("tiny")
    assert m.ln_vision.eps == 1e-5 and SoMeLVLMConfig.preset("vicuna7b").ln_vision_eps == 1e-5
    m.to(torch.bfloat16)
    x = torch.randn(1, 17, 48, dtype=torch.bfloat16)
    y = m.ln_vision(x)
    assert y.dtype == torch.float32
    ref = torch.nn.functional.layer_norm(x.float(), (48,), m.ln_vision.weight.float(), m.ln_vision.bias.float(), 1e-5)
    assert_close(y, ref, atol=0, rtol=0)


def test_image_token_constant_is_unused_in_prompts(inputs):
    assert not (inputs[3] == IMAGE_TOKEN).any()


def test_loss_without_full_logits_equals_full_loss(loaded, inputs):
    """`return_logits=False` (training) applies the LM head only where labels count: same loss, same grads."""
    px, q_ids, q_mask, ids = inputs
    labels = ids.clone()
    labels[:, :4] = -100
    batch = dict(pixel_values=px, input_ids=ids, qformer_input_ids=q_ids, qformer_attention_mask=q_mask, labels=labels)
    grads = []
    for full in (True, False):
        loaded.zero_grad()
        out = loaded(**batch, return_logits=full)
        assert (out.logits is None) == (not full)
        out.loss.backward()
        grads.append((out.loss.detach(), loaded.proj.weight.grad.clone(), loaded.query_tokens.grad.clone()))
    loaded.zero_grad()
    for a, b in zip(*grads):
        assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_frozen_llm_keeps_gradient_checkpointing_in_train_mode():
    from transformers.modeling_layers import GradientCheckpointingLayer

    m = SoMeLVLM.from_config("tiny")
    m.set_grad_checkpointing(vision=True, llm=True)
    m.train()
    assert not m.llm.training and not m.vision.training and m.qformer.training
    layers = [x for x in m.llm.modules() if isinstance(x, GradientCheckpointingLayer)]
    assert layers and all(x.training and x.gradient_checkpointing for x in layers)
    m.eval()
    assert not any(x.training for x in layers)


def test_query_embeds_with_shared_images_change_nothing(loaded):
    """Several prompts about one image share its cross-attention keys/values (and padding in the
    instruction batch is masked): each row equals its own unpadded computation."""
    tok = loaded.processor.qformer_tokenizer if loaded.processor else None
    from somelvlm.processing import QFormerTokenizer

    tok = tok or QFormerTokenizer()
    prompts = ["short", "a much longer instruction " * 12, "mid length question here?", "x", "y " * 30]
    ids, mask = tok(prompts)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 17, 48, generator=g)
    index = torch.tensor([0, 1, 0, 0, 1])
    with torch.no_grad():
        got = loaded.query_embeds(images, ids, mask, image_index=index)
        for r in range(len(prompts)):
            n = int(mask[r].sum())
            want = loaded.query_embeds(images[index[r]][None], ids[r:r + 1, :n], mask[r:r + 1, :n])
            assert_close(got[r:r + 1], want, atol=1e-5, rtol=1e-5)
