"""One-command conversion of the released LAVIS files into a self-contained somelvlm folder.

The conversion streams: input files are memory-mapped and read one at a time, each tensor is
renamed (weights_map.json), fixed up (fp16 rounding of the ViT, the `[PAD]` row), cast, and
collected into an output shard that is flushed at 5 GB, so peak memory stays near the largest
input file. The output is written into a temporary folder and renamed at the very end, then
checked strictly (names, shapes, dtypes of every written tensor) and summarised.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import SoMeLVLMConfig
from .folder import INDEX_NAME, MAX_SHARD_BYTES, atomic_folder, generation_config, write_json
from .lavis import LavisSources, make_processor
from .loading import empty_model, parse_dtype
from .model import SoMeLVLM, target_dtype
from .weights import check_state_dict

log = logging.getLogger("somelvlm")

COMPONENTS = ("vision", "ln_vision", "qformer", "query_tokens", "proj", "llm")


@dataclass
class ConversionSummary:
    folder: Path
    dtype: str
    params: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # name -> sha256
    bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"folder": str(self.folder), "dtype": self.dtype, "params": self.params, "files": self.files,
                "bytes": self.bytes}

    def __str__(self) -> str:
        lines = [f"wrote {self.folder} ({self.bytes / 1e9:.2f} GB, weights in {self.dtype}; "
                 "ln_vision, Q-Former, query tokens and projection kept in fp32)" if self.dtype in ("bfloat16", "float16")
                 else f"wrote {self.folder} ({self.bytes / 1e9:.2f} GB, weights in {self.dtype})"]
        lines.append("parameters:")
        for k, v in self.params.items():
            lines.append(f"  {k:<13}{v:>15,}")
        lines.append("files (sha256):")
        for k, v in self.files.items():
            lines.append(f"  {k}  {v}")
        return "\n".join(lines)


class _ShardWriter:
    """Collect tensors and flush them to numbered safetensors shards of at most `max_bytes`."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + n > self.max_bytes:
            self.flush()
        self.pending[name] = t.contiguous()
        self.pending_bytes += n

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        path = self.folder / f"part-{len(self.parts):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.parts.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Give the shards their final names (and write the index when there are several)."""
        self.flush()
        n = len(self.parts)
        if n == 1:
            final = self.folder / "model.safetensors"
            os.replace(self.parts[0][0], final)
            return [final]
        files, weight_map = [], {}
        for i, (path, names) in enumerate(self.parts):
            final = self.folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, final)
            files.append(final)
            weight_map.update({k: final.name for k in names})
        total = sum(f.stat().st_size for f in files)
        write_json(self.folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        return files


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_folder(folder: Path) -> dict[str, int]:
    """Strictly check the written folder against the model it describes; returns params per component."""
    from safetensors import safe_open

    from .folder import safetensors_files
    from .processing import SoMeLVLMProcessor

    config = SoMeLVLMConfig.load(folder / "config.json")
    SoMeLVLMProcessor.from_pretrained(folder)  # tokenizers load
    model = empty_model(SoMeLVLM, config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    got: dict[str, torch.Tensor] = {}
    for f in safetensors_files(folder):
        with safe_open(str(f), framework="pt", device="cpu") as h:  # reads headers only
            for k in h.keys():
                got[k] = torch.empty(h.get_slice(k).get_shape(), device="meta")
    check_state_dict(expected, got, what=f"model described by {folder / 'config.json'}")
    params = {c: 0 for c in COMPONENTS}
    for k, t in got.items():
        params[k.split(".")[0]] += t.numel()
    params["total"] = sum(params.values())
    return params


def convert_lavis(
    checkpoint: str | Path,
    vit: str | Path,
    llm: str | Path,
    out: str | Path,
    dtype: torch.dtype | str | None = "bf16",
    qformer_tokenizer: str | Path | None = None,
    config: SoMeLVLMConfig | None = None,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = True,
) -> ConversionSummary:
    """LAVIS `checkpoint.pth` + `eva_vit_g.pth` + HF LLaMA folder -> somelvlm folder (see module doc)."""
    from tqdm.auto import tqdm

    dtype = parse_dtype(dtype) or torch.float32
    src = LavisSources.open(checkpoint, vit, llm, config)
    out = Path(out)
    expected = {k: v.shape for k, v in empty_model(SoMeLVLM, src.config).state_dict().items()}
    with atomic_folder(out, force) as tmp:
        writer = _ShardWriter(tmp, max_shard_bytes)
        seen: dict[str, torch.Tensor] = {}
        origin: dict[str, str] = {}
        bar = tqdm(total=len(expected), unit="tensor", desc="converting", disable=not progress)
        for name, t, f in src.tensors():
            want = target_dtype(name, dtype) or t.dtype
            if name in expected and tuple(t.shape) == tuple(expected[name]):
                writer.add(name, t.to(want))
            seen[name] = torch.empty(t.shape, device="meta")
            origin[name] = str(f)
            bar.update(1)
        bar.close()
        check_state_dict(expected, seen, origin)
        writer.finish()
        write_json(tmp / "config.json", src.config.to_dict())
        write_json(tmp / "generation_config.json", generation_config(src.config))
        make_processor(src, qformer_tokenizer).save_pretrained(tmp)
        params = verify_folder(tmp)
        files = {p.name: sha256(p) for p in sorted(tmp.glob("*.safetensors"))}
        total = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    return ConversionSummary(out, str(dtype).replace("torch.", ""), params, files, total)

