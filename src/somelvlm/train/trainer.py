"""Instruction tuning as LAVIS does it for InstructBLIP / SoMeLVLM, on `accelerate`.

One process, one GPU, or many GPUs / nodes (DDP; FSDP and DeepSpeed through an accelerate
config): `accelerate` places the model, wraps it, runs bf16 autocast on GPU and reduces the loss;
this file has no distribution code of its own. Only the main process writes files.

Run folder (`--out RUN`):
```
args.json                     the settings (what `--resume RUN` continues with)
log.jsonl                     one line per logged step: step, epoch, loss, lr, samples_per_s, grad_norm
                              (+ eval_loss lines); TensorBoard event files in tensorboard/ when installed
checkpoints/step-00001000/    trainable.safetensors, optimizer.pt, scheduler.pt, rng.pt, state.json
final/                        a complete model folder (`SoMeLVLM.from_pretrained`), LoRA merged;
                              + checkpoint.pth (LAVIS format) with --lavis-checkpoint
lora-adapter/                 with --lora: the adapters alone (peft format)
skipped.txt                   every sample left out, with file and line / record
diverged/step-N/              after a non-finite loss: the checkpoint whose weights gave it
```
A run stops (`Diverged`, no `final/`) when the loss, the learning rate or the weights stop being
finite; a checkpoint counts as good once the next step's loss is finite, and only then are older
ones rotated out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from itertools import chain
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler

from ..folder import atomic_folder
from ..precision import parse_dtype
from ..lavis import lavis_state_dict
from ..model import SoMeLVLM
from ..processing import IGNORE_INDEX
from .checkpoint import (Diverged, TrainState, _sharded, checkpoints, load_checkpoint, load_trainable,
                         prune_checkpoints, save_checkpoint, set_rng_state, write_text_atomic)
from .data import Batch, Collator, EpochBatchSampler, Key, Problems, ShardSampler, eval_dataset, read_all, train_dataset
from .lora import DEFAULT_TARGETS, add_lora, has_lora, merge_lora, save_adapter

log = logging.getLogger("somelvlm")


MIXED_PRECISION = ("no", "bf16", "fp16")
PRECISION_DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_workers(processes_here: int = 1) -> int:
    """Data loader workers per training process: the CPU cores this process may use, shared by the
    training processes on this machine, at most 4 (more than the cores makes torch warn)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return min(4, cores // max(processes_here, 1))


def _opt(default: Any, help: str, **argparse: Any) -> Any:
    """A config field with its command-line help (see `somelvlm.train.add_parser`)."""
    meta = {"help": help, "argparse": argparse}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class FinetuneConfig:
    """Every setting of a run; defaults are LAVIS's InstructBLIP instruction-tuning defaults."""

    model: str = _opt("tiny", "model folder (SoMeLVLM.from_pretrained) or 'tiny' (built-in random model)")
    train: list[str] = _opt([], "training annotation file(s): JSON list or JSONL of "
                                "{text_input, text_output, image}", nargs="+", metavar="FILE")
    images_root: str | None = _opt(None, "folder the 'image' names are relative to (default: each "
                                         "annotation file's folder)", metavar="DIR")
    out: str | None = _opt(None, "run folder to create (see `somelvlm.train.trainer` for its layout)",
                           metavar="RUN")
    eval: list[str] = _opt([], "evaluation annotation file(s): loss at every checkpoint and at the end",
                           nargs="+", metavar="FILE")
    resume: str | None = _opt(None, "continue RUN from its latest checkpoint with its saved settings "
                                    "(flags given here override them)", metavar="RUN")
    # optimisation
    lr: float = _opt(1e-5, "peak learning rate", type=float)
    min_lr: float = _opt(0.0, "learning rate at the end of the cosine decay", type=float)
    warmup_lr: float = _opt(1e-8, "learning rate at step 0 of the linear warm-up", type=float)
    warmup_steps: int = _opt(1000, "linear warm-up steps (optimizer steps)", type=int)
    weight_decay: float = _opt(0.05, "AdamW weight decay (none on 1-D parameters and biases)", type=float)
    max_steps: int | None = _opt(None, "optimizer steps to train (default: --epochs)", type=int)
    epochs: int | None = _opt(None, "epochs to train (default 1 when --max-steps is not given)", type=int)
    batch_size: int = _opt(4, "samples per process per micro-batch", type=int)
    grad_accum: int = _opt(1, "micro-batches per optimizer step", type=int)
    max_grad_norm: float | None = _opt(None, "clip the gradient norm to this (default: no clipping, as LAVIS)",
                                       type=float)
    seed: int = _opt(42, "seed of the data order, augmentation and dropout", type=int)
    # what trains
    unfreeze_llm: bool = _opt(False, "train the whole LLM too", action="store_true")
    lora: bool = _opt(False, "train LoRA adapters on the LLM (needs peft)", action="store_true")
    lora_r: int = _opt(8, "LoRA rank", type=int)
    lora_alpha: int = _opt(16, "LoRA alpha", type=int)
    lora_dropout: float = _opt(0.05, "LoRA dropout", type=float)
    lora_targets: str = _opt(",".join(DEFAULT_TARGETS), "comma-separated LLM module names that get LoRA")
    train_vit: bool = _opt(False, "train the vision encoder too", action="store_true")
    qformer_dropout: float | None = _opt(None, "override the Q-Former dropout (default: the model's, 0.1)",
                                         type=float)
    # numerics, memory, speed
    mixed_precision: str | None = _opt(None, "autocast of the forward and backward pass: no | bf16 | fp16 "
                                             "(default: bf16 on a GPU, fp16 on a GPU without bf16, no on the CPU)",
                                       choices=MIXED_PRECISION)
    dtype: str | None = _opt(None, "dtype the frozen parts are stored in: fp32 | bf16 | fp16 (default: the "
                                   "--mixed-precision dtype, fp32 with no); trainable parameters are always fp32",
                             choices=("fp32", "bf16", "fp16"))
    grad_checkpointing: bool = _opt(False, "gradient checkpointing in the ViT and the LLM", action="store_true")
    cpu: bool = _opt(False, "run on the CPU even when a GPU is present", action="store_true")
    num_workers: int | None = _opt(None, "data loader worker processes per training process (default: this "
                                         "machine's CPU cores / its training processes, at most 4; "
                                         f"{default_workers()} for one process here)", type=int)
    no_progress: bool = _opt(False, "no progress bar; print one plain line per logged step instead",
                             action="store_true")
    # outputs
    save_every: int = _opt(1000, "checkpoint every N optimizer steps (and always at the end)", type=int)
    keep_checkpoints: int = _opt(2, "keep the newest N checkpoints (0: keep all)", type=int)
    log_every: int = _opt(10, "log every N optimizer steps", type=int)
    lavis_checkpoint: bool = _opt(False, "also write final/checkpoint.pth in LAVIS's format",
                                  action="store_true")

    def __post_init__(self) -> None:
        if self.dtype == "auto":  # runs saved before --mixed-precision existed: "auto" is the default now
            self.dtype = None

    def check(self) -> "FinetuneConfig":
        """Clear errors for settings that cannot work; returns self."""
        if not self.train:
            raise ValueError("give the training data with --train FILE")
        if not self.out:
            raise ValueError("give the run folder with --out RUN")
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("give --max-steps or --epochs, not both")
        if self.lora and self.unfreeze_llm:
            raise ValueError("--lora and --unfreeze-llm exclude each other")
        for name in ("batch_size", "grad_accum", "log_every", "save_every", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("max_steps", "epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("lr", "min_lr", "warmup_lr", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, not {value}")
        if self.lr == 0:
            raise ValueError("--lr must be > 0")
        for name in ("warmup_steps", "keep_checkpoints", "num_workers"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        for name in ("qformer_dropout", "lora_dropout"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1)")
        return self

    @classmethod
    def for_resume(cls, run: str | Path, **overrides: Any) -> "FinetuneConfig":
        """The saved settings of `run` (its `args.json`) with `overrides` applied."""
        run = Path(run)
        path = run / "args.json"
        if not path.is_file():
            raise FileNotFoundError(f"{run} is not a run folder (no args.json); --resume needs a folder "
                                    "written by `somelvlm finetune --out`")
        saved = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        settings = {k: v for k, v in saved.items() if k in known}
        out = overrides.pop("out", None)
        if out is not None and Path(out).resolve() != run.resolve():
            raise ValueError(f"--resume continues {run} in place; drop --out {out}")
        for k, v in overrides.items():
            if k in settings and settings[k] != v and k != "resume":
                log.warning("resuming %s with %s=%r (was %r)", run, k, v, settings[k])
        if "max_steps" in overrides or "epochs" in overrides:  # a new length replaces the saved one
            settings.update(max_steps=None, epochs=None)
        settings.update(overrides)
        settings.update(resume=str(run), out=str(run))
        return cls(**settings)


# ------------------------------------------------------------------------------------------------
# The model and what trains
# ------------------------------------------------------------------------------------------------
def build_model(cfg: FinetuneConfig, on_gpu: bool = False) -> SoMeLVLM:
    """Load `cfg.model` and apply the training policy (freezing, LoRA, dropout, checkpointing).

    Frozen parts get `frozen_dtype(cfg, on_gpu)`; every trainable parameter is fp32.
    """
    dtype = frozen_dtype(cfg, on_gpu)
    if cfg.model == "tiny":
        model = SoMeLVLM.from_config("tiny")
        model.to_dtype(dtype)
    else:
        model = SoMeLVLM.from_pretrained(cfg.model, dtype=dtype)
    if model.processor is None:
        raise ValueError(f"{cfg.model}: the model folder has no tokenizer files (tokenizer.model)")
    if cfg.qformer_dropout is not None:
        set_qformer_dropout(model, cfg.qformer_dropout)
    model.apply_freeze_policy(freeze_vision=not cfg.train_vit, freeze_llm=not cfg.unfreeze_llm)
    freeze_unused(model)
    if cfg.lora:
        add_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                 targets=[t.strip() for t in cfg.lora_targets.split(",") if t.strip()])
    for _, p in model.trainable_parameters():
        if p.dtype != torch.float32:
            p.data = p.data.float()
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(vision=True, qformer=False, llm=True)
    return model


def mixed_precision(cfg: FinetuneConfig, on_gpu: bool) -> str:
    """`cfg.mixed_precision`, or its default: bf16 on a GPU (fp16 where bf16 is missing, e.g. V100), no on the CPU."""
    if cfg.mixed_precision is not None:
        return cfg.mixed_precision
    if not on_gpu:
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def frozen_dtype(cfg: FinetuneConfig, on_gpu: bool) -> torch.dtype:
    """`cfg.dtype`, or its default: the mixed-precision dtype (fp32 without mixed precision)."""
    return parse_dtype(cfg.dtype) if cfg.dtype is not None else PRECISION_DTYPES[mixed_precision(cfg, on_gpu)]


def set_qformer_dropout(model: SoMeLVLM, p: float) -> None:
    """Set the Q-Former's hidden and attention-probability dropout to `p`."""
    for m in model.qformer.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if hasattr(m, "dropout_p"):
            m.dropout_p = p


def freeze_unused(model: SoMeLVLM) -> None:
    """Freeze the last Q-Former layer's text feed-forward: its output is discarded (only the query
    rows leave the Q-Former), so it never gets a gradient, in LAVIS either, where AdamW skips it.
    Freezing it keeps the numerics and lets DDP run without `find_unused_parameters`."""
    last = model.qformer.encoder.layer[-1]
    for p in chain(last.intermediate.parameters(), last.output.parameters()):
        p.requires_grad_(False)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """LAVIS's AdamW groups: no weight decay on 1-D parameters and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: FinetuneConfig, total_steps: int) -> float:
    """Linear warm-up from `warmup_lr` to `lr` over `warmup_steps`, then cosine down to `min_lr` at
    `total_steps` (LAVIS `linear_warmup_cosine_lr`, with the cosine counted in steps)."""
    if step < cfg.warmup_steps:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / cfg.warmup_steps
    t, T = step - cfg.warmup_steps, max(total_steps - cfg.warmup_steps, 1)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, T) / T))


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """The global L2 norm of `grads` (what clipping would see)."""
    if not grads:
        return None
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed next-token NLL over labels != -100, and the token counts (`[B]` each).

    `logits` cover `[Q query positions + L text positions]`, `labels` the `L` text positions.
    """
    Q = logits.shape[1] - labels.shape[1]
    pred = logits[:, Q - 1: -1].float()  # position Q+t-1 predicts text token t
    labels = labels.to(pred.device)
    nll = F.cross_entropy(pred.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return nll.sum(1), (labels != IGNORE_INDEX).sum(1)


def export_final(accelerator: Any, model: nn.Module, cfg: FinetuneConfig, run: Path) -> None:
    """`RUN/final` (LoRA merged), `RUN/lora-adapter`, and `final/checkpoint.pth` if asked."""
    if _sharded(accelerator):
        full = accelerator.get_state_dict(model)
        final = None
        if accelerator.is_main_process:
            final = build_model(cfg, on_gpu=accelerator.device.type == "cuda")
            final.load_state_dict(full)
    else:
        final = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        llm_trained = cfg.unfreeze_llm or cfg.lora
        if has_lora(final):
            with atomic_folder(run / "lora-adapter", force=True) as tmp:
                save_adapter(final, tmp)
            merge_lora(final)
        final.save_pretrained(run / "final", force=True)
        if cfg.lavis_checkpoint:
            tmp = run / "final" / ".checkpoint.pth.tmp"
            torch.save({"model": lavis_state_dict(final, with_llm=llm_trained, with_vision=cfg.train_vit)}, tmp)
            os.replace(tmp, run / "final" / "checkpoint.pth")
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------------
# Data iteration and evaluation
# ------------------------------------------------------------------------------------------------
class RunBatchSampler(Sampler[list[Key]]):
    """`EpochBatchSampler`s of every epoch from `(epoch, first)` on, without end: one loader, and so
    one set of worker processes, serves the whole run (a loader per epoch restarts its workers
    every epoch, which dominates on small data sets)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int, first: int,
                 num_processes: int, rank: int) -> None:
        self.args = (num_samples, batch_size, seed)
        self.epoch, self.first, self.num_processes, self.rank = epoch, first, num_processes, rank

    def __iter__(self) -> Iterator[list[Key]]:
        epoch, first = self.epoch, self.first
        while True:
            yield from EpochBatchSampler(*self.args, epoch, first, self.num_processes, self.rank)
            epoch, first = epoch + 1, 0


def micro_batches(dataset: Any, collate: Collator, cfg: FinetuneConfig, accelerator: Any,
                  start: TrainState, workers: int) -> Iterator[tuple[int, int, Batch]]:
    """Endless `(epoch, next batch index, batch)` from the position `start`, epoch after epoch."""
    per_epoch = EpochBatchSampler.batches_per_epoch(len(dataset), cfg.batch_size, accelerator.num_processes)
    sampler = RunBatchSampler(len(dataset), cfg.batch_size, cfg.seed, start.epoch, start.batch,
                              accelerator.num_processes, accelerator.process_index)
    # an own generator: creating a loader must not draw from the global RNG (dropout's)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                        generator=torch.Generator().manual_seed(cfg.seed + start.epoch),
                        pin_memory=accelerator.device.type == "cuda")
    for done, batch in enumerate(loader, start.epoch * per_epoch + start.batch):  # batches before this one
        yield done // per_epoch, done % per_epoch + 1, batch


@torch.no_grad()
def evaluate(accelerator: Any, model: nn.Module, dataset: Any, collate: Collator, batch_size: int) -> float:
    """Token-mean loss over the whole dataset (all processes together)."""
    sampler = ShardSampler(len(dataset), batch_size, accelerator.num_processes, accelerator.process_index)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, generator=torch.Generator())
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    seen = 0
    for batch in loader:
        inputs = batch.inputs(accelerator.device)
        labels = inputs.pop("labels")
        nll, count = token_nll(model(**inputs).logits, labels)
        real = (torch.arange(seen, seen + len(batch), device=nll.device) < sampler.real).double()
        total += torch.stack([(nll.double() * real).sum(), (count.double() * real).sum()])
        seen += len(batch)
    total = accelerator.reduce(total, "sum")
    return (total[0] / total[1].clamp(min=1)).item()


# ------------------------------------------------------------------------------------------------
# Logging
# ------------------------------------------------------------------------------------------------
def _step_of(line: str) -> float:
    """The step of a log line; a line cut short by a crash counts as after every checkpoint."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    return value


class RunLog:
    """`log.jsonl` (+ TensorBoard when installed), main process only."""

    def __init__(self, run: Path, enabled: bool, resume_step: int | None) -> None:
        self.path = run / "log.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():  # drop what the interrupted run logged later
            keep = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) <= resume_step]
            write_text_atomic(self.path, "".join(k + "\n" for k in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run / "tensorboard"))
        except ImportError:
            log.debug("tensorboard not installed: logging to log.jsonl only")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                values = v if isinstance(v, dict) else {"": v}
                for name, x in values.items():
                    if k != "step" and isinstance(x, (int, float)):
                        self.tb.add_scalar(f"{k}/{name}" if name else k, x, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def _make_accelerator(cfg: FinetuneConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import parse_flag_from_env

    on_gpu = torch.cuda.is_available() and not (cfg.cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
    precision = mixed_precision(cfg, on_gpu)
    if precision == "fp16" and not on_gpu:
        raise ValueError("--mixed-precision fp16 needs a GPU (loss scaling); on the CPU use bf16 or no")
    accelerator = Accelerator(cpu=not on_gpu, mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum)
    if accelerator.state.deepspeed_plugin is not None:  # no prepared data loader tells it the batch size
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    return accelerator


def _prepare_run_folder(cfg: FinetuneConfig, main: bool) -> tuple[Path, Path | None, bool]:
    """The run folder, the checkpoint to resume from, and whether the folder holds an earlier attempt
    (whose log is then cut back to the checkpoint). A run that stopped before its first checkpoint
    (every sample bad, diverged early, killed) starts again, with `--resume` or the same `--out`."""
    run = Path(cfg.out)
    for f in cfg.train + cfg.eval:
        if not Path(f).is_file():
            raise FileNotFoundError(f"annotation file not found: {f}")
    is_run = (run / "args.json").is_file()
    found = checkpoints(run, warn=main) if is_run else []
    if cfg.resume:
        if not is_run:
            raise FileNotFoundError(f"{run} is not a run folder (no args.json)")
        if not found and (run / "final").exists():
            raise FileNotFoundError(f"{run} has a final/ model but no checkpoint to resume from (checkpoints/step-N)")
        if not found and main:
            log.warning("%s has no checkpoint yet: starting it from step 0", run)
        return run, found[-1] if found else None, True
    if run.exists() and (not run.is_dir() or any(run.iterdir())):
        if is_run and not found and not (run / "final").exists():
            if main:
                log.warning("%s stopped before its first checkpoint: starting it again", run)
            return run, None, True
        if is_run:
            raise FileExistsError(f"{run} is an existing run: continue it with --resume {run} or pick another --out")
        raise FileExistsError(f"{run} exists and is not empty; pick another --out")
    return run, None, False


def _set_aside(run: Path, unchecked: Path | None) -> str:
    """After a divergence: move the checkpoint written just before it (its weights gave the
    non-finite loss) to `RUN/diverged/`; say what is left to continue from."""
    moved = ""
    if unchecked is not None and unchecked.is_dir():
        target = run / "diverged" / unchecked.name
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(exist_ok=True)
        os.replace(unchecked, target)
        moved = f"{unchecked.name}, whose weights gave it, moved to {target.parent}; "
    good = checkpoints(run)
    if good:
        return f"{moved}last good checkpoint {good[-1]}: continue with --resume {run} and a lower --lr"
    return f"{moved}no good checkpoint: rerun with the same --out (it starts again) and a lower --lr"


def train(cfg: FinetuneConfig) -> Path:
    """Fine-tune as configured (see the module doc for the run folder); returns the run folder.

    Raises `Diverged` (a ValueError) when the loss, the learning rate or the weights stop being
    finite: the run keeps its last good checkpoint and gets no `final/`."""
    from accelerate.utils import gather_object, set_seed
    from tqdm.auto import tqdm

    cfg.check()
    accelerator = _make_accelerator(cfg)
    main = accelerator.is_main_process
    run, ckpt, reused = _prepare_run_folder(cfg, main)
    accelerator.wait_for_everyone()  # every process has checked the folder before the main one writes to it
    P = accelerator.num_processes

    set_seed(cfg.seed)
    model = build_model(cfg, on_gpu=accelerator.device.type == "cuda")
    processor = model.processor
    problems = Problems(verbose=main)
    samples = read_all(cfg.train, cfg.images_root, problems)
    if not samples:
        raise ValueError(f"no usable training samples in {cfg.train} ({len(problems)} skipped, see above)")
    problems.verbose = True  # load-time problems were reported by the main process; runtime ones by each
    dataset, collate = train_dataset(samples, processor, cfg.seed), Collator(processor)
    eval_sets = {}
    for f in cfg.eval:
        eval_samples = read_all([f], cfg.images_root, problems)
        if not eval_samples:
            raise ValueError(f"no usable evaluation samples in {f} (see the warnings above)")
        eval_sets[Path(f).name] = eval_dataset(eval_samples, processor)
    per_epoch = EpochBatchSampler.batches_per_epoch(len(dataset), cfg.batch_size, P)
    if per_epoch == 0:
        raise ValueError(f"{len(dataset)} usable samples are fewer than one global batch "
                         f"({cfg.batch_size} x {P} processes)")
    total = cfg.max_steps or max(1, (cfg.epochs or 1) * per_epoch // cfg.grad_accum)
    workers = cfg.num_workers
    if workers is None:
        workers = default_workers(int(os.environ.get("LOCAL_WORLD_SIZE", P)))

    trainable = [n for n, _ in model.trainable_parameters()]
    if ckpt is not None:
        load_trainable(model, ckpt)
    fused = accelerator.device.type in ("cpu", "cuda")  # one kernel per step: ~3x faster than the loop
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999), fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg, total) / cfg.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    if ckpt is not None:
        state, rng = load_checkpoint(accelerator, ckpt, optimizer, scheduler, problems)
        # settings given with --resume apply from here on (unchanged ones give the saved values back)
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
        for group, base, f in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * f(scheduler.last_epoch)
        optimizer.param_groups[0]["weight_decay"] = cfg.weight_decay
        accelerator.print(f"resuming {run} at step {state.step} (epoch {state.epoch}, batch {state.batch})")
    if main:
        run.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run / "args.json", json.dumps({**asdict(cfg), "resume": None}, indent=2) + "\n")
    logger = RunLog(run, main, state.step if reused else None)

    net = accelerator.unwrap_model(model)
    n_train = sum(p.numel() for _, p in net.trainable_parameters())
    accelerator.print(f"{len(dataset)} training samples, {per_epoch} batches of {cfg.batch_size} x {P} per "
                      f"epoch; {total} steps; {n_train:,} trainable parameters on {accelerator.device}")
    model.train()
    net.train()
    if ckpt is not None:
        set_rng_state(rng)
    else:
        set_seed(cfg.seed + accelerator.process_index)
    batches = micro_batches(dataset, collate, cfg, accelerator, state, workers)
    bar = tqdm(total=total, initial=state.step, disable=not main or cfg.no_progress, desc="finetune",
               dynamic_ncols=True)
    win_loss, win_n, win_samples, t0 = torch.zeros((), device=accelerator.device), 0, 0, time.perf_counter()
    curve: list[tuple[int, float]] = []  # (step, loss) of the first and the latest logged step
    unchecked = None  # the newest checkpoint until the next step's loss shows its weights are fine
    try:
        while state.step < total:
            step_loss = torch.zeros((), device=accelerator.device)
            for _ in range(cfg.grad_accum):
                epoch, next_batch, batch = next(batches)
                for where, why in batch.skipped:
                    problems.add(where, why)
                with accelerator.accumulate(model):
                    loss = model(**batch.inputs(accelerator.device), return_logits=False).loss
                    accelerator.backward(loss)
                step_loss += loss.detach().float()
                win_n += 1
                win_samples += len(batch) * P
            win_loss += step_loss
            state.step += 1
            state.epoch, state.batch = epoch, next_batch
            lr = optimizer.param_groups[0]["lr"]
            step_mean = accelerator.reduce(step_loss / cfg.grad_accum, "mean").item()  # equal on every process
            check_finite(state.step, "the loss", step_mean, f" (lr {lr:.3g})")
            if unchecked is not None:  # the weights of the newest checkpoint gave a finite loss
                prune_checkpoints(accelerator, run, cfg.keep_checkpoints)
                unchecked = None
            check_finite(state.step, "the learning rate", lr)
            logging_step = state.step % cfg.log_every == 0 or state.step == total
            grad_norm = None
            if cfg.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(net.parameters(), cfg.max_grad_norm)
            elif logging_step:
                grad_norm = total_norm([p.grad for p in net.parameters() if p.grad is not None])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)

            if logging_step:
                mean_loss = accelerator.reduce(win_loss / win_n, "mean").item()
                rate = win_samples / (time.perf_counter() - t0)
                record = {"step": state.step, "epoch": state.epoch + state.batch / per_epoch, "loss": mean_loss,
                          "lr": lr, "samples_per_s": rate,
                          "grad_norm": None if grad_norm is None else float(grad_norm)}
                logger.write(record)
                curve[1:] = [(state.step, mean_loss)]
                bar.set_postfix(loss=f"{mean_loss:.4f}", samples_s=f"{rate:.1f}")
                if cfg.no_progress and main:
                    tqdm.write(f"step {state.step}/{total}: loss {mean_loss:.4f}, lr {lr:.3g}, "
                               f"{rate:.1f} samples/s")
                win_loss, win_n, win_samples, t0 = torch.zeros_like(win_loss), 0, 0, time.perf_counter()
            if state.step % cfg.save_every == 0 or state.step == total:
                unchecked = save_checkpoint(accelerator, model, optimizer, scheduler, state, run, trainable,
                                            problems)
                if eval_sets:
                    losses = {name: evaluate(accelerator, model, ds, collate, cfg.batch_size)
                              for name, ds in eval_sets.items()}
                    logger.write({"step": state.step, "eval_loss": losses})
                    if main:  # above the progress bar, not inside it
                        tqdm.write(f"step {state.step}: eval loss " +
                                   ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
                    model.train()
                    net.train()
                t0 = time.perf_counter()
    except Diverged as e:
        logger.write({"step": e.step, "diverged": e.problem})
        raise Diverged(e.step, e.problem, "no final/ written" + ("; " + _set_aside(run, unchecked) if main else "")) \
            from None
    finally:
        batches.close()  # stops the loader's worker processes now, also on an error
        bar.close()
        logger.close()
    prune_checkpoints(accelerator, run, cfg.keep_checkpoints)

    export_final(accelerator, model, cfg, run)
    merged = dict(chain.from_iterable(d.items() for d in gather_object([problems.items])))
    if main:
        write_text_atomic(run / "skipped.txt", "".join(f"{w}: {why}\n" for w, why in merged.items()))
    trend = " -> ".join(f"{loss:.4f} (step {step})" for step, loss in curve)
    accelerator.print(f"done: {run / 'final'}; loss {trend}; {len(merged)} sample(s) skipped"
                      + (f" (listed in {run / 'skipped.txt'})" if merged else ""))
    return run


def check_finite(step: int, what: str, value: float, note: str = "") -> None:
    """Raise `Diverged` when `value` (`what` at `step`, before its update) is not finite."""
    if not math.isfinite(value):
        raise Diverged(step, f"{what} is {value}{note}")
