"""Run a model over SoMeData task files (resumably) and score predictions into a report.

Predictions are JSONL lines ``{"id": <0-based sample index>, "file": <task file name>,
"prediction": <answer>}``; a sample whose image is missing or unreadable gets ``"error"`` instead
of an answer and counts as failed (wrong and unparseable). The report is JSON with a Markdown
twin (and one bar chart per task family when matplotlib is importable).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from PIL import Image
from tqdm.auto import tqdm

from .metrics import Judge, accuracy, bleu, judge_score, option_counts, rouge_l
from .tasks import Sample, TaskFile, load_tasks, parse_answer

log = logging.getLogger("somelvlm")

Mode = Literal["generate", "rank"]
Records = dict[str, dict[int, dict]]  # file name -> sample id -> prediction line
# What opening/decoding a bad image file raises (UnidentifiedImageError is an OSError).
IMAGE_ERRORS = (OSError, Image.DecompressionBombError)


# ----------------------------------------------------------------------------------------------
# Prediction files
# ----------------------------------------------------------------------------------------------
def read_predictions(path: str | Path, tasks: Sequence[TaskFile]) -> Records:
    """Read and validate a predictions JSONL file against the task files it answers.

    A line may omit "file" only when there is a single task file. Bad JSON, unknown files,
    out-of-range or duplicate ids raise ValueError naming the line.
    """
    path = Path(path)
    if not path.exists() or path.is_dir():  # not is_file(): a pipe such as <(...) is fine
        raise FileNotFoundError(f"predictions file not found: {path}")
    by_name = {t.name: t for t in tasks}
    records: Records = {name: {} for name in by_name}
    seen: dict[tuple[str, int], int] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            name, index = _locate(record, where, by_name)
            if (name, index) in seen:
                raise ValueError(f"{where}: duplicate prediction for {name} id {index} "
                                 f"(first on line {seen[name, index]})")
            seen[name, index] = lineno
            records[name][index] = record
    return records


def _locate(record: Any, where: str, by_name: dict[str, TaskFile]) -> tuple[str, int]:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object")
    index = record.get("id")
    if not isinstance(index, int) or isinstance(index, bool):
        raise ValueError(f"{where}: 'id' must be an integer sample index, got {index!r}")
    name = record.get("file")
    if name is None:
        if len(by_name) != 1:
            raise ValueError(f"{where}: no 'file' key; it is required when the data is a folder")
        name = next(iter(by_name))
    if name not in by_name:
        raise ValueError(f"{where}: file {name!r} is not among the data files {sorted(by_name)}")
    size = len(by_name[name].samples)
    if not 0 <= index < size:
        raise ValueError(f"{where}: id {index} out of range for {name} ({size} samples)")
    if "error" not in record and not isinstance(record.get("prediction"), str):
        raise ValueError(f"{where}: 'prediction' must be a string")
    return name, index


def _drop_partial_line(path: Path) -> None:
    """Cut an interrupted write (a last line without its newline) so resuming rewrites it."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping an incomplete last line left by an interrupted run", path)
        with path.open("r+b") as fh:
            fh.truncate(keep)


# ----------------------------------------------------------------------------------------------
# Running a model
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class _Item:
    task: TaskFile
    sample: Sample
    image: Path | None


class _Writer:
    """Appends one complete JSONL line per finished sample and advances the progress bar."""

    def __init__(self, fh: TextIO, bar: Any) -> None:
        self.fh, self.bar = fh, bar

    def done(self, item: _Item, prediction: str, **extra: Any) -> None:
        self._write({"id": item.sample.id, "file": item.task.name, "prediction": prediction, **extra})

    def fail(self, item: _Item, error: str) -> None:
        log.warning("%s sample %d: %s", item.task.name, item.sample.id, error)
        self._write({"id": item.sample.id, "file": item.task.name, "prediction": "", "error": error})

    def _write(self, record: dict) -> None:
        self.fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.fh.flush()
        self.bar.update(1)


