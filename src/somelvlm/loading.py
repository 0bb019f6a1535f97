"""The one loading path: a source yields named tensors, the model is built on the meta device, and
each tensor is checked, cast to its target dtype and device one at a time, and assigned.

Sources (`folder.read_folder`, `lavis.read_lavis`, `hf.read_hf`) return a `Checkpoint`: the config,
the processor, the decoding defaults and a (lazy) stream of `(our_name, tensor, file)`. They never
import the model; `SoMeLVLM.from_*` passes its class to `materialize`. Parameters are created on the
meta device (buffers stay real, so e.g. LLaMA's rotary `inv_freq` needs no re-creation), so no
full-precision copy of a half-precision model ever exists in memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from .config import SoMeLVLMConfig
from .options import GenerationOptions
from .precision import resolve_dtype, target_dtype
from .processing import SoMeLVLMProcessor
from .weights import WeightsError, check_state_dict

log = logging.getLogger("somelvlm")

NO_SPLIT = ["Block", "Layer", "LlamaDecoderLayer"]


@dataclass
class Checkpoint:
    """What a source hands to `materialize`."""

    config: SoMeLVLMConfig
    processor: SoMeLVLMProcessor | None
    tensors: Iterable[tuple[str, torch.Tensor, str]]  # (our name, tensor, file it came from)
    generation_options: GenerationOptions = field(default_factory=GenerationOptions)
    # files whose keys the model lacks are dropped with a log line (LAVIS loads them strict=False)
    lenient: frozenset[str] = frozenset()
    # somelvlm folders only ever hold fp32/fp16/bf16; float64 there means a foreign or damaged file
    allow_float64: bool = True


def empty_model(cls: type, config: SoMeLVLMConfig, processor: Any = None):
    """`cls(config)` with parameters on the meta device (no memory), buffers real on the CPU."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = cls(config, processor)
    return model


def drop_unknown(expected: Iterable[str], got: dict[str, Any], origin: Mapping[str, str],
                 lenient: Iterable[str], strict: bool = False) -> None:
    """Remove (in place) keys the model lacks that come from a `lenient` file, with one log line per
    file naming them, as LAVIS's `strict=False` load ignores them. `strict=True` keeps them (-> error)."""
    lenient = set(lenient)
    if strict or not lenient:
        return
    unknown = sorted(set(got) - set(expected))
    by_file: dict[str, list[str]] = {}
    for k in unknown:
        if origin.get(k) in lenient:
            by_file.setdefault(origin[k], []).append(k)
            del got[k]
    for f, keys in by_file.items():
        shown = ", ".join(keys[:12]) + (f" ... ({len(keys)} in all)" if len(keys) > 12 else "")
        log.info("%s: ignored %d key(s) the model does not have, as LAVIS does: %s (strict=True / --strict "
                 "makes this an error)", f, len(keys), shown)


def check_dtype(name: str, t: torch.Tensor, want_float: bool, origin: str, allow_float64: bool) -> None:
    """One clear error for a tensor whose dtype cannot hold the parameter (e.g. int/bool for a weight)."""
    if want_float and not t.is_floating_point():
        raise WeightsError(f"{origin}: {name} is stored as {t.dtype}, but the model needs floating-point values")
    if not want_float and t.is_floating_point():
        raise WeightsError(f"{origin}: {name} is stored as {t.dtype}, but the model needs integers")
    if t.dtype == torch.float64 and not allow_float64:
        raise WeightsError(f"{origin}: {name} is stored as float64; somelvlm folders hold fp32/fp16/bf16 "
                           "(was the file written by another tool?)")


