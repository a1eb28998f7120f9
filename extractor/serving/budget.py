"""The server-wide budget of decoded pixels in flight, shared by the calls of every door: a counting semaphore
whose waiters are served in arrival order, each within its own time."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError

from extractor.errors import BudgetBusyError, InvalidInputError

SERVER_BUDGET = "decoded pixels in flight (server-wide budget)"
POLL_SECONDS = 0.25  # how often a waiter looks whether its caller went away


class Reservation:
    """Pixels taken from a `PixelBudget`; `release` gives them back once (later calls do nothing)."""

    def __init__(self, budget: PixelBudget, pixels: int):
        self.budget, self.pixels = budget, pixels
        self._lock = threading.Lock()
        self._held = True

    def release(self, *_ignored) -> None:  # *_ignored: also a Future's done callback
        with self._lock:
            held, self._held = self._held, False
        if held:
            self.budget._give_back(self.pixels)


class PixelBudget:
    """At most `capacity` decoded pixels held at once by all calls together.

    Waiters are served first come, first served, so a large request is not starved by a stream of small ones;
    one that cannot be served by `until` (on `time.monotonic`) gets a `BudgetBusyError` naming this budget.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise InvalidInputError(f"the budget of {SERVER_BUDGET} must be at least 1 pixel, got {capacity}")
        self.capacity = capacity
        self.held = 0
        self._waiting: deque[object] = deque()
        self._changed = threading.Condition()

    def reserve(self, pixels: int, until: float | None,
                is_active: Callable[[], bool] = lambda: True) -> Reservation:
        """Wait until `pixels` fit (and every earlier waiter is served), then hold them."""
        if pixels > self.capacity:  # no wait can make it fit; the service's limits keep this from happening
            raise BudgetBusyError(SERVER_BUDGET, pixels, self.capacity, 0.0)
        ticket, started = object(), time.monotonic()
        with self._changed:
            self._waiting.append(ticket)
            try:
                while self._waiting[0] is not ticket or self.held + pixels > self.capacity:
                    remaining = None if until is None else until - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise BudgetBusyError(SERVER_BUDGET, pixels, self.capacity, time.monotonic() - started)
                    if not is_active():
                        raise CancelledError()
                    self._changed.wait(POLL_SECONDS if remaining is None else min(remaining, POLL_SECONDS))
                self.held += pixels
            finally:
                self._waiting.remove(ticket)
                self._changed.notify_all()  # the next waiter may fit now, or is at the head now
        return Reservation(self, pixels)

    def _give_back(self, pixels: int) -> None:
        with self._changed:
            self.held -= pixels
            self._changed.notify_all()
