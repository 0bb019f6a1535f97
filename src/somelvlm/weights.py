"""Reading weight files safely, and the declarative key map (`weights_map.json`).

Everything here is about *names and files*, never about modules: `WeightMap` is a pure function
from one state dict to another (with an exact inverse), the readers return plain dicts of tensors,
and `check_state_dict` reports every missing, unexpected or mis-shaped key by name and file.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

log = logging.getLogger("somelvlm")

Tensor = torch.Tensor
StateDict = dict[str, Tensor]


class WeightsError(ValueError):
    """A weight file cannot be used: unreadable, unsafe, or not matching the model."""


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def load_file(path: str | Path, mmap: bool = True) -> dict[str, Any]:
    """Load a `.safetensors` file or a torch pickle with `weights_only=True` (never runs code)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as load_st

        try:
            return load_st(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise WeightsError(f"{path}: not a valid safetensors file (truncated or corrupt?): {e}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
        what = f" (it references {found.group(1)})" if found else ""
        raise WeightsError(
            f"{path}: refused to load: it contains pickled objects that are not plain tensors/containers{what}; "
            "somelvlm reads weights with torch.load(weights_only=True), which never executes code. "
            "Re-save the file as a plain state dict, or convert it to safetensors."
        ) from None
    except RuntimeError as e:
        msg = str(e)
        if mmap and "mmap" in msg.lower():  # legacy (non-zip) pickles cannot be memory-mapped
            return load_file(path, mmap=False)
        raise WeightsError(f"{path}: cannot read (truncated or corrupt file?): {msg.splitlines()[0]}") from None
    except (EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise WeightsError(f"{path}: cannot read (truncated or corrupt file?): {e}") from None


def unwrap_checkpoint(obj: Any, path: str | Path) -> StateDict:
    """Accept a LAVIS training checkpoint `{"model": sd, "optimizer": ..., ...}` or a bare state dict."""
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict or a {{'model': state_dict}} checkpoint, got {type(obj)}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"{path}: not a state dict: entries {bad[:8]} are not tensors "
            f"(a LAVIS checkpoint keeps its weights under the key 'model')"
        )
    return dict(obj)


def hf_weight_files(folder: str | Path, formats: tuple[str, ...] = ("safetensors", "bin")) -> list[Path]:
    """The weight files of a Hugging Face style folder: a sharded index or a single file, of the given
    formats (`model.safetensors[.index.json]`, `pytorch_model.bin[.index.json]`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a folder")
    names = {"safetensors": "model.safetensors", "bin": "pytorch_model.bin"}
    for fmt in formats:
        index = folder / f"{names[fmt]}.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                raise WeightsError(f"{index}: not a valid index file ({type(e).__name__}: {e})") from None
            # lexical check: a Hub cache's files are symlinks into blobs/, which is fine
            outside = [f for f in files if not isinstance(f, str) or Path(f).is_absolute() or ".." in Path(f).parts]
            if outside:
                raise WeightsError(f"{index}: weight_map entries {outside[:5]} point outside {folder}; refused")
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise WeightsError(f"{index} names shard(s) {missing} that are missing from {folder}")
            return [folder / f for f in files]
    for fmt in formats:
        if (folder / names[fmt]).is_file():
            return [folder / names[fmt]]
    wanted = " or ".join(f"{names[f]} (or a sharded index)" for f in formats)
    raise WeightsError(f"{folder}: no weights found (expected {wanted})")


def iter_hf_weights(folder: str | Path) -> Iterator[tuple[str, Tensor, Path]]:
    """Yield `(key, tensor, file)` for every tensor of a Hugging Face model folder, file by file."""
    for f in hf_weight_files(folder):
        sd = load_file(f)
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                raise WeightsError(f"{f}: entry {k!r} is not a tensor")
            yield k, v, f


# ------------------------------------------------------------------------------------------------
# Key map
# ------------------------------------------------------------------------------------------------
def _pattern(p: str) -> re.Pattern[str]:
    rx = re.escape(p).replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile("^" + rx + ("" if p.endswith(".") else "$"))


@dataclass(frozen=True)
class _Rename:
    src: str
    dst: str

    def apply(self, key: str) -> str | None:
        m = _pattern(self.src).match(key)
        if m is None:
            return None
        dst = self.dst.replace("{i}", m.group("i")) if "{i}" in self.dst else self.dst
        return dst + key[m.end():]


class WeightMap:
    """One direction-aware rule set of `weights_map.json` (e.g. `WeightMap.load("lavis")`).

    `to_ours(sd)` maps external names to ours; `from_ours(sd)` is its exact inverse.
    Both are pure: they return new dicts and never modify tensors (splits return views/clones).
    """

    def __init__(self, rules: Mapping[str, Any], name: str = "") -> None:
        self.name = name
        self.renames = [_Rename(a, b) for a, b in rules.get("rename", [])]
        self.splits = [(s["from"], list(s["into"])) for s in rules.get("split", [])]
        self.ignore = [_pattern(p) for p in rules.get("ignore", [])]

    @classmethod
    def load(cls, name: str, path: str | Path | None = None) -> "WeightMap":
        if path is None:
            text = resources.files("somelvlm").joinpath("weights_map.json").read_text()
        else:
            text = Path(path).read_text()
        data = json.loads(text)
        if name not in data:
            raise KeyError(f"weights_map.json has no rule set {name!r}; it has {sorted(k for k in data if k not in ('format', 'doc'))}")
        return cls(data[name], name)

    # -- single keys ----------------------------------------------------------------------------
    def is_ignored(self, external_key: str) -> bool:
        return any(p.match(external_key) for p in self.ignore)

    def key_to_ours(self, key: str) -> str:
        for r in self.renames:
            out = r.apply(key)
            if out is not None:
                return out
        return key

    def key_from_ours(self, key: str) -> str:
        for r in self.renames:
            out = _Rename(r.dst, r.src).apply(key)
            if out is not None:
                return out
        return key

    # -- whole state dicts -----------------------------------------------------------------------
    def to_ours(self, sd: Mapping[str, Tensor], drop_ignored: bool = True) -> StateDict:
        out: StateDict = {}
        for k, v in sd.items():
            if drop_ignored and self.is_ignored(k):
                continue
            split = self._split_for(k)
            if split is not None:
                out.update(split(v))
                continue
            out[self.key_to_ours(k)] = v
        return out

    def from_ours(self, sd: Mapping[str, Tensor]) -> StateDict:
        out: StateDict = {}
        fused: dict[str, dict[int, Tensor]] = {}
        fuse_meta: dict[str, list[str | None]] = {}
        for k, v in sd.items():
            hit = self._fuse_target(k)
            if hit is not None:
                target, part, parts = hit
                fused.setdefault(target, {})[part] = v
                fuse_meta[target] = parts
                continue
            out[self.key_from_ours(k)] = v
        for target, pieces in fused.items():
            parts = fuse_meta[target]
            present = [p for p in pieces.values()]
            tensors = []
            for j, name in enumerate(parts):
                if name is None:
                    tensors.append(torch.zeros_like(present[0]))
                elif j in pieces:
                    tensors.append(pieces[j])
                else:
                    raise WeightsError(f"cannot build {target!r}: its part {name!r} is missing")
            out[target] = torch.cat(tensors, dim=0)
        return out

    # -- splits ----------------------------------------------------------------------------------
    def _split_for(self, key: str):
        for src, into in self.splits:
            m = _pattern(src).match(key)
            if m is None:
                continue
            idx = m.groupdict().get("i")
            names = [n.replace("{i}", idx) if (n is not None and idx is not None) else n for n in into]

            def split(t: Tensor, names: list[str | None] = names, key: str = key) -> StateDict:
                if t.shape[0] % len(names):
                    raise WeightsError(f"{key}: size {t.shape[0]} cannot be split into {len(names)} equal parts")
                chunks = t.chunk(len(names), dim=0)
                res: StateDict = {}
                for name, c in zip(names, chunks):
                    if name is None:
                        if c.device.type != "meta" and bool(c.ne(0).any()):
                            raise WeightsError(
                                f"{key}: the part that must be zero is not (max |value| "
                                f"{c.abs().max().item():.3g}); this model has no parameter for it "
                                "(EVA-ViT has no k bias)"
                            )
                        continue
                    res[name] = c.clone()
                return res

            return split
        return None

    def _fuse_target(self, our_key: str) -> tuple[str, int, list[str | None]] | None:
        for src, into in self.splits:
            for j, name in enumerate(into):
                if name is None:
                    continue
                m = _pattern(name).match(our_key)
                if m is not None:
                    idx = m.groupdict().get("i")
                    target = src.replace("{i}", idx) if idx is not None else src
                    parts = [n.replace("{i}", idx) if (n and idx is not None) else n for n in into]
                    return target, j, parts
        return None


# ------------------------------------------------------------------------------------------------
# Strict checks
# ------------------------------------------------------------------------------------------------
def check_state_dict(
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    got: Mapping[str, Tensor],
    origin: Mapping[str, str] | None = None,
    what: str = "model",
) -> None:
    """Raise one `WeightsError` listing every missing, unexpected and mis-shaped key (with its file)."""
    origin = origin or {}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(
        k for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k].shape)
    )
    if not (missing or unexpected or shapes):
        return
    lines = [f"weights do not match the {what}:"]

    def where(k: str) -> str:
        return f" (from {origin[k]})" if k in origin else ""

    if missing:
        lines.append(f"  missing {len(missing)} key(s): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        lines.append(
            f"  unexpected {len(unexpected)} key(s): "
            + ", ".join(k + where(k) for k in unexpected[:20])
            + (" ..." if len(unexpected) > 20 else "")
        )
    for k in shapes[:20]:
        lines.append(f"  wrong shape for {k}{where(k)}: file has {tuple(got[k].shape)}, model needs {tuple(expected[k])}")
    if len(shapes) > 20:
        lines.append(f"  ... and {len(shapes) - 20} more wrong shapes")
    raise WeightsError("\n".join(lines))