def evaluate(
    model: Any,
    data: str | Path,
    images_root: str | Path | None,
    out_dir: str | Path,
    mode: Mode = "generate",
    batch_size: int = 8,
    generate_kwargs: dict[str, Any] | None = None,
    limit: int | None = None,
    *,
    predictions_path: str | Path | None = None,
    report_path: str | Path | None = None,
    judge: Judge | None = None,
    progress: bool = True,
) -> dict:
    """Answer every sample of a task file (or folder of them) with `model`, then score.

    Samples are grouped by image: each chunk of up to `batch_size` distinct images is encoded
    once (`model.encode_images`) and all their prompts are answered from those features
    (`model.generate`, up to `batch_size` prompts a call). With `mode="rank"`, classification
    samples are answered by `model.rank(image, prompt, options)`'s best candidate instead.
    Predictions are appended to `predictions_path` (default `out_dir/predictions.jsonl`); samples
    already there are skipped, so an interrupted run resumes. `images_root=None` resolves image
    names against each data file's folder; `limit` keeps the first N samples of every file.
    Writes `report_path` (default `out_dir/report.json`) plus its Markdown twin; returns the report.
    """
    if mode not in ("generate", "rank"):
        raise ValueError(f"mode must be 'generate' or 'rank', got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions_path = Path(predictions_path or out_dir / "predictions.jsonl")
    report_path = Path(report_path or out_dir / "report.json")
    tasks = load_tasks(data)

    done: Records = {}
    if predictions_path.exists():
        _drop_partial_line(predictions_path)
        done = read_predictions(predictions_path, tasks)
    pending = [
        _Item(task, sample, _image_path(images_root, task, sample))
        for task in tasks for sample in task.samples[:limit]
        if sample.id not in done.get(task.name, {})
    ]
    ranked, generated = [], []
    for item in pending:
        (ranked if mode == "rank" and item.task.kind == "classification" else generated).append(item)

    predictions_path.parent.mkdir(parents=True, exist_ok=True)
    with predictions_path.open("a", encoding="utf-8") as fh, \
            tqdm(total=len(pending), desc="eval", unit="sample", disable=not progress) as bar:
        writer = _Writer(fh, bar)
        _rank(model, ranked, writer)
        _generate(model, generated, batch_size, generate_kwargs or {}, writer)

    report = score(data, predictions_path, limit=limit, judge=judge, tasks=tasks)
    report["settings"] = {"mode": mode, "batch_size": batch_size, "limit": limit,
                          "generate_kwargs": generate_kwargs or {}, "predictions": str(predictions_path)}
    write_report(report, report_path)
    return report


def _image_path(root: str | Path | None, task: TaskFile, sample: Sample) -> Path | None:
    if sample.image is None:
        return None
    return Path(root if root is not None else task.path.parent) / sample.image


def _usable(items: Iterable[_Item], writer: _Writer) -> list[_Item]:
    """Items whose image file exists; the others are recorded as failures."""
    usable = []
    for item in items:
        if item.image is None:
            writer.fail(item, "sample has no image")
        elif not item.image.is_file():
            writer.fail(item, f"image not found: {item.image}")
        else:
            usable.append(item)
    return usable


def _rank(model: Any, items: list[_Item], writer: _Writer) -> None:
    for item in _usable(items, writer):
        try:
            ranking = model.rank(str(item.image), item.sample.prompt, list(item.sample.options))
        except IMAGE_ERRORS as err:
            writer.fail(item, f"unreadable image {item.image}: {err}")
            continue
        writer.done(item, ranking[0][0], ranking=[[c, float(s)] for c, s in ranking])


def _generate(model: Any, items: list[_Item], batch_size: int, kwargs: dict, writer: _Writer) -> None:
    by_image: dict[Path, list[_Item]] = {}
    for item in _usable(items, writer):
        by_image.setdefault(item.image, []).append(item)
    images = list(by_image)
    for start in range(0, len(images), batch_size):
        for paths, features in _encode(model, images[start:start + batch_size], by_image, writer):
            jobs = [(i, item) for i, path in enumerate(paths) for item in by_image[path]]
            for first in range(0, len(jobs), batch_size):
                chunk = jobs[first:first + batch_size]
                answers = model.generate(images=features.select([i for i, _ in chunk]),
                                         prompts=[item.sample.prompt for _, item in chunk], **kwargs)
                if len(answers) != len(chunk):
                    raise RuntimeError(f"model.generate returned {len(answers)} answers for {len(chunk)} prompts")
                for (_, item), answer in zip(chunk, answers):
                    writer.done(item, answer)


def _encode(model: Any, paths: list[Path], by_image: dict[Path, list[_Item]],
            writer: _Writer) -> list[tuple[list[Path], Any]]:
    """Encode `paths` in one call; when an image is unreadable, retry one by one to isolate it."""
    try:
        return [(paths, model.encode_images([str(p) for p in paths]))]
    except IMAGE_ERRORS as err:
        if len(paths) > 1:
            return [pair for path in paths for pair in _encode(model, [path], by_image, writer)]
        for item in by_image[paths[0]]:
            writer.fail(item, f"unreadable image {paths[0]}: {err}")
        return []


# ----------------------------------------------------------------------------------------------
# Scoring and reports
# ----------------------------------------------------------------------------------------------
@dataclass
class _Scored:
    """A task file's evaluated samples with their answers (None: failed or missing)."""

    task: TaskFile
    samples: tuple[Sample, ...]
    answers: list[str | None]
    failures: list[dict]
    missing: int


def score(data: str | Path, predictions: str | Path, limit: int | None = None,
          judge: Judge | None = None, tasks: Sequence[TaskFile] | None = None) -> dict:
    """Score a predictions file against a task file or folder.

    For a single file the report is that file's entry (top-level `acc`/`acc_star` or
    `bleu`/`rouge_l`); for a folder it has `files` (per file) and `families` (pooled per family).
    A sample without a prediction line counts as `missing` (wrong and unparseable).
    """
    tasks = list(tasks) if tasks is not None else load_tasks(data)
    records = read_predictions(predictions, tasks)
    scored = [_collect(task, records[task.name], limit) for task in tasks]
    for s in scored:
        if s.missing:
            log.warning("%s: %d of %d samples have no prediction", s.task.name, s.missing, len(s.samples))
    files = {s.task.name: _file_entry(s, judge) for s in scored}
    if not Path(data).is_dir():
        return files[tasks[0].name]
    families: dict[str, list[_Scored]] = {}
    for s in scored:
        families.setdefault(s.task.family, []).append(s)
    return {
        "data": str(data),
        "n": sum(len(s.samples) for s in scored),
        "failed": sum(len(s.failures) for s in scored),
        "missing": sum(s.missing for s in scored),
        "files": files,
        "families": {name: _family_entry(group, judge) for name, group in sorted(families.items())},
    }


def _collect(task: TaskFile, records: dict[int, dict], limit: int | None) -> _Scored:
    samples = task.samples[:limit]
    answers: list[str | None] = []
    failures: list[dict] = []
    for sample in samples:
        record = records.get(sample.id)
        if record is not None and "error" in record:
            failures.append({"file": task.name, "id": sample.id, "error": record["error"]})
        answers.append(record["prediction"] if record is not None and "error" not in record else None)
    return _Scored(task, samples, answers, failures, sum(s.id not in records for s in samples))


def _classification(scored: list[_Scored], with_options: bool) -> dict:
    golds, parsed = [], []
    for s in scored:
        golds += [sample.reference for sample in s.samples]
        parsed += [None if a is None else parse_answer(a, sample.options) for sample, a in zip(s.samples, s.answers)]
    result = accuracy(golds, parsed)
    if with_options:
        result["per_option"] = option_counts(golds, parsed)
    return result


def _generation(scored: list[_Scored], judge: Judge | None) -> dict:
    prompts = [sample.prompt for s in scored for sample in s.samples]
    refs = [sample.reference for s in scored for sample in s.samples]
    preds = [a or "" for s in scored for a in s.answers]
    result = {"n": len(refs), "bleu": bleu(preds, refs), "rouge_l": rouge_l(preds, refs)}
    if judge is not None:
        result["judge"] = judge_score(judge, prompts, preds, refs)
    return result


def _file_entry(s: _Scored, judge: Judge | None) -> dict:
    metrics = _classification([s], True) if s.task.kind == "classification" else _generation([s], judge)
    return {"file": s.task.name, "family": s.task.family, "task": s.task.kind, **metrics,
            "failed": len(s.failures), "missing": s.missing, "failures": s.failures}


def _family_entry(group: list[_Scored], judge: Judge | None) -> dict:
    entry: dict[str, Any] = {"files": [s.task.name for s in group]}
    cls = [s for s in group if s.task.kind == "classification"]
    gen = [s for s in group if s.task.kind == "generation"]
    if cls:
        entry["classification"] = _classification(cls, False)
    if gen:
        entry["generation"] = _generation(gen, judge)
    entry["failed"] = sum(len(s.failures) for s in group)
    return entry


def write_report(report: dict, path: str | Path) -> list[Path]:
    """Write the JSON report, its Markdown twin (`.md`) and, when matplotlib is importable, one
    bar chart per family (`<stem>_<family>.png`). Returns the written paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md = path.with_suffix(".md")
    md.write_text(markdown_report(report), encoding="utf-8")
    written = [path, md]
    if importlib.util.find_spec("matplotlib") is not None:
        written += _plot_families(report, path)
    return written


def _file_entries(report: dict) -> list[dict]:
    return list(report["files"].values()) if "files" in report else [report]


def _fmt(value: float | int | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def markdown_report(report: dict) -> str:
    """Markdown tables: one row per file, then one per family (folders only), then failures."""
    lines = ["# SoMeLVLM evaluation", "",
             "Acc = correct / all samples; Acc* = correct / parseable samples (– when undefined).", "",
             "| file | family | task | n | Acc | Acc* | BLEU | ROUGE-L | failed | missing |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    entries = _file_entries(report)
    for e in entries:
        lines.append(f"| {e['file']} | {e['family']} | {e['task']} | {e['n']} | {_fmt(e.get('acc'))} | "
                     f"{_fmt(e.get('acc_star'))} | {_fmt(e.get('bleu'))} | {_fmt(e.get('rouge_l'))} | "
                     f"{e['failed']} | {e['missing']} |")
    if "families" in report:
        lines += ["", "## Task families (samples pooled)", "",
                  "| family | files | n (cls) | Acc | Acc* | n (gen) | BLEU | ROUGE-L |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, fam in report["families"].items():
            c, g = fam.get("classification", {}), fam.get("generation", {})
            lines.append(f"| {name} | {len(fam['files'])} | {_fmt(c.get('n'))} | {_fmt(c.get('acc'))} | "
                         f"{_fmt(c.get('acc_star'))} | {_fmt(g.get('n'))} | {_fmt(g.get('bleu'))} | "
                         f"{_fmt(g.get('rouge_l'))} |")
    failures = [f for e in entries for f in e["failures"]]
    if failures:
        lines += ["", f"## Failed samples ({len(failures)})", ""]
        lines += [f"- {f['file']} #{f['id']}: {f['error']}" for f in failures]
    return "\n".join(lines) + "\n"


_PLOT_COLORS = {"acc": "C0", "acc_star": "C1", "bleu": "C2", "rouge_l": "C3"}


def _plot_families(report: dict, path: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_family: dict[str, list[dict]] = {}
    for e in _file_entries(report):
        by_family.setdefault(e["family"], []).append(e)
    written = []
    for family, entries in by_family.items():
        labels, values, colors = [], [], []
        for e in entries:
            keys = ("acc", "acc_star") if e["task"] == "classification" else ("bleu", "rouge_l")
            for key in keys:
                labels.append(f"{Path(e['file']).stem}\n{key}")
                values.append(e.get(key) or 0.0)
                colors.append(_PLOT_COLORS[key])
        fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(values)), 3.5))
        ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_title(family)
        fig.tight_layout()
        out = path.with_name(f"{path.stem}_{family}.png")
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written
