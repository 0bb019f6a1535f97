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
from .loading import Checkpoint
from .options import GENERATION_CONFIG, GenerationOptions
from .precision import parse_dtype, target_dtype
from .processing import SoMeLVLMProcessor
from .weights import WeightsError, hf_weight_files

log = logging.getLogger("somelvlm")

MAX_SHARD_BYTES = 5 * 1024**3
INDEX_NAME = "model.safetensors.index.json"


def generation_config(config: SoMeLVLMConfig, options: GenerationOptions | None = None) -> dict[str, Any]:
    """The `generation_config.json` of a folder: decoding options (LAVIS's by default) + the LLM's ids."""
    llm = config.llm
    return (options or GenerationOptions()).to_generation_config(eos_id=llm.eos_id, pad_id=llm.pad_id,
                                                                 bos_id=llm.prompt_bos_id)


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
    remove_stale(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders; the result gets normal permissions
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


def remove_stale(folder: Path) -> None:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` siblings left behind by a killed run writing `folder`."""
    for pattern in (f".{folder.name}.tmp-*", f".{folder.name}.old-*"):
        for stale in folder.parent.glob(pattern):
            if stale.is_dir():
                log.info("removing %s, left behind by an interrupted run", stale)
                shutil.rmtree(stale, ignore_errors=True)


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
def save_folder(model: Any, folder: str | Path, force: bool = False, dtype: torch.dtype | str | None = None,
                max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a somelvlm folder (see module doc); `dtype=None` keeps each tensor's dtype."""
    folder = Path(folder)
    if model.processor is None:
        raise ValueError("this model has no tokenizers, so its folder could not run generation; set "
                         "model.processor (e.g. SoMeLVLMProcessor.from_pretrained(llm_folder)) before saving")
    dtype = parse_dtype(dtype)
    tensors = {}
    for k, v in model.state_dict().items():
        t = v.detach()
        want = target_dtype(k, dtype) if t.is_floating_point() else None
        tensors[k] = t.to("cpu", want or t.dtype)
    options = getattr(model, "generation_options", None)
    with atomic_folder(folder, force) as tmp:
        write_json(tmp / "config.json", model.config.to_dict())
        save_safetensors(tensors, tmp, max_shard_bytes)
        write_json(tmp / GENERATION_CONFIG, generation_config(model.config, options))
        model.processor.save_pretrained(tmp)
    return folder


# ------------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------------
def read_folder(folder: str | Path) -> Checkpoint:
    """A somelvlm model folder as a `Checkpoint`: tensors are read lazily from the memory map."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a somelvlm model folder (no config.json)")
    config = SoMeLVLMConfig.load(folder / "config.json")
    processor = SoMeLVLMProcessor.from_pretrained(folder)
    files = safetensors_files(folder)

    def tensors() -> Iterator[tuple[str, torch.Tensor, str]]:
        for name, handle, f in iter_safetensors(files):
            yield name, handle.get_tensor(name), str(f)

    return Checkpoint(config, processor, tensors(), GenerationOptions.load(folder), allow_float64=False)