def all_finite(t: torch.Tensor, chunk: int = 1 << 16) -> bool:
    """No inf/nan in `t`, checked in chunks so the check never holds a tensor-sized temporary."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def materialize(cls: type, ckpt: Checkpoint, dtype: torch.dtype | str | None = None,
                device: str | torch.device | None = None, device_map: Any = None, strict: bool = False) -> Any:
    """Build `cls` from `ckpt` in eval mode. `dtype=None` is the device's default (`precision`):
    fp32 on the CPU, fp16 on CUDA; the connection module stays fp32 for half precision."""
    if device_map is not None and device is not None:
        raise ValueError("pass either device or device_map, not both")
    model = empty_model(cls, ckpt.config, ckpt.processor)
    compute = resolve_dtype(dtype, device if device_map is None else _main_device(device_map))
    placement = resolve_device_map(model, device_map, compute) if device_map is not None else None
    params = model.state_dict(keep_vars=True)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    non_finite: list[str] = []
    for name, t, f in ckpt.tensors:
        origin[name] = str(f)
        if name in params:
            check_dtype(name, t, params[name].is_floating_point(), str(f), ckpt.allow_float64)
        dev = _device_for(name, placement) if placement is not None else device
        want = target_dtype(name, compute) if t.is_floating_point() else None
        t = t.to(device=dev or "cpu", dtype=want or t.dtype)
        if t.is_floating_point() and not all_finite(t):
            non_finite.append(f"{name} (from {f})")
        state[name] = t
    if non_finite:
        log.warning("non-finite values (inf/nan) in %d tensor(s): %s", len(non_finite), ", ".join(non_finite[:10]))
    drop_unknown(params, state, origin, ckpt.lenient, strict)
    assign_state_dict(model, state, device=device if placement is None else None, origin=origin)
    del state
    model.generation_options = ckpt.generation_options
    if placement is not None:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=placement)
    return model.eval()


def assign_state_dict(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                      device: str | torch.device | None = None, origin: Mapping[str, str] | None = None
                      ) -> torch.nn.Module:
    """Strictly check `state_dict` (names, shapes) against `model`, then assign its tensors as they are."""
    expected = {k: v.shape for k, v in model.state_dict(keep_vars=True).items()}
    check_state_dict(expected, state_dict, origin)
    model.load_state_dict(state_dict, strict=True, assign=True)
    # buffers were created for real on the CPU; move them along with the weights
    if device is not None:
        device = torch.device(device)
        for mod in model.modules():
            for bname, buf in list(mod._buffers.items()):
                if buf is not None and buf.device != device:
                    mod._buffers[bname] = buf.to(device)
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise RuntimeError(f"parameters left unloaded on the meta device: {meta[:10]}")
    return model


# ------------------------------------------------------------------------------------------------
# Device maps
# ------------------------------------------------------------------------------------------------
def resolve_device_map(model: Any, device_map: Any, dtype: torch.dtype | None) -> dict[str, Any]:
    """A module -> device dict from "auto" / "balanced" / "sequential" / a device name / a dict."""
    if isinstance(device_map, dict):
        return device_map
    if isinstance(device_map, (str, torch.device)) and str(device_map) not in ("auto", "balanced",
                                                                               "balanced_low_0", "sequential"):
        return {"": str(device_map)}
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    kwargs: dict[str, Any] = {"no_split_module_classes": NO_SPLIT, "dtype": dtype}
    if device_map != "sequential":
        kwargs["max_memory"] = get_balanced_memory(model, low_zero=device_map == "balanced_low_0", **kwargs)
    placement = infer_auto_device_map(model, **kwargs)
    if any(d == "disk" for d in placement.values()):
        raise ValueError("the model does not fit in GPU + CPU memory; disk offload is not supported")
    return placement


def _main_device(device_map: Any) -> str:
    """"cuda" when a device map places anything on a GPU (or plans to: "auto" with CUDA), else "cpu"."""
    if isinstance(device_map, dict):
        devices = [str(d) for d in device_map.values()]
        return "cuda" if any(d.isdigit() or d.startswith("cuda") for d in devices) else "cpu"
    name = str(device_map)
    if name in ("auto", "balanced", "balanced_low_0", "sequential"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name.isdigit() or name.startswith("cuda") else "cpu"


def _device_for(name: str, placement: dict[str, Any]) -> Any:
    best, dev = -1, "cpu"
    for prefix, d in placement.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if len(prefix) > best:
                best, dev = len(prefix), d
    return dev
