"""Data-parallel batch jobs under `accelerate launch` (many GPUs on one machine or a few).

    accelerate launch --multi_gpu --num_processes 8 -m somelvlm.generate --model DIR --input posts.jsonl --output answers.jsonl

Every process reads the task file, skips what is already answered (in the output and in any part
file of an earlier run, whatever its process count), and answers its shard: all tasks of an image
go to one process (`tasks.job.shard`), so each image is encoded once. Process `r` appends to its
own part file `OUTPUT.parts/part-r.jsonl` through the resumable writer. When all are done the main
process merges the parts into the output (each id once) and removes them. A killed run resumes
on any number of processes: ids in leftover part files count as done and are merged at the end.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from ..tasks.job import JobResult, JobSpec, run_job
from ..tasks.output import AnswerWriter, RunSettings, check_output, read_rows

log = logging.getLogger("somelvlm")


def world_size() -> int:
    """Processes of the current `accelerate launch` / `torchrun` job (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def part_files(output: Path) -> list[Path]:
    return sorted(p for p in parts_dir(output).glob("part-*.jsonl") if p.is_file())


def run_distributed(load_model: Callable[[Any], Any], model_spec: Any, spec: JobSpec, progress: bool = True,
                    force: bool = False) -> JobResult | None:
    """Answer `spec` on this process's shard and merge on the main process (see module doc).
    `load_model(device)` loads the model for this process's device. Returns the totals of all
    processes on the main process, None on the others."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU processes talk over gloo
    check_output(spec.output, [spec.input])  # every process refuses before anything is written
    model = load_model(state.device)
    settings = spec.settings(model, model_spec)
    done = set(_done_ids(spec, settings, force)) if state.is_main_process else None
    done = _broadcast(done)
    parts = parts_dir(spec.output)
    if state.is_main_process:
        parts.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    part = parts / f"part-{state.process_index}.jsonl"
    result = run_job(model, spec, settings, progress=progress and state.is_main_process, force=force,
                     output=part, done=done, part=(state.process_index, state.num_processes),
                     report_problems=state.is_main_process)
    state.wait_for_everyone()
    everyone = gather_object([result]) if state.num_processes > 1 else [result]
    if not state.is_main_process:
        return None
    merged = merge_parts(spec, settings, force)
    log.info("merged %d answer(s) from %d process(es) into %s", merged, state.num_processes, spec.output)
    total = JobResult(answered=sum(r.answered for r in everyone), skipped=len(done), retried=result.retried,
                      failures=[f for r in everyone for f in r.failures], seconds=max(r.seconds for r in everyone))
    return total


def run_single(model: Any, model_spec: Any, spec: JobSpec, progress: bool = True, force: bool = False) -> JobResult:
    """One process: answers are appended to the output as they come; the part files a killed
    multi-process run left behind count as done and are merged at the end."""
    settings = spec.settings(model, model_spec)
    leftover = bool(part_files(spec.output))
    done = _done_ids(spec, settings, force) if leftover else ()
    result = run_job(model, spec, settings, progress, force, done=done)
    if leftover:
        log.info("merged %d answer(s) left by an earlier multi-process run", merge_parts(spec, settings, force))
    return result


def _done_ids(spec: JobSpec, settings: RunSettings, force: bool) -> list[Any]:
    """Ids answered in the output or in any leftover part file; opening each through the writer
    checks its recorded settings and repairs a torn last line."""
    ids = []
    for part in part_files(spec.output):
        with AnswerWriter(part, [spec.input], settings, force=force) as w:
            ids += list(w.done)
    with AnswerWriter(spec.output, [spec.input], settings, force=force, fmt=spec.output_format) as w:
        ids += list(w.done)
    return ids


def _broadcast(value: Any) -> Any:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def merge_parts(spec: JobSpec, settings: RunSettings, force: bool = False) -> int:
    """Append every part row whose id is not in the output yet; then remove the parts folder."""
    merged = 0
    with AnswerWriter(spec.output, [spec.input], settings, force=force, fmt=spec.output_format) as out:
        for part in part_files(spec.output):
            for row in read_rows(part, repair=False):
                if "error" not in row and row["id"] not in out.done:
                    out.write(row)
                    merged += 1
    shutil.rmtree(parts_dir(spec.output), ignore_errors=True)
    return merged
