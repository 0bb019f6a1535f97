"""Instruction-tuning data: SoMeData / LAVIS annotation files, a seeded resumable sampler, a collator.

An annotation file is a JSON list of `{"text_input", "text_output", "image"}` records, or JSONL with
one such record per line (extra keys are ignored). Image names are relative to an images root
(default: the annotation file's folder).

Bad data never stops a run and is never dropped silently:
- at load time, a bad record (the shared reader's rules, `somelvlm.tasks.records`), an empty /
  missing `text_input`, `text_output` or `image`, or an image file that does not exist, is
  reported (`FILE:LINE`) and left out;
- at training time, an image that exists but cannot be decoded is reported and its slot in the
  batch is filled by the next readable sample, so every batch keeps its size (which keeps the
  processes of a distributed run in lock step).
`Problems` collects both kinds; the trainer prints the count at the end.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from ..processing import SoMeLVLMProcessor, train_transform
from ..tasks.records import Columns, Problems, Task, read_tasks


Key = tuple[int, int]  # (epoch, sample index): the epoch seeds the image augmentation
Sample = Task  # the one task-file record (`somelvlm.tasks.records`); `reference` is the target answer
COLUMNS = Columns(prompt="text_input", reference="text_output", id="")  # ids: record positions


# ------------------------------------------------------------------------------------------------
# Annotation files
# ------------------------------------------------------------------------------------------------
def read_samples(path: str | Path, images_root: str | Path | None = None,
                 problems: Problems | None = None) -> list[Task]:
    """Read an annotation file with the shared task reader; bad records (and records whose image
    file does not exist) go to `problems` as `FILE:LINE: why` (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    problems = problems if problems is not None else Problems()
    samples = []
    for s in read_tasks(path, images_root, COLUMNS, problems, need_reference=True, require_image=True):
        if isinstance(s.image, Path) and not s.image.is_file():
            problems.add(s.where, f"image not found: {s.image}")
        else:
            samples.append(s)
    return samples


def read_all(paths: Sequence[str | Path], images_root: str | Path | None = None,
             problems: Problems | None = None) -> list[Task]:
    """`read_samples` over several files, concatenated in order."""
    return [s for p in paths for s in read_samples(p, images_root, problems)]


# ------------------------------------------------------------------------------------------------
# Dataset, batches, collator
# ------------------------------------------------------------------------------------------------
@dataclass
class Example:
    pixel_values: torch.Tensor  # [3, S, S]
    prompt: str
    answer: str
    skipped: list[tuple[str, str]]  # (where, why) of unreadable images replaced by this example


@dataclass
class Batch:
    """Model inputs for `SoMeLVLM.forward` (LAVIS layout, see `SoMeLVLMProcessor.training_text`)."""

    pixel_values: torch.Tensor  # [B, 3, S, S]
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L], -100 except on the answer and its </s>
    qformer_input_ids: torch.Tensor  # [B, T]
    qformer_attention_mask: torch.Tensor  # [B, T]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    TENSORS = ("pixel_values", "input_ids", "attention_mask", "labels", "qformer_input_ids", "qformer_attention_mask")

    def inputs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The keyword arguments of `SoMeLVLM.forward`, on `device`."""
        return {n: getattr(self, n).to(device, non_blocking=True) if device is not None else getattr(self, n)
                for n in self.TENSORS}

    def pin_memory(self) -> "Batch":  # DataLoader(pin_memory=True) calls this
        return replace(self, **{n: getattr(self, n).pin_memory() for n in self.TENSORS})

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class NoReadableImage(ValueError):
    """No sample of a dataset has a readable image. Its text stays the one line raised, also when a
    DataLoader worker re-raises it in the main process with the worker's traceback as the message."""

    def __str__(self) -> str:
        return super().__str__().strip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]


