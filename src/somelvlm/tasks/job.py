"""A batch job: a task file in, one answer row per task out, resumable (`generate --input`).

Output rows are `{"id", "image", "prompt", "answer", **kept columns}`. Failed tasks (bad records,
unusable images) are reported with `FILE:LINE` and not written, so a rerun retries them; tasks
already answered are skipped. The same job runs in one process (`run_job`) or sharded by image
over processes (`somelvlm.engines`), which write part files through the same writer.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..options import GenerationOptions
from .answer import answer_tasks
from .output import AnswerWriter, RunSettings
from .records import Columns, Problems, Task, read_tasks
from .templates import template as template_text

log = logging.getLogger("somelvlm")


@dataclass(frozen=True)
class JobSpec:
    """What to answer and where to put it."""

    input: Path
    output: Path
    images_root: Path | None = None
    columns: Columns = Columns()
    task: str | None = None  # a prompt template name (`templates.TEMPLATES`)
    batch_size: int = 8
    options: GenerationOptions = GenerationOptions()
    input_format: str | None = None
    output_format: str | None = None
    num_workers: int | None = None  # image decoding processes (None: 2 on a GPU, else 0); answers do not depend on it

    def read(self, problems: Problems) -> list[Task]:
        template = template_text(self.task) if self.task else None
        return read_tasks(self.input, self.images_root, self.columns, problems, template, self.input_format)

    def settings(self, model: Any, model_spec: Any) -> RunSettings:
        dtype = getattr(getattr(model, "llm", None), "dtype", None) or next(model.parameters()).dtype
        return RunSettings.of(model.config, dtype, model_spec, self.options, task=self.task,
                              prompt_column=self.columns.prompt)


@dataclass
class JobResult:
    answered: int = 0
    skipped: int = 0  # already in the output
    retried: int = 0  # failed in an earlier run, tried again now
    failures: list[str] = field(default_factory=list)  # "FILE:LINE: why"
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self, output: Path) -> str:
        rate = self.answered / self.seconds if self.seconds else 0.0
        retry = f" (retried {self.retried} earlier failure(s))" if self.retried else ""
        again = "; failed tasks are retried when you rerun the same command" if self.failures else ""
        return (f"answered {self.answered}{retry}, already done {self.skipped}, failed {len(self.failures)} "
                f"({rate:.2f} tasks/s) -> {output}{again}")


def shard(tasks: Sequence[Task], index: int, count: int) -> list[Task]:
    """Process `index` of `count`'s share: images dealt round-robin in first-seen order (all tasks of
    an image go to one process, so it is encoded once), text-only tasks round-robin by position."""
    slots: dict[Any, int] = {}
    mine = []
    for position, t in enumerate(tasks):
        slot = position if t.image is None else slots.setdefault(t.image_key, len(slots))
        if slot % count == index:
            mine.append(t)
    return mine


def answer_row(task: Task, answer: str) -> dict:
    return {"id": task.id, "image": task.image_label(), "prompt": task.prompt, "answer": answer, **task.extra}


def run_job(model: Any, spec: JobSpec, settings: RunSettings, progress: bool = True, force: bool = False,
            output: Path | None = None, done: Sequence[Any] = (), part: tuple[int, int] | None = None,
            report_problems: bool = True) -> JobResult:
    """Answer `spec.input` into `output` (default `spec.output`), skipping ids in the output or `done`.

    `part=(index, count)` answers only `shard(todo, index, count)` of the tasks still to do."""
    start = time.perf_counter()
    problems = Problems(verbose=report_problems)
    tasks = spec.read(problems)
    result = JobResult(failures=problems.lines() if report_problems else [])
    with AnswerWriter(output or spec.output, [spec.input], settings, force=force, fmt=spec.output_format) as writer:
        finished = set(writer.done) | set(done)
        todo = [t for t in tasks if t.id not in finished]
        result.skipped, result.retried = len(tasks) - len(todo), writer.retried
        if part is not None:
            todo = shard(todo, *part)
        with logging_redirect_tqdm(), tqdm(total=len(todo), unit="task", desc="answering",
                                           disable=not progress) as bar:
            def on_answer(task: Task, answer: str) -> None:
                writer.write(answer_row(task, answer))
                result.answered += 1
                bar.update()

            def on_error(task: Task, why: str) -> None:
                msg = f"{task.where}: {why}"
                log.error(msg)
                result.failures.append(msg)
                bar.update()

            answer_tasks(model, todo, spec.options, on_answer, on_error, spec.batch_size,
                         num_workers=spec.num_workers)
    result.seconds = time.perf_counter() - start
    return result
