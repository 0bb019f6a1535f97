"""Device names as users type them, checked before any model is loaded."""

from __future__ import annotations

import os
import shutil

import torch


def resolve_device(name: str | None) -> str:
    """`None` -> "cuda" when a usable GPU exists, else "cpu"; any other name is checked to be usable.

    Raises one clear ValueError (no torch traceback) for an unknown name, a CPU-only torch build,
    a GPU that torch cannot use (e.g. a driver too old for the installed CUDA build) or an index
    beyond the GPUs present."""
    if name is None or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device name (use cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(f"--device {name}: this torch {torch.__version__} is a CPU-only build; "
                             "install a CUDA build of torch or use --device cpu")
        if not torch.cuda.is_available():
            if _gpu_driver_present():
                raise ValueError(f"--device {name}: a GPU driver is present but torch {torch.__version__} "
                                 f"(built for CUDA {torch.version.cuda}) cannot use it; the driver may be too "
                                 "old for this build (see `nvidia-smi`), or use --device cpu")
            raise ValueError(f"--device {name}: no usable CUDA GPU on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible "
                             "(indices start at 0)")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return str(device)


def _gpu_driver_present() -> bool:
    return os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi") is not None
