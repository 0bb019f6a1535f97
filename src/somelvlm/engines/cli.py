"""`somelvlm generate --input ...`: the task-file options and the choice of engine.

One process by default; sharded over processes when started by `accelerate launch` (or torchrun);
on a Ray cluster with `--engine ray`. Every path reads with `tasks.records`, answers with
`tasks.answer` and writes with `tasks.output`, so their outputs are interchangeable.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from ..options import GenerationOptions
from ..tasks.job import JobSpec
from ..tasks.output import OUTPUT_FORMATS, check_output
from ..tasks.records import FORMATS, Columns
from ..tasks.templates import describe, template
from .accelerate import run_distributed, run_single, world_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The task-file options of `generate`."""
    g = p.add_argument_group("task files (--input/--output)")
    g.add_argument("--input", type=Path, help="task file: .jsonl, .json (a list), .csv or .parquet")
    g.add_argument("--output", type=Path, help="answers file (.jsonl, default, or .parquet); appended and "
                                               "resumable; its settings are recorded in OUTPUT.somelvlm.json")
    g.add_argument("--images-root", type=Path, help="folder the tasks' image names are relative to "
                                                    "(default: the task file's folder)")
    g.add_argument("--batch-size", type=int, default=8, help="distinct images per vision call and prompts decoded "
                        "at once: a finished answer's place goes to the next prompt (default: %(default)s)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="processes that decode images ahead of the model (default: 2 on a GPU, else 0)")
    g.add_argument("--prompt-column", help="column with the prompt (default: 'prompt' or 'text_input'); with "
                                           "--task, the column with the post's text")
    g.add_argument("--image-column", help="column with the image file name or bytes (default: 'image'); "
                                          "rows without one are answered text-only")
    g.add_argument("--id-column", help="column with the task id (default: 'id', else the 0-based row number)")
    g.add_argument("--keep-columns", default="", help="comma-separated input columns copied into each answer row")
    g.add_argument("--task", metavar="NAME", help=f"wrap each post's text in a SoMeData prompt: {describe()}")
    g.add_argument("--input-format", choices=FORMATS, help="default: from the file extension")
    g.add_argument("--output-format", choices=OUTPUT_FORMATS, help="default: from the file extension (jsonl)")
    g.add_argument("--force", action="store_true", help="resume an output written with other settings")
    g.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process (or each process of `accelerate launch`); ray: Ray Data "
                        "(pip install 'somelvlm[ray]')")
    g.add_argument("--ray-actors", type=int, default=1, help="Ray: model replicas (default: %(default)s)")
    g.add_argument("--ray-gpus-per-actor", type=float, default=0.0, help="Ray: GPUs per replica "
                                                                         "(default: %(default)s)")


def job_spec(args: argparse.Namespace, options: GenerationOptions) -> JobSpec:
    """Validate the task-file options (before any model is loaded) and build the job."""
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.num_workers is not None and args.num_workers < 0:
        raise ValueError("--num-workers must be >= 0")
    if args.ray_actors < 1:
        raise ValueError("--ray-actors must be at least 1")
    if not args.input.is_file():
        raise FileNotFoundError(f"tasks file not found: {args.input}")
    if args.images_root is not None and not args.images_root.is_dir():
        raise FileNotFoundError(f"--images-root is not a folder: {args.images_root}")
    keep = tuple(c.strip() for c in args.keep_columns.split(",") if c.strip())
    columns = Columns(prompt=args.prompt_column, image=args.image_column, id=args.id_column, keep=keep)
    spec = JobSpec(args.input, args.output, args.images_root, columns, args.task, args.batch_size, options,
                   args.input_format, args.output_format, args.num_workers)
    if args.task:
        template(args.task)  # an unknown name fails here, listing the known ones
    check_output(spec.output, [spec.input])
    return spec


def run(args: argparse.Namespace, overrides: dict[str, Any], load_model: Callable[[Any], Any]) -> int:
    """Run `generate --input` with the decoding flags given (`overrides`, over the model folder's
    stored defaults); `load_model(device)` loads the model (device None: the default)."""
    folder = Path(str(args.model))
    stored = GenerationOptions.load(folder) if folder.is_dir() else GenerationOptions()
    spec = job_spec(args, stored.replace(**overrides))
    progress = not args.no_progress
    if args.engine == "ray":
        from .ray import answer_dataset

        result = answer_dataset(spec, model=args.model, dtype=args.dtype, device=args.device,
                                actors=args.ray_actors, gpus_per_actor=args.ray_gpus_per_actor, force=args.force)
    elif world_size() > 1:
        result = run_distributed(load_model, args.model, spec, progress, args.force)
    else:
        result = run_single(load_model(None), args.model, spec, progress, args.force)
    if result is None:  # not the main process of a distributed run: it reports for all
        return 0
    print(result.summary(spec.output), file=sys.stderr)
    return 0 if result.ok else 1
