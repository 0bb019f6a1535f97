"""Build a model without allocating its weights, then place loaded tensors straight into it.

Parameters are created on the meta device (buffers stay real, so e.g. LLaMA's rotary `inv_freq`
needs no re-creation); each loaded tensor is cast to its target dtype and device one at a time and
assigned, so no full-precision copy of a half-precision model ever exists in memory.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from .config import SoMeLVLMConfig
from .weights import check_state_dict

log = logging.getLogger("somelvlm")


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`torch.bfloat16`, "bf16", "bfloat16", "fp16", "float16", "fp32", "float32" or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    try:
        return names[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32") from None


def empty_model(cls: type, config: SoMeLVLMConfig, processor: Any = None):
    """`cls(config)` with parameters on the meta device (no memory), buffers real on the CPU."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = cls(config, processor)
    return model


def assign_state_dict(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    origin: Mapping[str, str] | None = None,
    keep_fp32: bool = True,
) -> torch.nn.Module:
    """Strictly check `state_dict` against `model`, then assign each tensor in its target dtype/device."""
    from .model import target_dtype

    expected = {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}
    check_state_dict(expected, state_dict, origin)
    device = torch.device(device) if device is not None else None
    placed: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        want = target_dtype(name, dtype, keep_fp32) or t.dtype
        placed[name] = t.to(device=device or t.device, dtype=want)
    model.load_state_dict(placed, strict=True, assign=True)
    # buffers were created for real on the CPU; move them along with the weights
    if device is not None:
        for mod in model.modules():
            for bname, buf in list(mod._buffers.items()):
                if buf is not None and buf.device != device:
                    mod._buffers[bname] = buf.to(device)
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise RuntimeError(f"parameters left unloaded on the meta device: {meta[:10]}")
    return model
