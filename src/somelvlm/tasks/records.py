"""Task files in: one record type (`Task`), one reader (`read_tasks`), one error policy.

Formats (by extension, else by content): JSONL, a JSON list, CSV, Parquet (`pyarrow`, extra
`somelvlm[parquet]`). Columns are configurable (`Columns`); by default the prompt is `prompt` or
SoMeData's `text_input`, the image `image`, the id `id` (default: the record's 0-based position),
the reference answer `text_output` (used by `eval` and `finetune`).

Images are file names (relative to `images_root`, default: the task file's folder), raw bytes
(Parquet `binary` columns, or Hugging Face datasets' `{"bytes": ..., "path": ...}` structs), or
absent/empty (a text-only task).

Error policy: a bad record never stops a run. It is reported as `FILE:LINE: why` (1-based line
numbers in every format; a JSON list names the line where the record starts, plus its 1-based
record number), left out, and counted in `Problems`. Bad records include broken JSON, non-UTF-8
bytes or lone surrogates anywhere in a record, ids that are not a string or an integer,
duplicate ids, and a missing prompt.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image

log = logging.getLogger("somelvlm")

# What opening or decoding a bad image raises: `processing.load_image` turns decode failures into
# ValueError, a missing file is FileNotFoundError (an OSError), PIL adds DecompressionBombError.
IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)

FORMATS = ("jsonl", "json", "csv", "parquet")


@dataclass(frozen=True)
class Columns:
    """Which column holds what. `None` means: the first of the defaults that the record has."""

    prompt: str | None = None  # default: "prompt", then "text_input"
    image: str | None = None  # default: "image"
    id: str | None = None  # default: "id" (absent: the 0-based record position)
    reference: str | None = None  # default: "text_output"
    keep: tuple[str, ...] = ()  # extra input columns carried into the output

    DEFAULTS = {"prompt": ("prompt", "text_input"), "image": ("image",), "id": ("id",),
                "reference": ("text_output",)}

    def pick(self, role: str, record: dict) -> tuple[str | None, Any]:
        """`(column, value)` of `role` in `record` (`(None, None)` when it has none)."""
        chosen = getattr(self, role)
        for name in (chosen,) if chosen is not None else self.DEFAULTS[role]:
            if name in record:
                return name, record[name]
        return None, None


@dataclass(frozen=True)
class Task:
    """One record of a task file."""

    id: str | int
    prompt: str
    image: Path | bytes | None  # a file, encoded image bytes, or None (text only)
    where: str  # "FILE:LINE" for messages
    reference: str | None = None  # the expected answer (eval, fine-tuning)
    extra: dict[str, Any] = field(default_factory=dict)  # the --keep-columns values

    @property
    def image_key(self) -> Any:
        """Equal for tasks that show the same image (bytes by content)."""
        return self.image if not isinstance(self.image, bytes) else ("bytes", hash(self.image))

    def image_label(self) -> str | None:
        """How the image appears in output rows and messages."""
        if self.image is None:
            return None
        return str(self.image) if not isinstance(self.image, bytes) else f"<{len(self.image)} bytes>"


@dataclass
class Problems:
    """Records or samples left out, as `"where: why"` lines (deduplicated, in order of discovery)."""

    items: dict[str, str] = field(default_factory=dict)
    verbose: bool = True  # log each problem when first seen

    def add(self, where: str, why: str) -> None:
        if where not in self.items:
            self.items[where] = why
            if self.verbose:
                log.warning("skipped %s: %s", where, why)

    def __len__(self) -> int:
        return len(self.items)

    def lines(self) -> list[str]:
        return [f"{w}: {why}" for w, why in self.items.items()]


class BadRecord(ValueError):
    """A record that is reported and skipped (never raised out of `read_tasks`)."""


# ------------------------------------------------------------------------------------------------
# Raw records: (where, position, record or BadRecord)
# ------------------------------------------------------------------------------------------------
def detect_format(path: Path, data: bytes) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("jsonl", "ndjson"):
        return "jsonl"
    if suffix in ("json", "csv", "parquet"):
        return suffix
    if data[:4] == b"PAR1":
        return "parquet"
    return "json" if data.lstrip()[:1] == b"[" else "jsonl"


def raw_records(path: Path, data: bytes, fmt: str) -> Iterator[tuple[str, Any]]:
    """`(where, record_or_BadRecord)` for every record of a task file's bytes."""
    if fmt == "parquet":
        yield from _parquet_records(path, data)
        return
    # Undecodable bytes become lone surrogates (U+DC80..U+DCFF), caught per record by `_check_text`.
    text = data.decode("utf-8", errors="surrogateescape")
    if fmt == "json":
        yield from _json_list_records(path, text)
    elif fmt == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}
    else:
        for n, line in enumerate(text.split("\n"), 1):
            if line.strip():
                yield f"{path}:{n}", _loads(line)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return BadRecord(f"not valid JSON ({e.msg})")


