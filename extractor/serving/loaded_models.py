"""Run-time model control: which backbones are READY, LOADING or UNAVAILABLE (and why), loading and unloading
them while the others serve."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from extractor.models import BackboneSpec
from extractor.embedder import Embedder
from extractor.errors import ExtractorError, NotReadyError, UnknownNameError
from extractor.serving.batcher import MicroBatcher

log = logging.getLogger(__name__)


class ModelState(str, Enum):
    READY = "READY"
    LOADING = "LOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class ModelStatus:
    name: str
    state: ModelState
    reason: str = ""  # why it is not READY


class ModelLoadFailed(NotReadyError):
    """A model that did not load; it stays UNAVAILABLE with this reason and the others keep serving."""


@dataclass(frozen=True)
class Catalog:
    """The model repository as the core sees it: its entry names and an entry's spec by name (never a path),
    and how to drop what was built for a spec once it is unloaded."""

    names: Callable[[], Iterable[str]]
    spec: Callable[[str], BackboneSpec]
    release: Callable[[BackboneSpec], None] = lambda spec: None


class ServedBackbone:
    """A built backbone behind its micro-batcher, counting the calls that use it so an unload can wait for them."""

    def __init__(self, spec: BackboneSpec, embedder: Embedder, batcher: MicroBatcher, dim: int):
        self.spec, self.embedder, self.batcher = spec, embedder, batcher
        self.dim = dim  # the built model's vector width
        self._calls = 0
        self._idle = threading.Condition()

    def enter(self) -> None:
        with self._idle:
            self._calls += 1

    def leave(self) -> None:
        with self._idle:
            self._calls -= 1
            if self._calls == 0:
                self._idle.notify_all()

    def close(self, drain_seconds: float) -> None:
        """Wait up to `drain_seconds` for the calls in flight, then finish the queued work and stop."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._calls == 0, timeout=drain_seconds):
                log.warning("%s: %d calls still in flight after %.0f s; closing", self.spec.name, self._calls,
                            drain_seconds)
        self.batcher.close()


class LoadedModels:
    """The backbones the server holds, by name, and the state of every entry of its catalog.

    Building a backbone happens outside the lock, so a load never stalls calls to the models already
    READY; a failed load leaves its model UNAVAILABLE with the error as reason.
    """

    def __init__(self, catalog: Catalog, build: Callable[[BackboneSpec], ServedBackbone], drain_seconds: float):
        self.catalog, self.build, self.drain_seconds = catalog, build, drain_seconds
        self._served: dict[str, ServedBackbone] = {}
        self._status: dict[str, ModelStatus] = {}
        self._loading: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def ready(self) -> dict[str, ServedBackbone]:
        with self._lock:
            return dict(self._served)

    def statuses(self) -> list[ModelStatus]:
        """Every entry of the catalog and every model held, by name."""
        with self._lock:
            status = dict(self._status)
        names = sorted(set(self.catalog.names()) | set(status))
        return [status.get(name, ModelStatus(name, ModelState.UNAVAILABLE, "not loaded")) for name in names]

    def status(self, name: str) -> ModelStatus:
        with self._lock:
            if name in self._status:
                return self._status[name]
        if name in set(self.catalog.names()):
            return ModelStatus(name, ModelState.UNAVAILABLE, "not loaded")
        raise UnknownNameError("model", name, self.catalog.names())

    def get(self, name: str) -> ServedBackbone:
        """The READY backbone `name`; NotReadyError (with the reason) when it is known but not READY."""
        with self._lock:
            served = self._served.get(name)
            status = self._status.get(name)
            ready = list(self._served)
        if served is not None:
            return served
        if status is not None:
            raise NotReadyError(f"backbone {name!r} is {status.state.value}"
                                + (f": {status.reason}" if status.reason else ""))
        raise UnknownNameError("backbone", name, ready)

    def load(self, name: str) -> ModelStatus:
        """Build the catalog's entry `name` and serve it; waits for a load already under way. Loading a READY
        model leaves it as it is. Raises ModelLoadFailed (its cause chained) when the build fails."""
        known = set(self.catalog.names())
        if name not in known:
            raise UnknownNameError("model repository entry", name, known)
        with self._lock:
            if name in self._served:
                return self._status[name]
            underway = self._loading.get(name)
            if underway is None:
                self._loading[name] = done = threading.Event()
                self._status[name] = ModelStatus(name, ModelState.LOADING)
        if underway is not None:
            underway.wait()
            status = self.status(name)
            if status.state != ModelState.READY:
                raise ModelLoadFailed(f"model {name!r} failed to load: {status.reason}")
            return status
        try:
            served = self.build(self.catalog.spec(name))
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            log.error("model %s failed to load: %s", name, reason, exc_info=not isinstance(exc, ExtractorError))
            with self._lock:
                self._status[name] = ModelStatus(name, ModelState.UNAVAILABLE, reason)
                del self._loading[name]
            done.set()
            raise ModelLoadFailed(f"model {name!r} failed to load: {reason}") from exc
        with self._lock:
            self._served[name] = served
            self._status[name] = ModelStatus(name, ModelState.READY)
            del self._loading[name]
        done.set()
        return self._status[name]

    def unload(self, name: str) -> ModelStatus:
        """Stop serving `name`: new calls are refused at once, calls in flight finish (up to the drain time),
        then what was built for it is dropped."""
        with self._lock:
            served = self._served.pop(name, None)
            if served is not None:
                self._status[name] = ModelStatus(name, ModelState.UNAVAILABLE, "unloaded")
        if served is None:
            status = self.status(name)  # UnknownNameError for a name never heard of
            if status.state == ModelState.LOADING:
                raise NotReadyError(f"model {name!r} is loading; unload it once it is READY")
            return status
        served.close(self.drain_seconds)
        self.catalog.release(served.spec)
        log.info("model %s unloaded", name)
        return self.status(name)

    def close(self) -> None:
        """Stop every model: queued work is finished first."""
        with self._lock:
            served, self._served = list(self._served.values()), {}
        for backbone in served:
            backbone.batcher.close()
