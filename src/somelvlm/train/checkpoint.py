"""Training checkpoints: `RUN/checkpoints/step-N/` with the trainable weights (safetensors), the
optimizer and scheduler, every process's RNG states and the data position, written atomically;
and the exact resume from them."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..folder import atomic_folder, write_json
from .data import Problems

log = logging.getLogger("somelvlm")


@dataclass
class TrainState:
    """Where training stands after `step` optimizer steps; the next micro-batch is batch `batch`
    (0-based, in global batches) of epoch `epoch`."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


class Diverged(ValueError):
    """Training produced a non-finite loss, learning rate or weights: the run stops without `final/`."""

    def __init__(self, step: int, problem: str, detail: str = "") -> None:
        self.step, self.problem = step, problem
        super().__init__(f"training diverged at step {step}: {problem}" + (f"; {detail}" if detail else ""))


STEP_FOLDER = re.compile(r"step-(\d+)")
CHECKPOINT_FILES = ("state.json", "trainable.safetensors")


def checkpoints(run: Path, warn: bool = False) -> list[Path]:
    """The run's complete `checkpoints/step-N` folders, oldest first. Anything else there (a copy, a
    `step-N` without its files) is left alone, with a warning when `warn`."""
    found = []
    for p in (run / "checkpoints").glob("step-*"):
        m = STEP_FOLDER.fullmatch(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in CHECKPOINT_FILES):
            found.append((int(m.group(1)), p))
        elif warn:
            why = "not a complete checkpoint" if m else "not a checkpoint folder name (step-N)"
            log.warning("ignoring %s: %s", p, why)
    return [p for _, p in sorted(found)]


def prune_checkpoints(accelerator: Any, run: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (0: keep all); main process only."""
    if accelerator.is_main_process and keep > 0:
        for old in checkpoints(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values (loadable with `weights_only=True`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def fingerprint(model: nn.Module) -> list[float]:
    """Sum and sum of squares of the trainable weights: equal on every DDP process, or something broke."""
    s = torch.zeros(2, dtype=torch.float64)
    for _, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach().double()
            s += torch.stack([t.sum(), t.square().sum()]).cpu()
    return s.tolist()


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def save_checkpoint(accelerator: Any, model: nn.Module, optimizer: Any, scheduler: Any, state: TrainState,
                    run: Path, trainable: list[str], problems: Problems) -> Path:
    """Write `RUN/checkpoints/step-N` atomically (a temporary folder renamed when complete) and return it.

    Raises `Diverged` (on every process) instead when a trainable weight is not finite. Older
    checkpoints are left in place (see `prune_checkpoints`)."""
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    full = accelerator.get_state_dict(model)  # gathers under FSDP / DeepSpeed; views otherwise
    rngs = gather_object([rng_state()])
    skipped = gather_object([problems.items])
    prints = gather_object([fingerprint(accelerator.unwrap_model(model))])
    bad = [x for f in prints for x in f if not math.isfinite(x)]
    if bad:
        raise Diverged(state.step, f"a trainable weight is not finite (their sum is {bad[0]})")
    folder = run / "checkpoints" / f"step-{state.step:08d}"
    tmp_shared = run / "checkpoints" / f".step-{state.step:08d}.accelerate"
    if _sharded(accelerator):  # optimizer shards are written by every process, as accelerate does it
        accelerator.save_state(str(tmp_shared))
    if accelerator.is_main_process:
        with atomic_folder(folder, force=True) as tmp:
            save_file({n: full[n].detach().to("cpu").contiguous() for n in trainable},
                      str(tmp / "trainable.safetensors"), metadata={"format": "pt"})
            if _sharded(accelerator):
                os.replace(tmp_shared, tmp / "accelerate")
            else:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rngs, tmp / "rng.pt")
            merged = dict(chain.from_iterable(d.items() for d in skipped))
            write_json(tmp / "state.json", {**asdict(state), "num_processes": accelerator.num_processes,
                                            "fingerprints": prints, "skipped_at_runtime": merged})
        if not _sharded(accelerator) and any(f != prints[0] for f in prints):
            log.warning("the processes hold different trainable weights at step %d: %s", state.step, prints)
    accelerator.wait_for_everyone()
    return folder


def load_trainable(model: nn.Module, folder: Path) -> None:
    """Put a checkpoint's trainable weights into `model` (before `accelerator.prepare`)."""
    from safetensors.torch import load_file

    weights = load_file(str(folder / "trainable.safetensors"))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"{folder}: the checkpoint's trainable weights do not fit this model "
                         f"(missing {missing[:5]}, unexpected {extra[:5]}); resume with the run's own settings")
    model.load_state_dict(weights, strict=False)


def load_checkpoint(accelerator: Any, folder: Path, optimizer: Any, scheduler: Any,
                    problems: Problems) -> tuple[TrainState, dict[str, Any]]:
    """Optimizer, scheduler and position of a checkpoint (after `prepare`); returns this process's RNG state."""
    meta = json.loads((folder / "state.json").read_text())
    if meta["num_processes"] != accelerator.num_processes:
        raise ValueError(f"{folder} was written by {meta['num_processes']} processes, this run has "
                         f"{accelerator.num_processes}: exact resuming needs the same number")
    if _sharded(accelerator):
        accelerator.load_state(str(folder / "accelerate"))
    else:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    for where, why in meta.get("skipped_at_runtime", {}).items():
        problems.items.setdefault(where, why)
    rngs = torch.load(folder / "rng.pt", weights_only=True)
    state = TrainState(meta["step"], meta["epoch"], meta["batch"])
    return state, rngs[accelerator.process_index]