def _json_list_records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """Elements of a JSON list with the 1-based line each starts on (and its record number)."""
    decoder = json.JSONDecoder()
    if not text.lstrip().startswith("["):
        yield f"{path}:1", BadRecord("expected a JSON list of records (or use .jsonl for one record per line)")
        return
    pos, line, number = text.index("[") + 1, 1 + text.count("\n", 0, text.index("[")), 0
    while True:
        start = pos
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        line += text.count("\n", start, pos)
        if pos >= len(text):
            yield f"{path}:{line}", BadRecord("the JSON list is not closed with ']'")
            return
        if text[pos] == "]" and number == 0:
            return
        number += 1
        where = f"{path}:{line} (record {number})"
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield f"{path}:{e.lineno}", BadRecord(f"not valid JSON ({e.msg}); the rest of the file is unreadable")
            return
        yield where, record
        line += text.count("\n", pos, end)
        pos = end
        while pos < len(text) and text[pos] in " \t\r\n":
            line += text[pos] == "\n"
            pos += 1
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            return
        yield f"{path}:{line}", BadRecord("expected ',' or ']' between records; the rest of the file is unreadable")
        return


def _parquet_records(path: Path, data: bytes) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading Parquet needs pyarrow: pip install 'somelvlm[parquet]'") from None
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a broken file
        raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    for n, row in enumerate(table.to_pylist(), 1):
        yield f"{path}:{n}", row


# ------------------------------------------------------------------------------------------------
# Records -> tasks
# ------------------------------------------------------------------------------------------------
def _check_text(value: Any, column: str) -> None:
    """Strings must be valid Unicode (no lone surrogates: non-UTF-8 bytes or bad `\\ud800` escapes)."""
    values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, (dict, list)):
            _check_text(v, column)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRecord(f"{column!r} is not valid UTF-8 text (a non-UTF-8 byte or a lone surrogate)") from None


def to_task(record: Any, where: str, position: int, columns: Columns, root: Path,
            template: str | None = None, need_reference: bool = False) -> Task:
    """One raw record as a `Task`; raises `BadRecord` with the reason."""
    if isinstance(record, BadRecord):
        raise record
    if not isinstance(record, dict):
        raise BadRecord(f"expected an object/row, got {type(record).__name__}")
    for key, value in record.items():
        _check_text(value, key)
    name, prompt = columns.pick("prompt", record)
    if not isinstance(prompt, str) or not prompt.strip():
        want = columns.prompt or "' or '".join(Columns.DEFAULTS["prompt"])
        raise BadRecord(f"needs a non-empty string '{want}' column")
    if template is not None:
        prompt = template.format(text=prompt)
    name, tid = columns.pick("id", record)
    if name is None:
        tid = position
    elif isinstance(tid, bool) or not isinstance(tid, (str, int)):
        raise BadRecord(f"the id (column {name!r}) must be a string or an integer, got {type(tid).__name__}")
    _, image = columns.pick("image", record)
    image = _image(image, root)
    _, reference = columns.pick("reference", record)
    if need_reference and (not isinstance(reference, str) or not reference.strip()):
        raise BadRecord(f"'{columns.reference or 'text_output'}' is missing or empty")
    missing = [c for c in columns.keep if c not in record]
    if missing:
        raise BadRecord(f"has no column(s) {missing} named by --keep-columns")
    return Task(tid, prompt, image, where, reference if isinstance(reference, str) else None,
                {c: record[c] for c in columns.keep})


def _image(value: Any, root: Path) -> Path | bytes | None:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        return root / value
    raise BadRecord(f"image must be a file name or bytes, got {type(value).__name__}")


def read_tasks(path: str | Path, images_root: str | Path | None = None, columns: Columns = Columns(),
               problems: Problems | None = None, template: str | None = None, fmt: str | None = None,
               need_reference: bool = False, require_image: bool = False) -> list[Task]:
    """Every good task of a task file; bad records go to `problems` (see the module doc).

    Raises FileNotFoundError for a missing file, ValueError for an unknown `fmt` or an unreadable
    Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    return parse_tasks(path, path.read_bytes(), images_root, columns, problems, template, fmt,
                       need_reference, require_image)


def parse_tasks(path: Path, data: bytes, images_root: str | Path | None = None, columns: Columns = Columns(),
                problems: Problems | None = None, template: str | None = None, fmt: str | None = None,
                need_reference: bool = False, require_image: bool = False) -> list[Task]:
    """`read_tasks` on bytes already read (e.g. by Ray Data from any filesystem)."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown task file format {fmt!r}; known: {', '.join(FORMATS)}")
    problems = problems if problems is not None else Problems()
    root = Path(images_root) if images_root is not None else path.parent
    tasks, seen = [], {}
    for position, (where, record) in enumerate(raw_records(path, data, fmt or detect_format(path, data))):
        try:
            task = to_task(record, where, position, columns, root, template, need_reference)
            if require_image and task.image is None:
                raise BadRecord("has no image")
            if task.id in seen:
                raise BadRecord(f"duplicate id {task.id!r} (first at {seen[task.id]})")
        except BadRecord as e:
            problems.add(where, str(e))
            continue
        seen[task.id] = where
        tasks.append(task)
    return tasks


def read_all(paths: Sequence[str | Path], images_root: str | Path | None = None, problems: Problems | None = None,
             **kwargs: Any) -> list[Task]:
    """`read_tasks` over several files, concatenated in order."""
    return [t for p in paths for t in read_tasks(p, images_root, problems=problems, **kwargs)]
