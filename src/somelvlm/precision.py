"""Precision policy: which dtype each parameter is stored and computed in.

One meaning of "auto" (and of `dtype=None`) everywhere: *as LAVIS does it on that device*.
- At load time (`from_pretrained`, `from_lavis`, `from_hf`, `--dtype` unset): fp32 on the CPU
  (LAVIS's `model.float()` reference; lossless for every folder `convert` writes) and fp16 on CUDA
  for the ViT and the LLM, with the connection module (`FP32_MODULES`) kept in fp32, as LAVIS's GPU
  set-up runs it (Q-Former and `llm_proj` outside autocast, `ln_vision` an fp32 LayerNorm).
- At conversion time (`convert --dtype auto`): store exactly the values LAVIS computes with in the
  fewest bytes (`lossless_dtype`), so that any load dtype can be chosen later without loss.
"""

from __future__ import annotations

import torch

from .config import VisionConfig
from .vision import FP16_ROUNDED

# The ~190M-parameter connection module stays fp32 when the model is loaded in half precision,
# as in LAVIS on GPU (Q-Former and llm_proj run outside autocast, ln_vision is an fp32 LayerNorm).
FP32_MODULES = ("ln_vision.", "qformer.", "query_tokens", "proj.")
HALF = (torch.float16, torch.bfloat16)
DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
               "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`torch.bfloat16`, "bf16", "fp16", "fp32" (and long names) -> a dtype; None and "auto" -> None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().replace("torch.", "")
    if name == "auto":
        return None
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, bf16, fp16, fp32") from None


def auto_dtype(device: str | torch.device | None) -> torch.dtype:
    """The compute dtype of a default ("auto") load: fp16 on CUDA (LAVIS's GPU set-up), else fp32."""
    return torch.float16 if device is not None and torch.device(device).type == "cuda" else torch.float32


def resolve_dtype(dtype: torch.dtype | str | None, device: str | torch.device | None) -> torch.dtype:
    """`dtype` if given, else `auto_dtype(device)`: the one rule every loader applies."""
    return parse_dtype(dtype) or auto_dtype(device)


def target_dtype(name: str, dtype: torch.dtype | None, keep_fp32: bool = True) -> torch.dtype | None:
    """The dtype parameter `name` is held in when the model is loaded as `dtype` (None: unchanged)."""
    if dtype is None:
        return None
    if keep_fp32 and dtype in HALF and name.startswith(FP32_MODULES):
        return torch.float32
    return dtype


def lossless_dtype(name: str, vision: VisionConfig) -> torch.dtype:
    """`convert --dtype auto`: the LLM and the ViT's conv/linear weights are fp16-valued (LAVIS loads
    them so), everything else is fp32."""
    if name.startswith("llm."):
        return torch.float16
    if vision.fp16_weights and name.startswith("vision.") and FP16_ROUNDED.match(name[len("vision."):]):
        return torch.float16
    return torch.float32
