"""Answer a file of `(image, prompt)` tasks, grouped by image, resumably.

Input: JSONL lines `{"id", "image", "prompt"}` or SoMeData's `{"text_input", "image"}` (a JSONL file
or a JSON list; `id` defaults to the 0-based position). Output: one complete JSONL line per answer,
`{"id", "image", "prompt", "answer"}`, appended as soon as it exists; a rerun skips ids already
answered. Bad lines and unreadable images are reported with their line number and skipped; they
are not written, so a rerun retries them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from PIL import Image

from .generation import ImageFeatures

log = logging.getLogger("somelvlm")

IMAGE_ERRORS = (OSError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Task:
    id: Any
    image: Path
    prompt: str
    line: int


@dataclass
class BatchResult:
    answered: int = 0
    skipped: int = 0  # already in the output
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """`(line_number, parsed_or_exception)` for a JSONL file or a JSON list file."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            yield e.lineno, ValueError(f"not valid JSON ({e.msg})")
            return
        yield from enumerate(items, 1)
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            yield n, ValueError(f"not valid JSON ({e.msg})")


def read_tasks(path: str | Path, images_root: str | Path | None = None) -> tuple[list[Task], list[str]]:
    """Parse a task file; returns the tasks and one message per bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file not found: {path}")
    root = Path(images_root) if images_root is not None else path.parent
    tasks, errors, seen = [], [], set()
    for position, (line, rec) in enumerate(_records(path)):
        where = f"{path}:{line}"
        if isinstance(rec, Exception):
            errors.append(f"{where}: {rec}")
            continue
        if not isinstance(rec, dict):
            errors.append(f"{where}: expected a JSON object")
            continue
        prompt = rec.get("prompt", rec.get("text_input"))
        image = rec.get("image")
        tid = rec.get("id", position)
        if not isinstance(prompt, str) or not isinstance(image, str) or not image:
            errors.append(f"{where}: needs a string 'prompt' (or 'text_input') and 'image'")
            continue
        if tid in seen:
            errors.append(f"{where}: duplicate id {tid!r}")
            continue
        seen.add(tid)
        tasks.append(Task(tid, root / image, prompt, line))
    return tasks, errors


def done_ids(output: Path) -> set:
    """Ids already answered in `output`; an interrupted last line is cut off first."""
    if not output.is_file():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        with output.open("r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)
        log.warning("%s: removed an incomplete last line left by an interrupted run", output)
    ids = set()
    for line in output.read_text(encoding="utf-8").splitlines():
        if line.strip():
            ids.add(json.loads(line)["id"])
    return ids


def answer_tasks(model: Any, input_path: str | Path, output_path: str | Path, images_root: str | Path | None = None,
                 batch_size: int = 8, progress: bool = True, **generate_kwargs: Any) -> BatchResult:
    """Answer every task of `input_path` into `output_path` (see module doc).

    Tasks are ordered by image and answered `batch_size` prompts at a time; each image goes through
    the vision tower once (its features are reused by all of its prompts)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    tasks, failures = read_tasks(input_path, images_root)
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    finished = done_ids(output)
    todo = [t for t in tasks if t.id not in finished]
    result = BatchResult(skipped=len(tasks) - len(todo), failures=list(failures))
    for msg in failures:
        log.error(msg)
    groups: dict[Path, list[Task]] = {}
    for t in todo:
        groups.setdefault(t.image, []).append(t)
    ordered = [t for group in groups.values() for t in group]
    cache: dict[Path, Any] = {}  # image -> features, for the images of the current chunk
    with output.open("a", encoding="utf-8") as out, \
            tqdm(total=len(todo), unit="item", desc="answering", disable=not progress) as bar:
        for i in range(0, len(ordered), batch_size):
            chunk = ordered[i:i + batch_size]
            cache = _encode_chunk(model, chunk, cache, result, input_path)
            ready = [t for t in chunk if t.image in cache]
            bar.update(len(chunk) - len(ready))
            if not ready:
                continue
            feats = _stack([cache[t.image] for t in ready])
            answers = model.generate(images=feats, prompts=[t.prompt for t in ready], **generate_kwargs)
            for t, a in zip(ready, answers):
                out.write(json.dumps({"id": t.id, "image": str(t.image), "prompt": t.prompt, "answer": a},
                                     ensure_ascii=False) + "\n")
            out.flush()
            result.answered += len(ready)
            bar.update(len(ready))
    result.seconds = time.perf_counter() - start
    return result


def _encode_chunk(model: Any, chunk: list[Task], cache: dict[Path, Any], result: BatchResult,
                  input_path: str | Path) -> dict[Path, Any]:
    """Features for the chunk's images (new ones in one vision batch), reusing those of the previous
    chunk; an unreadable image is isolated and reported with the line of every task that needs it."""
    images = list(dict.fromkeys(t.image for t in chunk))
    fresh = {p: cache[p] for p in images if p in cache}
    new = [p for p in images if p not in cache]
    try:
        feats = model.encode_images(new) if new else None
        fresh.update({p: feats.select([j]) for j, p in enumerate(new)})
    except IMAGE_ERRORS:
        for p in new:
            try:
                fresh[p] = model.encode_images([p])
            except IMAGE_ERRORS as e:
                for t in chunk:
                    if t.image == p:
                        msg = f"{input_path}:{t.line}: cannot use image {p}: {e}"
                        log.error(msg)
                        result.failures.append(msg)
    return fresh


def _stack(feats: list[Any]) -> Any:
    return ImageFeatures.concat(feats)
