"""Dynamic batching: requests that arrive within a short window share the vision tower and the
decode steps.

One worker thread owns the model. It takes the first waiting job, keeps collecting jobs for
`window_s` (up to `max_batch`), groups them by decoding options (only equal options decode
together; a seeded sampling request decodes alone, so its answer is reproducible) and runs one
`model.generate` per group (posts with and without an image together) over `ImageFeatures` built
from a features cache keyed by the SHA-256 of the image bytes: an image repeated across requests is
encoded once. Streaming requests with one beam batch the same way, each row's pieces going to
its own client as they are produced (`generate_stream`'s text rule per row). When a batch fails,
each of its jobs that has not streamed anything yet is retried alone, so one failing request never
breaks the others.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..decoding import LlamaDecoder
from ..generation import NO_IMAGE, ImageFeatures, llm_generate_inputs, sampling_settings, stream_options, stream_text
from ..options import GenerationOptions
from .images import RequestImage
from .protocol import Answer

log = logging.getLogger("somelvlm.serve")

_STOP = object()


@dataclass(eq=False)
class Job:
    """One request for the worker. `deliver(kind, value)` is called from the worker thread with
    ("piece", text) while streaming, then ("done", [Answer]) or ("error", exception)."""

    prompt: str
    image: RequestImage | None
    options: GenerationOptions
    deliver: Callable[[str, Any], None]
    stream: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)
    streamed: bool = False  # pieces were delivered: a retry would repeat them

    def batch_key(self) -> Any:
        if self.options.seed is not None and not self.options.greedy:
            return id(self)  # seeded sampling decodes alone: its answer is reproducible
        return self.options, self.streams_pieces()  # posts with and without an image decode together

    def streams_pieces(self) -> bool:
        return self.stream and self.options.num_beams == 1 and self.options.num_return_sequences == 1


class RowTokens:
    """Per-row views of a batched decode (`[B]` token tensors per step): row i's iterator yields
    `[token]` lists up to and including its end of sequence; pulling a step for one row buffers the
    other rows' tokens, so rows can be consumed at different paces."""

    def __init__(self, steps: Iterator[torch.Tensor], rows: int, eos_id: int) -> None:
        self.steps = iter(steps)
        self.buffers: list[deque[int]] = [deque() for _ in range(rows)]
        self.eos_id = eos_id
        self.done = False

    def _pull(self) -> bool:
        step = next(self.steps, None)
        if step is None:
            self.done = True
            return False
        for buffer, token in zip(self.buffers, step.tolist()):
            buffer.append(token)
        return True

    def tokens(self, row: int) -> Iterator[list[int]]:
        buffer = self.buffers[row]
        while buffer or (not self.done and self._pull()):
            token = buffer.popleft()
            yield [token]
            if token == self.eos_id:
                return


