"""The micro-batcher: the cache misses of concurrent calls through one backbone call."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field

import numpy as np

from extractor.embedder import Embedder
from extractor.errors import NotReadyError
from extractor.serving.events import ServingEvents
from extractor.serving.requests import Call

log = logging.getLogger(__name__)


@dataclass
class _Work:
    images: list[np.ndarray]
    call: Call
    future: Future  # -> (vectors (m, d) float32, cached (m,) bool)
    queued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """Runs the misses of concurrent calls through one backbone call: at most `max_batch` images, waiting
    at most `max_wait` seconds after the first arrives. Work whose call has expired or gone away is
    dropped before compute; if a batch fails, each call in it is retried alone so one cannot fail another.
    """

    def __init__(self, embedder: Embedder, max_batch: int, max_wait: float, events: ServingEvents = ServingEvents()):
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.events = events
        self.batches = 0  # backbone calls made, and images through them: mean batch size for reports
        self.images = 0
        self._pending: deque[_Work] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"batcher-{embedder.spec.name}", daemon=True)
        self._thread.start()

    def submit(self, images: list[np.ndarray], call: Call) -> Future:
        """Queue canonical images; the future gives their (m, d) vectors and (m,) cache-hit flags."""
        work = _Work(images, call, Future())
        with self._ready:
            if self._closed:
                raise NotReadyError(f"backbone {self.embedder.spec.name} is shutting down")
            self._pending.append(work)
            self._ready.notify()
        return work.future

    def close(self) -> None:
        """Finish the work already queued, then stop."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()

    def _next_batch(self) -> list[_Work] | None:
        with self._ready:
            while not self._pending and not self._closed:
                self._ready.wait()
            if not self._pending:
                return None
            batch = [self._pending.popleft()]
            size = len(batch[0].images)
            # The wait counts from the first arrival: under load, work queued during the last backbone
            # call goes straight into the next one.
            wait_until = batch[0].queued + self.max_wait
            while size < self.max_batch:
                if self._pending:
                    if size + len(self._pending[0].images) > self.max_batch:
                        break
                    batch.append(self._pending.popleft())
                    size += len(batch[-1].images)
                    continue
                remaining = wait_until - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._ready.wait(remaining)
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = []
            now = time.monotonic()
            for work in batch:
                if not work.future.set_running_or_notify_cancel():
                    continue
                if work.call.expired():
                    work.future.set_exception(TimeoutError("deadline passed before the images were computed"))
                elif not work.call.is_active():
                    work.future.set_exception(CancelledError())
                else:
                    self.events.queued(self.embedder.spec.name, now - work.queued)
                    live.append(work)
            if live:
                self._compute(live)
            del batch, live  # the pixels go now, not once the next batch has arrived

    def _compute(self, works: list[_Work]) -> None:
        started = time.perf_counter()
        try:
            resolved = self.embedder.embed([image for work in works for image in work.images])
        except Exception as exc:
            if len(works) == 1:
                works[0].future.set_exception(exc)
                return
            log.warning("a batch of %d calls failed (%s); computing each call alone", len(works), exc)
            for work in works:
                self._compute([work])
            return
        self.batches += 1
        self.images += len(resolved.keys)
        self.events.batch_computed(self.embedder.spec.name, len(resolved.keys), time.perf_counter() - started)
        if resolved.new_keys:
            self.events.stored(self.embedder.spec.name, resolved.new_keys, resolved.new_vectors, resolved.store_error)
        start = 0
        for work in works:
            end = start + len(work.images)
            # Drop the pixels first: the future's callbacks give the call's share of the pixel budget back.
            work.images = []
            work.future.set_result((resolved.vectors[start:end], resolved.cached[start:end]))
            start = end
