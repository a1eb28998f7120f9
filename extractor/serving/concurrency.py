"""How many calls and streams the server answers at once, across every door, and how long a silent stream stays
open: the caps that keep one client from holding every thread while health checks wait behind it."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from extractor.errors import InvalidInputError, ServerBusyError

RETRY_AFTER_SECONDS = 1.0  # what a refused caller is told to wait; calls are short, so a slot frees soon


@dataclass(frozen=True)
class ConcurrencyLimits:
    """The server's caps on work in flight. Health, reflection and metadata calls are outside them: they run on
    threads of their own, so they answer however many calls and streams are open."""

    max_streams: int = 16            # streaming calls open at once (EmbedStream, ModelStreamInfer)
    max_calls: int = 32              # other calls that do work (Embed, Classify, infer, model control) at once
    stream_idle_seconds: float = 30.0  # a stream waiting this long for its client is closed

    def __post_init__(self):
        if self.max_streams < 1 or self.max_calls < 1:
            raise InvalidInputError(f"need at least 1 stream and 1 call in flight, got --max-streams "
                                    f"{self.max_streams} and --max-concurrent-calls {self.max_calls}")
        if not self.stream_idle_seconds > 0:
            raise InvalidInputError(f"--stream-idle-seconds must be above 0, got {self.stream_idle_seconds}")


class CallSlots:
    """A cap on calls of one kind in flight, shared by every door: taken without waiting, refused over the cap
    with a `ServerBusyError` that names the cap and the option that sets it."""

    def __init__(self, what: str, capacity: int, option: str):
        self.what, self.capacity, self.option = what, capacity, option
        self.held = 0
        self._lock = threading.Lock()

    @property
    def full(self) -> bool:
        return self.held >= self.capacity

    def busy_error(self) -> ServerBusyError:
        return ServerBusyError(self.what, self.capacity, self.option, RETRY_AFTER_SECONDS)

    def take(self) -> None:
        """Hold one slot, or raise `ServerBusyError` at once when all are held."""
        with self._lock:
            if self.held >= self.capacity:
                raise self.busy_error()
            self.held += 1

    def add(self) -> None:
        """Hold one slot for a call already admitted by a look at `full` (a door that admits and starts a call
        in two steps)."""
        with self._lock:
            self.held += 1

    def release(self, *_ignored) -> None:  # *_ignored: also a Future's done callback
        with self._lock:
            self.held -= 1


class ServerSlots:
    """The server's two caps, as shared slots: streams open and calls in flight."""

    def __init__(self, limits: ConcurrencyLimits = ConcurrencyLimits()):
        self.limits = limits
        self.streams = CallSlots("streams open", limits.max_streams, "--max-streams")
        self.calls = CallSlots("calls in flight", limits.max_calls, "--max-concurrent-calls")
