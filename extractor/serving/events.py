"""What the core reports while it works (batches, queue waits, cache hits, decode failures, finished calls), and
the per-model statistics it keeps from those reports; a metrics door listens to the same reports."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


class ServingEvents:
    """Listener of the core's reports; every method is a no-op here, a listener overrides what it needs."""

    def request_done(self, model: str, ok: bool, seconds: float) -> None:
        """A call on `model` (a backbone or a head) finished, well or not, after `seconds`."""

    def queued(self, model: str, seconds: float) -> None:
        """Work of one call waited `seconds` in `model`'s batcher before its backbone call."""

    def batch_computed(self, model: str, images: int, seconds: float) -> None:
        """One backbone call of `images` images took `seconds`."""

    def looked_up(self, model: str, hits: int, misses: int) -> None:
        """Images of one call found in the hot cache or the store (`hits`) or left to compute (`misses`)."""

    def decode_failed(self, model: str, count: int) -> None:
        """`count` images of one call could not be decoded or were over a pixel limit."""

    def stored(self, model: str, keys: list[bytes], vectors, error: Exception | None) -> None:
        """The vectors one backbone call computed (`keys`, (n, d) `vectors`) were written to the store, or
        could not be: `error`."""


class EventFanout(ServingEvents):
    """Passes every report to each of `listeners`."""

    def __init__(self, listeners: list[ServingEvents]):
        self.listeners = listeners

    def request_done(self, model: str, ok: bool, seconds: float) -> None:
        for listener in self.listeners:
            listener.request_done(model, ok, seconds)

    def queued(self, model: str, seconds: float) -> None:
        for listener in self.listeners:
            listener.queued(model, seconds)

    def batch_computed(self, model: str, images: int, seconds: float) -> None:
        for listener in self.listeners:
            listener.batch_computed(model, images, seconds)

    def looked_up(self, model: str, hits: int, misses: int) -> None:
        for listener in self.listeners:
            listener.looked_up(model, hits, misses)

    def decode_failed(self, model: str, count: int) -> None:
        for listener in self.listeners:
            listener.decode_failed(model, count)

    def stored(self, model: str, keys: list[bytes], vectors, error: Exception | None) -> None:
        for listener in self.listeners:
            listener.stored(model, keys, vectors, error)


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class ModelUsage:
    """Counts and cumulative times of one model since the server started (the OIP statistics extension)."""

    last_inference_ms: int = 0       # wall-clock time of the last finished call, ms since the epoch
    inference_count: int = 0         # images computed by the backbone
    execution_count: int = 0         # backbone calls
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: Duration = field(default_factory=Duration)


class UsageStatistics(ServingEvents):
    """`ModelUsage` per model name, kept from the core's reports."""

    def __init__(self):
        self._usage: dict[str, ModelUsage] = {}
        self._lock = threading.Lock()

    def _of(self, model: str) -> ModelUsage:
        return self._usage.setdefault(model, ModelUsage())

    def request_done(self, model: str, ok: bool, seconds: float) -> None:
        with self._lock:
            usage = self._of(model)
            (usage.success if ok else usage.fail).add(seconds)
            usage.last_inference_ms = int(time.time() * 1000)

    def queued(self, model: str, seconds: float) -> None:
        with self._lock:
            self._of(model).queue.add(seconds)

    def batch_computed(self, model: str, images: int, seconds: float) -> None:
        with self._lock:
            usage = self._of(model)
            usage.inference_count += images
            usage.execution_count += 1
            usage.compute.add(seconds)

    def usage(self, model: str) -> ModelUsage:
        """A copy of `model`'s figures (zeros for a model never called)."""
        with self._lock:
            usage = self._usage.get(model, ModelUsage())
            return ModelUsage(usage.last_inference_ms, usage.inference_count, usage.execution_count,
                              *(Duration(d.count, d.ns) for d in (usage.success, usage.fail, usage.queue,
                                                                  usage.compute)))
