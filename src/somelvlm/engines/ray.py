"""Batch jobs on a Ray cluster with Ray Data (`somelvlm generate --engine ray`, extra `somelvlm[ray]`).

Pipeline: `read_binary_files` (local paths or any filesystem Ray supports: s3://, gs://, hdfs://)
-> parse each file with somelvlm's one task reader on CPU workers (bad records are reported with
FILE:LINE and skipped, exactly as in one process) -> decode and preprocess images on CPU workers
-> `map_batches(Answerer)`: a callable class that loads the model once per actor (`concurrency`
actors, `num_gpus` each) and answers each batch grouped by image (one vision pass per image)
-> the driver streams the rows into the same resumable writer as every other engine.

Python recipe (the same as the CLI):

    import ray
    from somelvlm.engines.ray import answer_dataset
    from somelvlm.tasks.job import JobSpec
    ray.init()
    answer_dataset(JobSpec(input=Path("posts.jsonl"), output=Path("answers.jsonl")), model="DIR",
                   actors=4, gpus_per_actor=1)
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import SoMeLVLMConfig
from ..model import SoMeLVLM
from ..options import GenerationOptions
from ..processing import preprocess_image
from ..tasks.answer import answer_tasks
from ..tasks.job import JobResult, JobSpec, answer_row
from ..tasks.output import AnswerWriter, RunSettings, check_output
from ..tasks.records import IMAGE_ERRORS, Problems, Task, parse_tasks
from ..tasks.templates import template as template_text

log = logging.getLogger("somelvlm")


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("--engine ray needs Ray Data: pip install 'somelvlm[ray]'") from None
    return ray


def _task_rows(spec: JobSpec, path: str, data: bytes) -> list[dict]:
    """Rows of one task file: good tasks, and one `{"problem"}` row per bad record."""
    problems = Problems(verbose=False)
    template = template_text(spec.task) if spec.task else None
    tasks = parse_tasks(Path(path), data, spec.images_root, spec.columns, problems, template, spec.input_format)
    rows = [{"task": json.dumps(_task_dict(t)), "problem": ""} for t in tasks]
    return rows + [{"task": "", "problem": line} for line in problems.lines()]


def _task_dict(t: Task) -> dict:
    image = t.image.hex() if isinstance(t.image, bytes) else (None if t.image is None else str(t.image))
    return {"id": t.id, "prompt": t.prompt, "image": image, "bytes": isinstance(t.image, bytes),
            "where": t.where, "extra": t.extra}


def _task(d: dict) -> Task:
    image = None if d["image"] is None else bytes.fromhex(d["image"]) if d["bytes"] else Path(d["image"])
    return Task(d["id"], d["prompt"], image, d["where"], None, d["extra"])


def decode(row: dict, image_size: int) -> dict:
    """Reading stage (CPU tasks): the task's image -> preprocessed float32 pixels, or an error."""
    task = _task(json.loads(row["task"]))
    pixels, error = b"", ""
    if task.image is not None:
        source = task.image if isinstance(task.image, bytes) else str(task.image)
        try:
            pixels = preprocess_image(source, image_size).numpy().astype(np.float32).tobytes()
        except IMAGE_ERRORS as e:
            error = f"cannot use image {task.image_label()}: {e}"
    return {**row, "pixels": pixels, "error": error}


class Answerer:
    """Model stage: one model per actor; a batch is answered grouped by image."""

    def __init__(self, model: str, dtype: str | None, device: str | None, options: dict, batch_size: int) -> None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = SoMeLVLM.load(model, dtype=dtype, device=device)
        self.options, self.batch_size = GenerationOptions.from_dict(options), batch_size
        self.size = self.model.require_processor().image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        out: dict[str, list] = {"row": [], "error": []}
        tasks, pixels = [], {}
        for task_json, data, error in zip(batch["task"], batch["pixels"], batch["error"]):
            task = _task(json.loads(task_json))
            if error:
                out["row"].append(json.dumps({"where": task.where}))
                out["error"].append(error)
                continue
            tasks.append(task)
            if task.image is not None and task.image_key not in pixels:
                array = np.frombuffer(bytes(data), dtype=np.float32).reshape(3, self.size, self.size)
                pixels[task.image_key] = torch.from_numpy(array.copy())

        def on_answer(task: Task, answer: str) -> None:
            out["row"].append(json.dumps(answer_row(task, answer), ensure_ascii=False))
            out["error"].append("")

        def on_error(task: Task, why: str) -> None:
            out["row"].append(json.dumps({"where": task.where}))
            out["error"].append(why)

        answer_tasks(self.model, tasks, self.options, on_answer, on_error, self.batch_size, images=pixels)
        return out


def answer_dataset(spec: JobSpec, model: str = "tiny", dtype: str | None = None, device: str | None = None,
                   actors: int = 1, gpus_per_actor: float = 0, cpus_per_actor: float = 1.0, rows_per_batch: int = 64,
                   force: bool = False, settings: RunSettings | None = None) -> JobResult:
    """Run `spec` on the connected Ray cluster (`ray.init()` first, or a local one is started)."""

    ray = _ray()
    start = time.perf_counter()
    check_output(spec.output, [spec.input])
    config = _config(model)
    settings = settings or RunSettings.of(config, dtype or "as stored", model, spec.options, task=spec.task,
                                          prompt_column=spec.columns.prompt)
    result = JobResult()
    with AnswerWriter(spec.output, [spec.input], settings, force=force, fmt=spec.output_format) as writer:
        done = set(writer.done)
        result.retried = writer.retried
        image_size = config.vision.image_size
        ds = ray.data.read_binary_files(str(spec.input), include_paths=True)
        ds = ds.flat_map(lambda r: _task_rows(spec, r["path"], r["bytes"]))
        problems = ds.filter(lambda r: bool(r["problem"]))
        todo = ds.filter(lambda r: not r["problem"] and json.loads(r["task"])["id"] not in done)
        for row in problems.iter_rows():
            log.error(row["problem"])
            result.failures.append(row["problem"])
        result.skipped = ds.filter(lambda r: not r["problem"]).count() - todo.count()
        # its own CPU tasks (a resource request unlike the actors', so Ray does not fuse the stages)
        answered = todo.map(decode, fn_kwargs={"image_size": image_size}, num_cpus=0.5) \
            .map_batches(Answerer, batch_size=rows_per_batch, concurrency=actors, num_gpus=gpus_per_actor,
                         num_cpus=0 if gpus_per_actor else cpus_per_actor, fn_constructor_kwargs={"model": model, "dtype": dtype, "device": device,
                                                "options": spec.options.to_dict(), "batch_size": spec.batch_size})
        for row in answered.iter_rows():
            if row["error"]:
                msg = f"{json.loads(row['row'])['where']}: {row['error']}"
                log.error(msg)
                result.failures.append(msg)
            else:
                writer.write(json.loads(row["row"]))
                result.answered += 1
    result.seconds = time.perf_counter() - start
    return result


def _config(model: str) -> SoMeLVLMConfig:
    if model in (None, "tiny"):
        return SoMeLVLMConfig.preset("tiny")
    return SoMeLVLMConfig.load(Path(model) / "config.json")
