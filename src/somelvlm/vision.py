"""EVA-ViT-g/14 exactly as LAVIS builds it for BLIP-2 / InstructBLIP (`lavis/models/eva_vit.py`).

Pre-LN blocks, fused qkv GEMM whose bias is `cat(q_bias, 0, v_bias)` (the k bias is a constant zero,
never a parameter), exact-erf GELU MLP, absolute position embedding including the CLS token, no
layer scale, no relative position bias and no final norm: the tower returns all tokens of the last
block. Parameter names are LAVIS's (= timm `Eva`'s), so the vision key map is the identity.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import VisionConfig


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.image_size = cfg.image_size
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {tuple(x.shape[-2:])}")
        x = self.proj(x)  # [B, C, H/p, W/p]
        return x.flatten(2).transpose(1, 2)  # [B, N, C], row-major over the patch grid


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig, exact: bool = False) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.head_dim = cfg.width // cfg.heads
        self.scale = self.head_dim**-0.5
        self.exact = exact  # LAVIS math (q * scale, matmul, softmax) instead of SDPA
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.width))
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)  # [B, N, 3C]
        q, k, v = qkv.reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, h, N, d]
        if self.exact:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # [B, h, N, N]
            out = attn.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(B, N, C)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.act = nn.GELU()  # exact erf GELU
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig, exact: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg, exact)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """EVA-ViT-g: `forward(pixel_values [B,3,S,S]) -> [B, 1 + (S/p)^2, width]` (CLS first, no final norm)."""

    def __init__(self, cfg: VisionConfig, exact: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg, exact) for _ in range(cfg.depth))
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm/EVA-style init; real weights always overwrite it."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for i, blk in enumerate(self.blocks):
            blk.attn.proj.weight.data.div_((2.0 * (i + 1)) ** 0.5)
            blk.mlp.fc2.weight.data.div_((2.0 * (i + 1)) ** 0.5)

    def set_exact_attention(self, exact: bool) -> None:
        for blk in self.blocks:
            blk.attn.exact = exact

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))  # [B, N, C]
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)  # [B, 1+N, C]
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x


# Tensor names (relative to the tower) that LAVIS's vit_precision="fp16" rounds: conv/linear only.
FP16_ROUNDED = re.compile(r"^(patch_embed\.proj\.(weight|bias)|blocks\.\d+\.(attn\.qkv\.weight|attn\.proj\.(weight|bias)"
                          r"|mlp\.fc[12]\.(weight|bias)))$")


def round_to_fp16(t: torch.Tensor) -> torch.Tensor:
    """`t.half()` values in `t`'s dtype (a no-op for fp16 tensors)."""
    return t if t.dtype == torch.float16 else t.half().to(t.dtype)


@torch.no_grad()
def round_weights_to_fp16_(module: nn.Module) -> nn.Module:
    """Round conv/linear weights and biases to fp16 values in place, keeping their dtype.

    This reproduces LAVIS `vit_precision="fp16"` (`convert_weights_to_fp16`): only Conv/Linear
    `.weight`/`.bias` are rounded; `cls_token`, `pos_embed`, `q_bias`, `v_bias` and LayerNorms keep
    full precision. Idempotent.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            for p in (m.weight, m.bias):
                if p is not None and p.device.type != "meta":
                    p.copy_(round_to_fp16(p))
    return module
