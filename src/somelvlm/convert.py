"""One-command conversion of the released LAVIS files into a self-contained somelvlm folder.

By default (`dtype="auto"`) the folder stores exactly the values LAVIS computes with (fp16 where
LAVIS's are fp16-valued, fp32 elsewhere), so any dtype can be chosen at load time without loss.
The conversion streams: input files are memory-mapped and read one at a time, each tensor is
renamed (weights_map.json), fixed up (fp16 rounding of the ViT, the `[PAD]` row), cast, and written
straight to its place in a safetensors shard whose layout was planned from the model's shapes, so
peak memory stays near the largest input file. The output is written into a temporary folder and
renamed at the very end, then checked strictly (names and shapes of every written tensor) and
summarised (parameters per component, dtype, sha256 of each shard).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .hub import resolve_folder, resolve_vit
from .config import SoMeLVLMConfig
from .folder import INDEX_NAME, MAX_SHARD_BYTES, atomic_folder, generation_config, plan_shards, safetensors_files, write_json
from .lavis import LavisSources, make_processor
from .loading import check_dtype, drop_unknown, empty_model
from .model import SoMeLVLM
from .precision import lossless_dtype, parse_dtype, target_dtype
from .processing import SoMeLVLMProcessor
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
        kept = {"auto": "LLM and ViT conv/linear weights in fp16 (the values LAVIS uses), the rest in fp32",
                "bfloat16": "weights in bf16; ln_vision, Q-Former, query tokens and projection kept in fp32",
                "float16": "weights in fp16; ln_vision, Q-Former, query tokens and projection kept in fp32"}
        lines = [f"wrote {self.folder} ({self.bytes / 1e9:.2f} GB; {kept.get(self.dtype, f'weights in {self.dtype}')})"]
        lines.append("parameters:")
        for k, v in self.params.items():
            lines.append(f"  {k:<13}{v:>15,}")
        lines.append("files (sha256):")
        for k, v in self.files.items():
            lines.append(f"  {k}  {v}")
        return "\n".join(lines)


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


class StreamingShardWriter:
    """Write safetensors shards whose layout is planned up front, so each tensor goes to disk as
    soon as it arrives, in any order: memory holds one tensor at a time, never a whole shard."""

    def __init__(self, folder: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], max_bytes: int) -> None:
        sizes = {k: math.prod(shape) * dtype.itemsize for k, (shape, dtype) in sorted(specs.items())}
        groups = plan_shards(sizes, max_bytes)
        n = len(groups)
        self.specs = specs
        self.where: dict[str, tuple[Path, int]] = {}
        self.files: list[Path] = []
        self.written: set[str] = set()
        for i, names in enumerate(groups):
            path = folder / ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name in names:
                shape, dtype = specs[name]
                header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                                "data_offsets": [offset, offset + sizes[name]]}
                offset += sizes[name]
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            start = 8 + len(blob)
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(blob)) + blob)
                f.truncate(start + offset)
            for name in names:
                self.where[name] = (path, start + header[name]["data_offsets"][0])
            self.files.append(path)
        if n > 1:
            write_json(folder / INDEX_NAME, {"metadata": {"total_size": sum(sizes.values())},
                                             "weight_map": {k: self.where[k][0].name for k in sorted(sizes)}})

    def put(self, name: str, t: torch.Tensor) -> None:
        shape, dtype = self.specs[name]
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise ValueError(f"{name}: got {tuple(t.shape)} {t.dtype}, planned {tuple(shape)} {dtype}")
        path, offset = self.where[name]
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(t.detach().contiguous().view(torch.uint8).reshape(-1).numpy().data)
        self.written.add(name)

    def missing(self) -> list[str]:
        return sorted(set(self.specs) - self.written)


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_folder(folder: Path) -> dict[str, int]:
    """Strictly check the written folder against the model it describes; returns params per component."""
    from safetensors import safe_open

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
    checkpoint: str | Path | list[str | Path],
    vit: str | Path | None,
    llm: str | Path,
    out: str | Path,
    dtype: torch.dtype | str | None = "auto",
    qformer_tokenizer: str | Path | None = None,
    config: SoMeLVLMConfig | None = None,
    force: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = True,
    strict: bool = False,
) -> ConversionSummary:
    """LAVIS `checkpoint.pth` (or `[base, finetuned]`) + `eva_vit_g.pth` (a path or URL; None: LAVIS's
    URL) + HF LLaMA folder (or Hub id) -> somelvlm folder (see module doc and `SoMeLVLM.from_lavis`)."""
    from tqdm.auto import tqdm

    out = Path(out)
    if out.exists() and not force:  # before any download
        raise FileExistsError(f"{out} already exists; pass force=True (--force) to overwrite it")
    vit_file = resolve_vit(vit)
    src = LavisSources.open(checkpoint, vit_file, resolve_folder(llm, "LLM folder"), config)
    expected = {k: v.shape for k, v in empty_model(SoMeLVLM, src.config).state_dict().items()}
    if dtype in (None, "auto"):
        specs = {k: (tuple(shape), lossless_dtype(k, src.config.vision)) for k, shape in expected.items()}
        dtype_name = "auto"
    else:
        dtype = parse_dtype(dtype)
        specs = {k: (tuple(shape), target_dtype(k, dtype)) for k, shape in expected.items()}
        dtype_name = str(dtype).replace("torch.", "")
    with atomic_folder(out, force) as tmp:
        writer = StreamingShardWriter(tmp, specs, max_shard_bytes)
        seen: dict[str, torch.Tensor] = {}
        origin: dict[str, str] = {}
        with tqdm(total=len(expected), unit="tensor", desc="converting", disable=not progress) as bar:
            for name, t, f in src.tensors():
                if name in specs and tuple(t.shape) == specs[name][0]:
                    check_dtype(name, t, specs[name][1].is_floating_point, str(f), allow_float64=True)
                    writer.put(name, t.to(specs[name][1]))
                seen[name] = torch.empty(t.shape, device="meta")
                origin[name] = str(f)
                bar.update(1)
        drop_unknown(expected, seen, origin, {str(src.vit)}, strict)
        check_state_dict(expected, seen, origin)
        if writer.missing():  # cannot happen after the check above; never leave a hole in a shard
            raise RuntimeError(f"tensors not written: {writer.missing()[:10]}")
        write_json(tmp / "config.json", src.config.to_dict())
        write_json(tmp / "generation_config.json", generation_config(src.config))
        make_processor(src, qformer_tokenizer).save_pretrained(tmp)
        params = verify_folder(tmp)
        files = {p.name: sha256(p) for p in sorted(tmp.glob("*.safetensors"))}
        total = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    return ConversionSummary(out, dtype_name, params, files, total)

