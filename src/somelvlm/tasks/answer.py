"""The encode-once-ask-many answering loop: every image through the vision tower once, prompts in batches.

Used by `generate --input`, `eval` and the scale-out engines. Tasks are grouped by image; up to
`batch_size` distinct images are encoded per vision call and their prompts answered `batch_size`
at a time from the shared features. Text-only tasks (no image) are answered apart, in their own
batches (`model.generate(images=None, ...)`). An image that is missing or cannot be decoded fails
only the tasks that show it (reported through `on_error`), never the run.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from ..generation import ImageFeatures
from ..options import GenerationOptions
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
                 on_error: OnError, batch_size: int = 8, images: dict[Any, Any] | None = None) -> None:
    """Answer `tasks`, calling `on_answer(task, answer)` or `on_error(task, why)` for each.

    `images` optionally maps an image key to something `model.encode_images` takes instead of the
    task's own image (e.g. pixels decoded ahead by a reading stage)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups, text_only = group_by_image(tasks)
    for i in range(0, len(text_only), batch_size):
        chunk = text_only[i:i + batch_size]
        _answer(model, None, chunk, options, on_answer)
    keys = list(groups)
    for i in range(0, len(keys), batch_size):
        encoded = _encode(model, keys[i:i + batch_size], groups, images or {}, on_error)
        jobs = [(row, t) for row, key in enumerate(encoded.keys) for t in groups[key]]
        for j in range(0, len(jobs), batch_size):
            chunk = jobs[j:j + batch_size]
            _answer(model, encoded.features.select([row for row, _ in chunk]), [t for _, t in chunk],
                    options, on_answer)


def _answer(model: Any, features: Any, chunk: list[Task], options: GenerationOptions, on_answer: OnAnswer) -> None:
    answers = model.generate(images=features, prompts=[t.prompt for t in chunk], **options.to_dict())
    if len(answers) != len(chunk):
        raise RuntimeError(f"model.generate returned {len(answers)} answers for {len(chunk)} prompts")
    for t, a in zip(chunk, answers):
        on_answer(t, a)


class _Encoded:
    def __init__(self, keys: list[Any], features: Any) -> None:
        self.keys, self.features = keys, features


def _encode(model: Any, keys: list[Any], groups: dict[Any, list[Task]], images: dict[Any, Any],
            on_error: OnError) -> _Encoded:
    """Features of the images `keys` in one vision call; when one is unreadable, encode one by one
    to isolate it and fail its tasks."""
    def source(key: Any) -> Any:
        if key in images:
            return images[key]
        image = groups[key][0].image
        return image if isinstance(image, bytes) else str(image)

    sources = [source(k) for k in keys]
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
