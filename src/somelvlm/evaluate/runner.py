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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..options import GenerationOptions
from ..tasks.answer import answer_tasks
from ..tasks.output import AnswerWriter, RunSettings
from ..tasks.records import IMAGE_ERRORS, Task
from .metrics import Judge, accuracy, bleu, judge_score, option_counts, rouge_l
from .tasks import TaskFile, load_tasks, parse_answer

log = logging.getLogger("somelvlm")

Mode = Literal["generate", "rank"]
Records = dict[str, dict[int, dict]]  # file name -> sample id -> prediction line


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
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            name, index = _locate(record, where, by_name)
            if (name, index) in seen:
                raise ValueError(f"{where}: duplicate prediction for {name} id {index} "
                                 f"(first at {path}:{seen[name, index]})")
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
    if index not in by_name[name].options:
        size = len(by_name[name].samples)
        raise ValueError(f"{where}: id {index} out of range for {name} ({size} samples)")
    if "error" not in record and not isinstance(record.get("prediction"), str):
        raise ValueError(f"{where}: 'prediction' must be a string")
    return name, index


# ----------------------------------------------------------------------------------------------
# Running a model
# ----------------------------------------------------------------------------------------------
def prediction_key(row: dict) -> tuple[str, int]:
    return row["file"], row["id"]


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
    model_spec: str | Path | None = None,
    force: bool = False,
    num_workers: int | None = None,
) -> dict:
    """Answer every sample of a task file (or folder of them) with `model`, then score.

    Generation uses the shared encode-once-ask-many loop (`somelvlm.tasks.answer`): each image is
    encoded once and its prompts answered up to `batch_size` at a time. With `mode="rank"`,
    classification samples are answered by `model.rank(image, prompt, options)`'s best candidate.
    Predictions are appended to `predictions_path` (default `out_dir/predictions.jsonl`) through
    the resumable writer (`somelvlm.tasks.output`): samples already answered are skipped, samples
    that failed earlier are retried, and a resume with another model or other decoding options is
    refused unless `force`. `generate_kwargs` override the model's decoding defaults (unknown
    names are an error). `limit` keeps the first N samples of every file. `num_workers` processes
    decode images ahead (default: 2 on a GPU, else 0). Writes `report_path`
    (default `out_dir/report.json`) plus its Markdown twin; returns the report.
    """
    if mode not in ("generate", "rank"):
        raise ValueError(f"mode must be 'generate' or 'rank', got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions_path = Path(predictions_path or out_dir / "predictions.jsonl")
    report_path = Path(report_path or out_dir / "report.json")
    tasks = load_tasks(data, images_root)
    base = getattr(model, "generation_options", None) or GenerationOptions()
    options = base.replace(**(generate_kwargs or {}))
    dtype = getattr(getattr(model, "llm", None), "dtype", None) or "unknown"
    settings = RunSettings.of(model.config, dtype, model_spec, options, mode=mode)
    with AnswerWriter(predictions_path, [t.path for t in tasks], settings, key=prediction_key, force=force) as writer:
        pending = [(task, s) for task in tasks for s in task.samples[:limit] if (task.name, s.id) not in writer.done]
        with logging_redirect_tqdm(), tqdm(total=len(pending), desc="eval", unit="sample",
                                           disable=not progress) as bar:
            record = _Recorder(writer, bar, {id(s): t for t, s in pending})
            ranked = [s for t, s in pending if mode == "rank" and t.kind == "classification"]
            generated = [s for t, s in pending if not (mode == "rank" and t.kind == "classification")]
            for s in ranked:
                record.rank(model, s)
            answer_tasks(model, generated, options, record.done, record.fail, batch_size, num_workers=num_workers)

    report = score(data, predictions_path, limit=limit, judge=judge, tasks=tasks)
    report["settings"] = {"mode": mode, "batch_size": batch_size, "limit": limit,
                          "generation_options": options.to_dict(), "predictions": str(predictions_path)}
    write_report(report, report_path)
    return report


class _Recorder:
    """Writes one prediction line per finished sample and advances the progress bar."""

    def __init__(self, writer: AnswerWriter, bar: Any, files: dict[int, TaskFile]) -> None:
        self.writer, self.bar, self.files = writer, bar, files

    def done(self, sample: Task, prediction: str, **extra: Any) -> None:
        self._write({"id": sample.id, "file": self.files[id(sample)].name, "prediction": prediction, **extra})

    def fail(self, sample: Task, error: str) -> None:
        log.warning("%s: %s", sample.where, error)
        self._write({"id": sample.id, "file": self.files[id(sample)].name, "prediction": "", "error": error})

    def rank(self, model: Any, sample: Task) -> None:
        options = self.files[id(sample)].options[sample.id]
        if sample.image is None:
            self.fail(sample, "rank mode needs an image")
            return
        try:
            ranking = model.rank(str(sample.image), sample.prompt, list(options))
        except IMAGE_ERRORS as err:
            self.fail(sample, f"cannot use image {sample.image_label()}: {err}")
            return
        self.done(sample, ranking[0][0], ranking=[[c, float(s)] for c, s in ranking])

    def _write(self, row: dict) -> None:
        self.writer.write(row)
        self.bar.update(1)


# ----------------------------------------------------------------------------------------------
# Scoring and reports
# ----------------------------------------------------------------------------------------------
@dataclass
class _Scored:
    """A task file's evaluated samples with their answers (None: failed or missing)."""

    task: TaskFile
    samples: tuple[Task, ...]
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
        parsed += [None if a is None else parse_answer(a, s.task.options[sample.id]) for sample, a in zip(s.samples, s.answers)]
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
