"""Answers out: one resumable, appending writer and the run settings recorded beside it.

Every output we write has a sidecar `OUTPUT.somelvlm.json` that marks it as ours and records how
it was made (`RunSettings`: model id/path and config hash, dtype, decoding options, somelvlm
version, job settings). Before anything is touched the writer refuses

- an output that is one of the inputs (it would be emptied),
- an existing output without our sidecar (not ours: we never cut or append to a user's file),
- resuming with other settings than the recorded ones (naming the difference), unless `force`.

Then it resumes: a torn last line (a killed run) is cut, rows with an `"error"` are dropped so the
rerun retries them, and the remaining rows are `done`. JSONL outputs are appended to directly, one
complete line per row; a Parquet output is rebuilt atomically at `close()` from a JSONL journal
kept beside it (`.OUTPUT.journal.jsonl`), which is what makes it resumable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .. import __version__

log = logging.getLogger("somelvlm")

SIDECAR_SUFFIX = ".somelvlm.json"
SIDECAR_KIND = "somelvlm-answers"
OUTPUT_FORMATS = ("jsonl", "parquet")


def sidecar_path(output: Path) -> Path:
    return output.with_name(output.name + SIDECAR_SUFFIX)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `path` via a temporary file in the same folder and a rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class RunSettings:
    """What decides the answers of a run; a resumed run must match (see `differences`)."""

    model: str
    config_hash: str
    dtype: str
    options: dict[str, Any]
    job: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. prompt template, eval mode
    version: str = ""

    @classmethod
    def of(cls, config: Any, dtype: Any, model_spec: str | os.PathLike | None, options: Any, **job: Any
           ) -> "RunSettings":
        """Settings of a model (`config`, compute `dtype`, loaded from `model_spec`) decoding with
        `options` (`GenerationOptions`); `job` adds what else shapes the answers."""
        text = json.dumps(config.to_dict(), sort_keys=True, default=str)
        if model_spec is None:  # the Python API without a name: the config hash still identifies it
            spec = "(not given)"
        elif model_spec == "tiny" or not Path(model_spec).exists():  # the built-in model, or a Hub id
            spec = str(model_spec)
        else:
            spec = str(Path(model_spec).resolve())
        return cls(spec, hashlib.sha256(text.encode()).hexdigest()[:16], str(dtype).removeprefix("torch."),
                   options.to_dict(), dict(job), __version__)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def differences(self, new: "RunSettings") -> list[str]:
        """`"name: old -> new"` for every setting that changes the answers (not the version)."""
        old_d, new_d = _flat(self.to_dict()), _flat(new.to_dict())
        return [f"{k}: {old_d.get(k)!r} -> {new_d.get(k)!r}" for k in sorted(set(old_d) | set(new_d))
                if k != "version" and old_d.get(k) != new_d.get(k)]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def output_format(path: Path, fmt: str | None = None) -> str:
    fmt = fmt or ("parquet" if path.suffix.lower() == ".parquet" else "jsonl")
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; known: {', '.join(OUTPUT_FORMATS)}")
    return fmt


def check_output(output: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output that is an input or that exists without being ours (see module doc)."""
    for inp in inputs:
        inp = Path(inp)
        if output.resolve() == inp.resolve() or (output.exists() and inp.exists() and output.samefile(inp)):
            raise ValueError(f"--output {output} is the input file; choose another output path")
    if output.exists() and not sidecar_path(output).is_file():
        raise ValueError(f"{output} exists and is not a somelvlm output (no {sidecar_path(output).name} beside "
                         "it); choose another output path or move the file away")
    if output.is_dir():
        raise ValueError(f"{output} is a folder; give a file path")


def read_rows(path: Path, repair: bool = True) -> list[dict]:
    """Rows of one of our JSONL files; a torn last line (a killed writer) is cut when `repair`."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        if repair:
            log.warning("%s: removed an incomplete last line left by an interrupted run", path)
            with path.open("r+b") as fh:
                fh.truncate(len(data))
    rows = []
    for n, line in enumerate(data.decode("utf-8").split("\n"), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: damaged output line ({e.msg}); move the file away to start over") from None
    return rows


class AnswerWriter:
    """Resumable writer of answer rows (see module doc). Use as a context manager:

        with AnswerWriter(out, [input_file], settings) as w:
            todo = [t for t in tasks if t.id not in w.done]
            w.write({"id": ..., "answer": ...})
    """

    def __init__(self, output: str | Path, inputs: Sequence[str | Path], settings: RunSettings,
                 key: Callable[[dict], Any] = lambda row: row["id"], force: bool = False,
                 fmt: str | None = None, retry_errors: bool = True) -> None:
        self.output = Path(output)
        self.fmt = output_format(self.output, fmt)
        self.inputs, self.settings, self.key, self.force = [Path(p) for p in inputs], settings, key, force
        self.retry_errors = retry_errors
        self.journal = self.output if self.fmt == "jsonl" else self.output.with_name(f".{self.output.name}.journal.jsonl")
        self.done: dict[Any, dict] = {}
        self.retried = 0  # rows with an "error" dropped so that this run retries them
        self._fh = None

    # -- opening ----------------------------------------------------------------------------------
    def open(self) -> "AnswerWriter":
        check_output(self.output, self.inputs)
        sidecar = sidecar_path(self.output)
        if sidecar.is_file():
            self._check_settings(sidecar)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        if self.fmt == "parquet" and self.output.exists() and not self.journal.exists():
            self._write_rows(self.journal, _read_parquet(self.output))
        rows = read_rows(self.journal)
        kept = [r for r in rows if not (self.retry_errors and "error" in r)]
        self.retried = len(rows) - len(kept)
        if self.retried:
            self._write_rows(self.journal, kept)
            log.info("%s: retrying %d sample(s) that failed in an earlier run", self.output, self.retried)
        self.done = {self.key(r): r for r in kept}
        atomic_write(sidecar, (json.dumps({"kind": SIDECAR_KIND, "output": self.output.name,
                                           "settings": self.settings.to_dict()}, indent=1) + "\n").encode())
        self._fh = self.journal.open("a", encoding="utf-8")
        return self

    def _check_settings(self, sidecar: Path) -> None:
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
            old = RunSettings.from_dict(data["settings"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{sidecar}: damaged run record ({e}); move the output away to start over") from None
        diffs = old.differences(self.settings)
        if diffs and not self.force:
            raise ValueError(f"{self.output} was written with other settings ({'; '.join(diffs)}); rerun with "
                             "the same settings, choose another output, or pass --force to continue anyway")
        if diffs:
            log.warning("%s: continuing with other settings than the earlier run (--force): %s",
                        self.output, "; ".join(diffs))

    @staticmethod
    def _write_rows(path: Path, rows: Iterable[dict]) -> None:
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())

    # -- writing ----------------------------------------------------------------------------------
    def write(self, row: dict) -> None:
        """Append one complete row (flushed at once, so a kill loses at most the line in flight)."""
        self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._fh.flush()
        if "error" not in row:
            self.done[self.key(row)] = row

    def close(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        self._fh = None
        if self.fmt == "parquet":
            _write_parquet(self.output, read_rows(self.journal, repair=False))

    def __enter__(self) -> "AnswerWriter":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ImportError("Parquet output needs pyarrow: pip install 'somelvlm[parquet]'") from None
    return pyarrow


def _read_parquet(path: Path) -> list[dict]:
    return _pyarrow().parquet.read_table(path).to_pylist()


def _write_parquet(path: Path, rows: list[dict]) -> None:
    pa = _pyarrow()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pa.parquet.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
