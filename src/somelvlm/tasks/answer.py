"""The encode-once-ask-many answering loop: every image through the vision tower once, prompts
decoded with continuous batching.

Used by `generate --input`, `eval` and the scale-out engines. Tasks are grouped by image; up to
`batch_size` distinct images are encoded per vision call, and their prompts are fed to
`scheduler.answer_stream`, which keeps up to `batch_size` prompts in flight and admits the next one
as soon as another finishes (so an answer equals that task answered alone, whatever the batch
size). Images are encoded lazily, a chunk at a time, as the scheduler asks for more prompts; with
`num_workers > 0` they are decoded and preprocessed ahead in DataLoader worker processes (the
default on a GPU: 2), so the model never waits for a JPEG decoder.
Text-only tasks (no image) go first, without a soft prompt. An image that is missing or cannot be
decoded fails only the tasks that show it (reported through `on_error`), never the run.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..generation import ImageFeatures
from ..options import GenerationOptions
from ..scheduler import Request, answer_stream
from .records import IMAGE_ERRORS, Task

OnAnswer = Callable[[Task, str], None]
OnError = Callable[[Task, str], None]


def group_by_image(tasks: Iterable[Task]) -> tuple[dict[Any, list[Task]], list[Task]]:
    """`({image key: its tasks}, text-only tasks)`, both in first-seen order."""
    groups: dict[Any, list[Task]] = {}
    text_only: list[Task] = []
    for t in tasks:
        if t.image is None:
            text_only.append(t)
        else:
            groups.setdefault(t.image_key, []).append(t)
    return groups, text_only


def answer_tasks(model: Any, tasks: Sequence[Task], options: GenerationOptions, on_answer: OnAnswer,
                 on_error: OnError, batch_size: int = 8, images: dict[Any, Any] | None = None,
                 num_workers: int | None = None) -> None:
    """Answer `tasks`, calling `on_answer(task, answer)` or `on_error(task, why)` for each.

    `images` optionally maps an image key to something `model.encode_images` takes instead of the
    task's own image (e.g. pixels decoded ahead by a reading stage). `num_workers`: processes that
    decode images ahead (None: 2 when the model is on a GPU, else 0 = in this process)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers is None:
        num_workers = 2 if model.device.type == "cuda" else 0
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    groups, text_only = group_by_image(tasks)
    pending: dict[int, Task] = {}

    def requests() -> Iterator[Request]:
        for t in text_only:
            pending[len(pending)] = t
            yield Request(len(pending) - 1, t.prompt, None, options)
        for encoded in _encoded_chunks(model, groups, images or {}, on_error, batch_size, num_workers):
            for row, key in enumerate(encoded.keys):
                for t in groups[key]:
                    pending[len(pending)] = t
                    yield Request(len(pending) - 1, t.prompt, encoded.features.select([row]), options)

    for key, answers in answer_stream(model, requests(), max_batch=batch_size):
        on_answer(pending.pop(key), answers[0])


class _Pixels(Dataset):
    """`(key, pixels, None)` or `(key, None, why)` per image, decoded by a DataLoader worker."""

    def __init__(self, processor: Any, items: list[tuple[Any, Any]]) -> None:
        self.processor, self.items = processor, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, torch.Tensor | None, str | None]:
        key, source = self.items[i]
        try:
            return key, self.processor.preprocess_image(source), None
        except IMAGE_ERRORS as err:
            return key, None, str(err)


def _encoded_chunks(model: Any, groups: dict[Any, list[Task]], images: dict[Any, Any], on_error: OnError,
                    batch_size: int, num_workers: int) -> Iterator["_Encoded"]:
    """The images' features, `batch_size` images per vision call, decoded ahead by `num_workers`."""
    keys = list(groups)
    if num_workers == 0 or images:
        for i in range(0, len(keys), batch_size):
            yield _encode(model, keys[i:i + batch_size], groups, images, on_error)
        return
    items = [(k, _source(groups, k)) for k in keys]
    loader = DataLoader(_Pixels(model.require_processor(), items), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=list)
    for batch in loader:
        for key, _, why in batch:
            if why is not None:
                for t in groups[key]:
                    on_error(t, f"cannot use image {t.image_label()}: {why}")
        decoded = {key: pixels for key, pixels, why in batch if why is None}
        yield _encode(model, list(decoded), groups, decoded, on_error)


def _source(groups: dict[Any, list[Task]], key: Any) -> Any:
    """What `encode_images` takes for the image of `key`: its bytes, or its path."""
    image = groups[key][0].image
    return image if isinstance(image, bytes) else str(image)


class _Encoded:
    def __init__(self, keys: list[Any], features: Any) -> None:
        self.keys, self.features = keys, features


def _encode(model: Any, keys: list[Any], groups: dict[Any, list[Task]], images: dict[Any, Any],
            on_error: OnError) -> _Encoded:
    """Features of the images `keys` in one vision call; when one is unreadable, encode one by one
    to isolate it and fail its tasks."""
    sources = [images[k] if k in images else _source(groups, k) for k in keys]
    if not sources:
        return _Encoded([], None)
    if all(isinstance(s, torch.Tensor) for s in sources):  # pixels decoded ahead: one [B, 3, S, S] batch
        sources = torch.stack(sources)
    try:
        return _Encoded(keys, model.encode_images(sources))
    except IMAGE_ERRORS as err:
        if len(keys) == 1:
            for t in groups[keys[0]]:
                on_error(t, f"cannot use image {t.image_label()}: {err}")
            return _Encoded([], None)
    good: list[Any] = []
    parts = []
    for key in keys:
        one = _encode(model, [key], groups, images, on_error)
        if one.keys:
            good.append(key)
            parts.append(one.features)
    return _Encoded(good, ImageFeatures.concat(parts) if parts else None)
