"""The somelvlm model folder: everything inference and fine-tuning need, no LAVIS, no hub.

```
config.json                    SoMeLVLMConfig (versioned)
model.safetensors              or model-0000k-of-0000n.safetensors + model.safetensors.index.json (<= 5 GB each)
generation_config.json         LAVIS decoding defaults and special ids (bos/eos 2, pad 32000)
tokenizer.model, tokenizer_config.json, special_tokens_map.json     LLaMA SentencePiece + LAVIS's edits
qformer_tokenizer/vocab.txt    bert-base-uncased + [DEC]
processor_config.json          image size, normalisation, truncation lengths
```

Writing is atomic (a temporary sibling folder renamed at the end); loading builds the model on
the meta device and places each tensor, memory-mapped from safetensors, straight into its target
dtype and device.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import SoMeLVLMConfig
from .loading import assign_state_dict, empty_model, parse_dtype
from .model import target_dtype
from .processing import SoMeLVLMProcessor
from .weights import WeightsError, hf_weight_files

log = logging.getLogger("somelvlm")

MAX_SHARD_BYTES = 5 * 1024**3
INDEX_NAME = "model.safetensors.index.json"

GENERATION_DEFAULTS = {
    # LAVIS Blip2VicunaInstruct.generate defaults. max_length/min_length count LAVIS's dummy start
    # token (transformers 4.33 semantics): at most max_length - 1 = 255 new tokens.
    "num_beams": 5,
    "max_length": 256,
    "min_length": 1,
    "repetition_penalty": 1.5,
    "length_penalty": 1.0,
    "temperature": 1.0,
    "top_p": 0.9,
    "do_sample": False,
}


def generation_config(config: SoMeLVLMConfig) -> dict[str, Any]:
    llm = config.llm
    return {**GENERATION_DEFAULTS, "bos_token_id": llm.prompt_bos_id, "eos_token_id": llm.eos_id,
            "pad_token_id": llm.pad_id, "decoder_start_note": "LLM prompts start with id 2 ('</s>'), as in LAVIS"}


# ------------------------------------------------------------------------------------------------
# Atomic output folders
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_folder(folder: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `folder`, on error it is removed."""
    folder = Path(folder)
    if folder.exists() and not force:
        raise FileExistsError(f"{folder} already exists; pass force=True (--force) to overwrite it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, trash / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# Safetensors shards
# ------------------------------------------------------------------------------------------------
def plan_shards(sizes: dict[str, int], max_bytes: int = MAX_SHARD_BYTES) -> list[list[str]]:
    """Group tensor names (in order) into shards of at most `max_bytes` (a bigger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, n in sizes.items():
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    return shards


def save_safetensors(tensors: dict[str, torch.Tensor], folder: Path, max_bytes: int = MAX_SHARD_BYTES,
                     prefix: str = "model", metadata: dict[str, str] | None = None) -> list[Path]:
    """Write `tensors` as one file or as shards plus an index; returns the written files."""
    from safetensors.torch import save_file

    sizes = {k: v.numel() * v.element_size() for k, v in tensors.items()}
    shards = plan_shards(sizes, max_bytes)
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        path = folder / f"{prefix}.safetensors"
        save_file({k: tensors[k].contiguous() for k in shards[0]}, str(path), metadata=meta)
        return [path]
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        name = f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in names}, str(folder / name), metadata=meta)
        files.append(folder / name)
        weight_map.update({k: name for k in names})
    write_json(folder / f"{prefix}.safetensors.index.json",
               {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map})
    return files


def safetensors_files(folder: Path) -> list[Path]:
    return hf_weight_files(folder, ("safetensors",))


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, "Any", Path]]:
    """Yield `(name, slice-able handle, file)`; tensors are read lazily from the memory map."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as h:
                for k in h.keys():
                    yield k, h, f
        except WeightsError:
            raise
        except Exception as e:
            raise WeightsError(f"{f}: not a valid safetensors file (truncated or corrupt?): {e}") from None


# ------------------------------------------------------------------------------------------------
# Save
# ------------------------------------------------------------------------------------------------
def save_folder(model: Any, folder: str | Path, format: str = "somelvlm", force: bool = False,
                dtype: torch.dtype | str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    folder = Path(folder)
    if format == "hf":
        from .hf import save_hf

        return save_hf(model, folder, force=force, dtype=dtype)
    if format == "lavis":
        from .lavis import lavis_state_dict

        with atomic_folder(folder, force) as tmp:
            torch.save({"model": lavis_state_dict(model)}, tmp / "checkpoint.pth")
        return folder
    if format != "somelvlm":
        raise ValueError(f"format must be 'somelvlm', 'hf' or 'lavis', got {format!r}")
    dtype = parse_dtype(dtype)
    tensors = {}
    for k, v in model.state_dict().items():
        t = v.detach()
        want = target_dtype(k, dtype)
        tensors[k] = t.to("cpu", want or t.dtype)
    with atomic_folder(folder, force) as tmp:
        write_json(tmp / "config.json", model.config.to_dict())
        save_safetensors(tensors, tmp, max_shard_bytes)
        write_json(tmp / "generation_config.json", generation_config(model.config))
        if model.processor is not None:
            model.processor.save_pretrained(tmp)
        else:
            log.warning("saving a model without tokenizers: the folder cannot run generation")
    return folder


# ------------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------------
def load_folder(cls: type, folder: str | Path, dtype: torch.dtype | str | None = None,
                device: str | torch.device | None = None, device_map: Any = None) -> Any:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a somelvlm model folder (no config.json)")
    config = SoMeLVLMConfig.load(folder / "config.json")
    dtype = parse_dtype(dtype)
    processor = SoMeLVLMProcessor.from_pretrained(folder) if (folder / "tokenizer.model").is_file() else None
    model = empty_model(cls, config, processor)
    if device_map is not None and device is not None:
        raise ValueError("pass either device or device_map, not both")
    placement = resolve_device_map(model, device_map, dtype) if device_map is not None else None

    state: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for name, handle, f in iter_safetensors(safetensors_files(folder)):
        dev = _device_for(name, placement) if placement is not None else device
        t = handle.get_tensor(name)
        want = target_dtype(name, dtype) or t.dtype
        state[name] = t.to(device=dev or "cpu", dtype=want)
        origin[name] = str(f)
    # tensors are already in place; with a single device, assign_state_dict also moves the buffers
    assign_state_dict(model, state, dtype=None, device=device if placement is None else None, origin=origin)
    del state
    if placement is not None:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=placement)
    return model.eval()


NO_SPLIT = ["Block", "Layer", "LlamaDecoderLayer"]


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


def _device_for(name: str, placement: dict[str, Any]) -> Any:
    best, dev = -1, "cpu"
    for prefix, d in placement.items():
        if prefix == "" or name == prefix or name.startswith(prefix + "."):
            if len(prefix) > best:
                best, dev = len(prefix), d
    return dev
