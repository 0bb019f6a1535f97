"""`somelvlm finetune`: LAVIS-style instruction tuning of SoMeLVLM on `accelerate`.

    somelvlm finetune --model DIR|tiny --train data.json --images-root DIR --out RUN [--eval dev.json]
    accelerate launch -m somelvlm.train --model DIR --train data.json --out RUN     # same arguments
    somelvlm finetune --resume RUN                                                  # continue RUN

Library use: `train(FinetuneConfig(...))`, `train(FinetuneConfig.for_resume(run))`.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Sequence

from ..console import run_command, setup_logging
from .checkpoint import Diverged
from .data import (Batch, Collator, EpochBatchSampler, InstructionDataset, Problems, Sample, read_samples,
                   train_dataset)
from .lora import DEFAULT_TARGETS, add_lora, merge_lora
from .trainer import (FinetuneConfig, build_model, frozen_dtype, lr_at, mixed_precision, param_groups, token_nll,
                      train)

__all__ = ["add_parser", "run", "main", "train", "FinetuneConfig", "Diverged", "build_model", "mixed_precision",
           "frozen_dtype", "param_groups", "lr_at", "token_nll", "read_samples", "Sample", "Problems",
           "InstructionDataset", "train_dataset", "Collator", "Batch", "EpochBatchSampler", "add_lora", "merge_lora",
           "DEFAULT_TARGETS"]


def configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag per `FinetuneConfig` field. Defaults are left out of the namespace (SUPPRESS) so that
    `run` can tell the flags that were given, which override a resumed run's saved settings."""
    for f in fields(FinetuneConfig):
        kwargs = dict(f.metadata["argparse"])
        default = f.default_factory() if callable(f.default_factory) else f.default
        shown = "" if default is None or default is False or default == [] else f" (default: {default})"
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS,
                            help=f.metadata["help"] + shown, **kwargs)
    return parser


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `finetune` on the `somelvlm` command line."""
    p = subparsers.add_parser("finetune", help="instruction-tune a model (LAVIS recipe; accelerate-ready)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(p)
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    names = {f.name for f in fields(FinetuneConfig)}
    given = {k: v for k, v in vars(args).items() if k in names}
    if given.get("resume"):
        return FinetuneConfig.for_resume(given.pop("resume"), **given)
    return FinetuneConfig(**given)


def run(args: argparse.Namespace) -> int:
    train(config_from_args(args))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m somelvlm.train` / `accelerate launch -m somelvlm.train`."""
    parser = configure(argparse.ArgumentParser(prog="somelvlm.train", description=__doc__,
                                               formatter_class=argparse.RawDescriptionHelpFormatter))
    args = parser.parse_args(argv)
    setup_logging()
    return run_command(run, args, parser.prog)