class FeatureCache:
    """Image features (after `ln_vision`) by image hash, least recently used evicted past `capacity`."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def features(self, model: Any, images: list[RequestImage | None]) -> tuple[ImageFeatures | None, int]:
        """`ImageFeatures` for one row per entry (None: a text-only row; each distinct image stored
        once), or None when no entry has an image, and how many images the vision tower encoded
        (the others came from the cache or were repeated in the batch)."""
        order: dict[str, int] = {}
        for im in images:
            if im is not None:
                order.setdefault(im.key, len(order))
        if not order:
            return None, 0
        fresh = {im.key: im.image for im in images if im is not None and im.key not in self.entries}
        found: dict[str, torch.Tensor] = {k: self.entries[k] for k in order if k in self.entries}
        self.hits += sum(im is not None for im in images) - len(fresh)
        self.misses += len(fresh)
        if fresh:
            embeds = model.encode_images(list(fresh.values())).embeds  # [len(fresh), N, C]
            found.update(zip(fresh, embeds.unbind(0)))
        for k in order:
            self.put(k, found[k])
        embeds = torch.stack([found[k] for k in order])  # [U, N, C]
        index = [NO_IMAGE if im is None else order[im.key] for im in images]
        return ImageFeatures(embeds, torch.tensor(index, dtype=torch.long, device=embeds.device)), len(fresh)

    def put(self, key: str, value: torch.Tensor) -> None:
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


class Batcher:
    """The model's worker thread and its queue (see the module doc)."""

    def __init__(self, model: Any, max_batch: int = 32, window_s: float = 0.01, cache_size: int = 256) -> None:
        self.model = model
        self.max_batch = max_batch
        self.window_s = window_s
        self.cache = FeatureCache(cache_size)
        self.jobs: queue.Queue = queue.Queue()
        self.batch_sizes: Counter[int] = Counter()
        self.requests = 0
        self.failures = 0
        self.images_encoded = 0
        self.thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="somelvlm-batcher", daemon=True)
            self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.jobs.put(_STOP)
            self.thread.join()
            self.thread = None

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def metrics(self) -> dict[str, Any]:
        return {"requests": self.requests, "failed_requests": self.failures,
                "batches": sum(self.batch_sizes.values()),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "max_batch_size": max(self.batch_sizes, default=0), "queued": self.jobs.qsize(),
                "images_encoded": self.images_encoded,
                "features_cache": {"entries": len(self.cache.entries), "capacity": self.cache.capacity,
                                   "hits": self.cache.hits, "misses": self.cache.misses}}

    # -- worker -----------------------------------------------------------------------------------
    def _collect(self, first: Job) -> tuple[list[Job], bool]:
        jobs, stop = [first], False
        deadline = time.monotonic() + self.window_s
        while len(jobs) < self.max_batch:
            try:
                job = self.jobs.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                break
            if job is _STOP:
                stop = True
                break
            jobs.append(job)
        return jobs, stop

    def _loop(self) -> None:
        while True:
            first = self.jobs.get()
            if first is _STOP:
                return
            jobs, stop = self._collect(first)
            groups: dict[Any, list[Job]] = {}
            for job in jobs:
                if not job.cancelled.is_set():
                    groups.setdefault(job.batch_key(), []).append(job)
                    self.requests += 1
            for group in groups.values():
                self._run_group(group)
            if stop:
                return

    def _run_group(self, jobs: list[Job]) -> None:
        try:
            results = self._run(jobs)
        except Exception as e:  # isolate the failing request: retry each job alone
            if len(jobs) == 1:
                self.failures += 1
                log.warning("request failed: %s", e)
                jobs[0].deliver("error", e)
                return
            log.warning("batch of %d failed (%s); retrying its requests one by one", len(jobs), e)
            for job in jobs:
                if job.streamed:
                    self.failures += 1
                    job.deliver("error", e)
                else:
                    self._run_group([job])
            return
        for job, answers in zip(jobs, results):
            job.deliver("done", answers)

    def _run(self, jobs: list[Job]) -> list[list[Answer]]:
        model, options = self.model, jobs[0].options
        feats, encoded = self.cache.features(model, [j.image for j in jobs])
        self.images_encoded += encoded
        self.batch_sizes[len(jobs)] += 1
        log.info("batch of %d request(s): %d with an image, %d image(s) encoded", len(jobs),
                 sum(j.image is not None for j in jobs), encoded)
        if jobs[0].streams_pieces():
            return self._stream(jobs, feats)
        texts = model.generate(feats, [j.prompt for j in jobs], options=options)
        n = options.num_return_sequences
        return [[self.answer(t, options) for t in texts[i * n:(i + 1) * n]] for i in range(len(jobs))]

    def _stream(self, jobs: list[Job], feats: ImageFeatures | None) -> list[list[Answer]]:
        """One batched decode whose rows stream to their own clients (`generate_stream`'s pieces per row)."""
        model = self.model
        options = stream_options(jobs[0].options)
        decode = model.require_processor().llm_tokenizer.decode
        texts = [""] * len(jobs)
        with torch.inference_mode():
            inputs, mask = llm_generate_inputs(model, feats, [j.prompt for j in jobs])
            steps = LlamaDecoder(model.llm).decode(inputs, mask, sampling_settings(model, options))
            rows = RowTokens(steps, len(jobs), model.config.llm.eos_id)
            pieces = {i: stream_text(decode, rows.tokens(i)) for i in range(len(jobs))}
            while pieces:
                for i in list(pieces):
                    piece = next(pieces[i], None)
                    if piece is None or jobs[i].cancelled.is_set():
                        del pieces[i]
                        continue
                    texts[i] += piece
                    jobs[i].streamed = True
                    jobs[i].deliver("piece", piece)
        return [[self.answer(t, options)] for t in texts]

    def answer(self, text: str, options: GenerationOptions) -> Answer:
        """An `Answer` whose token count is the re-tokenised text (+1 for the closing `</s>` when the
        answer ended before the length limit)."""
        tokens = len(self.model.require_processor().llm_tokenizer.encode(text, bos=False)) if text else 0
        limit = options.new_token_limits()[0]
        if tokens >= limit:
            return Answer(text, limit, "length")
        return Answer(text, tokens + 1, "stop")


def asyncio_delivery(loop: asyncio.AbstractEventLoop, target: asyncio.Queue) -> Callable[[str, Any], None]:
    """A `Job.deliver` that hands the worker's results to an asyncio queue on `loop`."""
    def deliver(kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(target.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has shut down: nobody is waiting any more
            pass
    return deliver