class InstructionDataset(Dataset):
    """Samples -> `Example`s. Indexed by `(epoch, i)`: the image augmentation of sample `i` in `epoch`
    is seeded from `(seed, epoch, i)`, so it does not depend on workers, processes or resuming."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Any], torch.Tensor], seed: int = 0,
                 random_transform: bool = True) -> None:
        if not samples:
            raise ValueError("no usable samples (all were skipped, see the warnings above)")
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.random_transform = random_transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Key | int) -> Example:
        epoch, i = key if isinstance(key, tuple) else (0, key)
        skipped = []
        for j in range(len(self.samples)):  # unreadable image: fall back to the next sample
            s = self.samples[(i + j) % len(self.samples)]
            try:
                pixels = self._image(s.image, epoch, i)
            except (ValueError, FileNotFoundError, OSError) as e:
                skipped.append((s.where, str(e)))
                continue
            return Example(pixels, s.prompt, s.reference, skipped)
        raise NoReadableImage(f"none of the {len(self.samples)} samples has a readable image "
                              f"(e.g. {skipped[0][0]}: {skipped[0][1]})")

    def _image(self, path: Path, epoch: int, i: int) -> torch.Tensor:
        if not self.random_transform:
            return self.transform(path)
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global CPU generator
            torch.manual_seed(((self.seed * 1_000_003 + epoch) * 1_000_003 + i) % 2**63)
            return self.transform(path)


def train_dataset(samples: Sequence[Sample], processor: SoMeLVLMProcessor, seed: int) -> InstructionDataset:
    """LAVIS `blip2_image_train` augmentation (random resized crop + flip), seeded per sample."""
    return InstructionDataset(samples, train_transform(processor.image_size), seed)


def eval_dataset(samples: Sequence[Sample], processor: SoMeLVLMProcessor) -> InstructionDataset:
    """LAVIS `blip_image_eval` preprocessing (deterministic)."""
    return InstructionDataset(samples, processor.preprocess_image, random_transform=False)


class Collator:
    """`Example`s -> one right-padded `Batch` with LAVIS's training tokenisation."""

    def __init__(self, processor: SoMeLVLMProcessor) -> None:
        self.processor = processor

    def __call__(self, examples: Sequence[Example]) -> Batch:
        text = self.processor.training_text([e.prompt for e in examples], [e.answer for e in examples])
        return Batch(
            pixel_values=torch.stack([e.pixel_values for e in examples]),
            input_ids=text.input_ids, attention_mask=text.attention_mask, labels=text.labels,
            qformer_input_ids=text.qformer_input_ids, qformer_attention_mask=text.qformer_attention_mask,
            skipped=[s for e in examples for s in e.skipped],
        )


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------
class EpochBatchSampler(Sampler[list[Key]]):
    """This process's share of each global batch of one epoch, from batch `start` on.

    Epoch `e` is `randperm(n)` seeded with `seed + e`; global batch `b` is its slice
    `[b*G, (b+1)*G)` with `G = batch_size * num_processes`, and process `r` takes the `r`-th
    `batch_size` of it. The incomplete last global batch is dropped (LAVIS `drop_last=True`).
    Resuming at `(epoch, start)` therefore skips exactly the consumed batches.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int = 0, start: int = 0,
                 num_processes: int = 1, rank: int = 0) -> None:
        self.n, self.batch_size, self.seed, self.epoch, self.start = num_samples, batch_size, seed, epoch, start
        self.num_processes, self.rank = num_processes, rank

    @staticmethod
    def batches_per_epoch(num_samples: int, batch_size: int, num_processes: int = 1) -> int:
        return num_samples // (batch_size * num_processes)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch(self.n, self.batch_size, self.num_processes) - self.start)

    def __iter__(self) -> Iterator[list[Key]]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        G = self.batch_size * self.num_processes
        for b in range(self.start, self.batches_per_epoch(self.n, self.batch_size, self.num_processes)):
            mine = perm[b * G + self.rank * self.batch_size: b * G + (self.rank + 1) * self.batch_size]
            yield [(self.epoch, i) for i in mine]


class ShardSampler(Sampler[list[Key]]):
    """Evaluation: process `r` gets samples `r, r + P, ...`, padded with sample 0 to the same count on
    every process (so all processes run the same number of forward passes); see `real`."""

    def __init__(self, num_samples: int, batch_size: int, num_processes: int = 1, rank: int = 0) -> None:
        per = -(-num_samples // num_processes)
        mine = list(range(rank, num_samples, num_processes))
        self.real = len(mine)  # the first `real` items are genuine, the rest padding
        self.indices = mine + [0] * (per - len(mine))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[list[Key]]:
        for b in range(0, len(self.indices), self.batch_size):
            yield [(0, i) for i in self.indices[b: b + self.batch_size]]
