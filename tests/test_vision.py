"""The vision tower against timm's Eva (same math, independent code) and its numerics switches."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from somelvlm.config import VisionConfig
from somelvlm.vision import FP16_ROUNDED, VisionTransformer, round_weights_to_fp16_

CFG = VisionConfig(image_size=56, patch_size=14, width=48, depth=3, heads=4, mlp_dim=128)


def timm_eva(cfg: VisionConfig):
    timm_eva_mod = pytest.importorskip("timm.models.eva", reason="timm is not installed")
    return timm_eva_mod.Eva(
        img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width, depth=cfg.depth,
        num_heads=cfg.heads, mlp_ratio=cfg.mlp_dim / cfg.width, qkv_bias=True, qkv_fused=True,
        num_classes=0, global_pool="", use_post_transformer_norm=False, use_fc_norm=False,
        use_abs_pos_emb=True, use_rot_pos_emb=False, init_values=None,
    ).eval()


@pytest.fixture(scope="module")
def ours():
    torch.manual_seed(0)
    m = VisionTransformer(CFG).eval()
    with torch.no_grad():  # non-trivial biases everywhere
        for p in m.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return m


def test_matches_timm_eva_strict_load(ours):
    eva = timm_eva(CFG)
    missing, unexpected = eva.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = eva.forward_features(x)
        assert ref.shape == (2, 17, 48)
        assert_close(ours(x), ref, atol=1e-5, rtol=1e-5)
        # timm's non-fused path is LAVIS's math; ours in exact mode must be bitwise equal to it
        for blk in eva.blocks:
            blk.attn.fused_attn = False
        ours.set_exact_attention(True)
        try:
            assert torch.equal(ours(x), eva.forward_features(x))
        finally:
            ours.set_exact_attention(False)


def test_sdpa_and_exact_agree(ours):
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        a = ours(x)
        ours.set_exact_attention(True)
        b = ours(x)
        ours.set_exact_attention(False)
    assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_exact_attention_is_lavis_formula(ours):
    """LAVIS: q * head_dim**-0.5 before q @ k^T, softmax, @ v, fused qkv with cat(q_bias, 0, v_bias)."""
    attn = ours.blocks[0].attn
    attn.exact = True
    x = torch.randn(1, 17, 48)
    with torch.no_grad():
        bias = torch.cat([attn.q_bias, torch.zeros(48), attn.v_bias])
        qkv = (x @ attn.qkv.weight.T + bias).reshape(1, 17, 3, 4, 12).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * 12**-0.5, qkv[1], qkv[2]
        ref = ((q @ k.transpose(-2, -1)).softmax(-1) @ v).transpose(1, 2).reshape(1, 17, 48)
        ref = ref @ attn.proj.weight.T + attn.proj.bias
        assert torch.equal(attn(x), ref)
    attn.exact = False


def test_no_k_bias_parameter_and_all_tokens_out(ours):
    names = dict(ours.named_parameters())
    assert "blocks.0.attn.q_bias" in names and "blocks.0.attn.v_bias" in names
    assert not any("k_bias" in n for n in names) and not list(ours.buffers())
    assert not any(n.startswith(("norm.", "fc_norm.", "head.")) for n in names)


def test_fp16_rounding_reproduces_half_float():
    torch.manual_seed(1)
    m = VisionTransformer(CFG)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    round_weights_to_fp16_(m)
    after = m.state_dict()
    rounded = set()
    for k, v in after.items():
        if FP16_ROUNDED.match(k):
            rounded.add(k)
            assert torch.equal(v, before[k].half().float()), k
            assert v.dtype == torch.float32
        else:
            assert torch.equal(v, before[k]), k  # cls_token, pos_embed, q/v bias, LayerNorms untouched
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.2.mlp.fc2.bias"} <= rounded
    assert not any("q_bias" in k or "norm" in k for k in rounded)
    assert not torch.equal(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])
    round_weights_to_fp16_(m)  # idempotent
    assert all(torch.equal(m.state_dict()[k], after[k]) for k in after)


def test_grad_checkpointing_same_grads(ours):
    x = torch.randn(1, 3, 56, 56)
    m = VisionTransformer(CFG)
    m.load_state_dict(ours.state_dict())
    m.train()
    m(x).square().mean().backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).square().mean().backward()
    for a, p in zip(g1, m.parameters()):
        assert_close(p.grad, a, atol=1e-6, rtol=1e-5)


def test_wrong_image_size_is_a_clear_error(ours):
    with pytest.raises(ValueError, match="expected 56x56 images"):
        ours(torch.randn(1, 3, 64, 64))
