"""The feature service's transport-free core: admission, decoding, hot cache, micro-batched get-or-compute, heads,
and run-time model control. It knows no protocol and no message size; doors translate to and from it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future

import numpy as np

from extractor.models import BackboneSpec, FrozenBackbone, load_backbone
from extractor.embedder import Embedder
from extractor.errors import ExtractorError, InvalidInputError, LimitExceededError, NotReadyError, UnknownNameError
from extractor.jobs import prefetched
from extractor.serving.batcher import MicroBatcher
from extractor.serving.events import EventFanout, ModelUsage, ServingEvents, UsageStatistics
from extractor.serving.heads import Head
from extractor.serving.hot_cache import HotVectors
from extractor.serving.loaded_models import Catalog, LoadedModels, ModelLoadFailed, ModelStatus, ServedBackbone
from extractor.serving.requests import Call, ClassifyOutcome, EmbedOutcome, ImageInput, Limits, RawPixels, \
    StreamRequest, at_index, raw_array, to_pixels
from extractor.store import EmbeddingStore, ServedSet
from extractor.wire import KEY_BYTES

log = logging.getLogger(__name__)


class PendingEmbed:
    """Images checked and looked up; the misses, if any, queued for the backbone. `result` waits for them."""

    def __init__(self, service: FeatureService, served: ServedBackbone, count: int, offset: int, call: Call):
        self.service, self.served, self.count, self.offset, self.call = service, served, count, offset, call
        self.errors: list[tuple[int, ExtractorError]] = []
        self.good: list[int] = []          # request positions of the images that decoded
        self.keys: list[bytes] = []        # their content keys
        self.stored: dict[bytes, np.ndarray] = {}
        self.missing: list[int] = []       # positions within `good` left for the backbone
        self.future: Future | None = None
        self.started = time.perf_counter()
        self._open = True  # holds the backbone until its result is taken

    def release(self) -> None:
        """Let go of the backbone (an unload waits for this); idempotent."""
        if self._open:
            self._open = False
            self.served.leave()

    def result(self) -> EmbedOutcome:
        """Wait (up to the call's deadline) for the computed vectors and put every row in place."""
        try:
            outcome = self._result()
        except BaseException:
            self.service.events.request_done(self.served.spec.name, False, time.perf_counter() - self.started)
            raise
        finally:
            self.release()
        self.service.events.request_done(self.served.spec.name, True, time.perf_counter() - self.started)
        return outcome

    def _result(self) -> EmbedOutcome:
        n, dim = self.count, self.served.dim
        vectors = np.full((n, dim), np.nan, dtype=np.float32)
        cached = np.zeros(n, dtype=bool)
        ok = np.zeros(n, dtype=bool)
        good = np.asarray(self.good, dtype=np.intp)
        ok[good] = True
        for position, key in zip(self.good, self.keys):
            vector = self.stored.get(key)
            if vector is not None:
                vectors[position] = vector
                cached[position] = True
        if self.future is not None:
            try:
                computed, computed_cached = self.future.result(timeout=self.call.remaining())
            except TimeoutError:
                self.future.cancel()  # still queued: the batcher skips it
                raise
            rows = good[np.asarray(self.missing, dtype=np.intp)]
            vectors[rows] = computed
            cached[rows] = computed_cached
        if len(self.good) == n:
            keys = b"".join(self.keys)
        else:
            key_rows = [bytes(KEY_BYTES)] * n
            for position, key in zip(self.good, self.keys):
                key_rows[position] = key
            keys = b"".join(key_rows)
        return EmbedOutcome(self.served.embedder.fingerprint, vectors, cached, ok, keys, self.errors, self.offset)


class StorageState(ServingEvents):
    """Whether the store takes the vectors the service computes. While writes fail (disk full, read-only, I/O
    error, damage) the vectors of each call are still answered, and kept in the hot cache so a repeated
    image is not computed again; the first write that succeeds ends the fault."""

    def __init__(self, hot: HotVectors, on_change: Callable[[], None]):
        self.hot, self.on_change = hot, on_change
        self.problem: str | None = None
        self._lock = threading.Lock()

    def stored(self, model: str, keys: list[bytes], vectors, error: Exception | None) -> None:
        if error is not None:
            self.hot.put_many(dict(zip(keys, vectors)))
        problem = None if error is None else str(error)
        with self._lock:
            changed, self.problem = problem != self.problem, problem
        if changed:
            if problem:
                log.error("the store takes no writes (%s): health NOT_SERVING, vectors kept in memory", problem)
            else:
                log.warning("the store takes writes again: health SERVING")
            self.on_change()


class FeatureService:
    """Serves frozen backbones' embeddings and heads' predictions through one store.

    Cache hits are answered in the caller's thread without waiting for a batch; only misses go to
    the backbone's `MicroBatcher`, which writes what it computes to the store, so vectors computed
    here are hits for batch jobs on the same store and the other way round. `specs` are the backbones
    loaded at start; `catalog` is the repository that `load_model` may load from (default: `specs` alone).
    `heads` is called once at start and gives the heads to serve.
    """

    def __init__(self, specs: Sequence[BackboneSpec], store: EmbeddingStore, *, catalog: Catalog | None = None,
                 limits: Limits = Limits(), max_batch: int = 128, max_wait: float = 0.005,
                 heads: Callable[[], dict[str, Head]] = dict,
                 backbone_loader: Callable[[BackboneSpec], FrozenBackbone] = load_backbone,
                 stream_window: int = 4, hot_bytes: int = 256 * 2**20, events: Sequence[ServingEvents] = (),
                 drain_seconds: float = 30.0):
        if not specs and catalog is None:
            raise InvalidInputError("the service needs at least one backbone")
        if max_batch < 1 or max_wait < 0:
            raise InvalidInputError(f"need max batch >= 1 and max wait >= 0, got {max_batch} and {max_wait}")
        self.initial = list(specs)
        by_name = {spec.name: spec for spec in specs}
        if catalog is None:
            catalog = Catalog(names=lambda: list(by_name), spec=lambda name: by_name[name])
        self.store = store
        self.limits = limits
        self.max_batch, self.max_wait = max_batch, max_wait
        self.load_heads, self.backbone_loader = heads, backbone_loader
        self.stream_window = stream_window
        self.hot = HotVectors(hot_bytes)
        self.statistics = UsageStatistics()
        self.storage = StorageState(self.hot, self._health_changed)
        self.events: ServingEvents = EventFanout([self.statistics, self.storage, *events])
        self._health_listeners: list[Callable[[bool], None]] = []
        self.models = LoadedModels(catalog, self._build, drain_seconds)
        self.heads: dict[str, Head] = {}
        self._ready = threading.Event()

    # --- life cycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the heads, build every initial backbone and run it once (so the first call pays no tracing),
        then accept calls. Any failure here is raised: a server that cannot serve what it was told to
        does not start."""
        self.heads = dict(self.load_heads())
        log.info("heads: %s", ", ".join(self.heads) or "(none)")
        for spec in self.initial:
            try:
                self.models.load(spec.name)
            except ModelLoadFailed as exc:
                raise exc.__cause__ from None
        self._ready.set()

    def _build(self, spec: BackboneSpec) -> ServedBackbone:
        backbone = self.backbone_loader(spec)
        started = time.perf_counter()
        backbone.embed([np.zeros(spec.input_shape, dtype=np.uint8)])
        log.info("backbone %s ready (%d-d, fingerprint %s, warm-up %.2f s)", spec.name, backbone.output_dim,
                 spec.fingerprint[:12], time.perf_counter() - started)
        # what the server computes joins the backbone's served feature set, so `store gc` keeps it
        embedder = Embedder(spec, self.store, backbone, ServedSet.of(spec.name, spec.fingerprint, spec.describe()))
        return ServedBackbone(spec, embedder, MicroBatcher(embedder, self.max_batch, self.max_wait, self.events),
                              backbone.output_dim)

    def close(self) -> None:
        """Stop accepting calls, finish queued work, close the store."""
        self._ready.clear()
        self.models.close()
        self.store.close()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def serving(self) -> bool:
        """What health reports: started, and the store takes writes (calls are answered either way)."""
        return self.ready and self.storage.problem is None

    def on_health_change(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(serving)` whenever storage faults start or end (a door's health follows it)."""
        self._health_listeners.append(listener)

    def _health_changed(self) -> None:
        for listener in self._health_listeners:
            listener(self.serving)

    def require_ready(self) -> None:
        if not self._ready.is_set():
            raise NotReadyError("the service is not ready: it is loading its backbones or shutting down")

    # --- what is served ------------------------------------------------------------------------------

    @property
    def served(self) -> dict[str, ServedBackbone]:
        """The READY backbones, by name."""
        return self.models.ready()

    def backbone(self, name: str) -> BackboneSpec:
        self.require_ready()
        return self.models.get(name).spec

    def output_dim(self, name: str) -> int:
        """The width of the READY backbone `name`'s vectors, as its built model gives them."""
        self.require_ready()
        return self.models.get(name).dim

    def backbones(self) -> list[BackboneSpec]:
        self.require_ready()
        return [served.spec for served in self.served.values()]

    def head_backbone(self, head: Head) -> str | None:
        """The name of the READY backbone whose vectors `head` reads, or None."""
        return next((name for name, served in self.served.items()
                     if served.embedder.fingerprint == head.backbone_fingerprint), None)

    def list_heads(self) -> list[Head]:
        self.require_ready()
        return list(self.heads.values())

    def head(self, name: str) -> Head:
        self.require_ready()
        if name not in self.heads:
            raise UnknownNameError("head", name, self.heads)
        return self.heads[name]

    def usage(self, model: str) -> ModelUsage:
        """Counts and times of `model` (a backbone or a head) since the start."""
        return self.statistics.usage(model)

    # --- model control -------------------------------------------------------------------------------

    def list_models(self) -> list[ModelStatus]:
        """Every entry of the repository and every model held, with its state and reason."""
        return self.models.statuses()

    def model_status(self, name: str) -> ModelStatus:
        return self.models.status(name)

    def load_model(self, name: str) -> ModelStatus:
        """Load the repository entry `name` (blocking this caller only); ModelLoadFailed if it cannot be built."""
        self.require_ready()
        return self.models.load(name)

    def unload_model(self, name: str) -> ModelStatus:
        """Stop serving `name` once its calls in flight have finished."""
        self.require_ready()
        return self.models.unload(name)

    # --- admission -----------------------------------------------------------------------------------

    def admit(self, count: int, what: str = "images per request") -> None:
        """The one check every request passes before any work: how much it asks for."""
        if count > self.limits.max_images_per_request:
            raise LimitExceededError(what, count, self.limits.max_images_per_request)

    # --- embedding -----------------------------------------------------------------------------------

    def begin_embed(self, backbone: str, images: Sequence[ImageInput], *, batch: RawPixels | None = None,
                    all_or_nothing: bool = False, call: Call = Call(), offset: int = 0) -> PendingEmbed:
        """Check and decode the images (`images`, then those of `batch`), answer what the store holds,
        queue the rest for the backbone.

        A bad image is recorded against its index (`offset` + position) and the others go on, unless
        `all_or_nothing`, which raises the first image's error instead. A malformed batch fails the call.
        """
        self.require_ready()
        served = self.models.get(backbone)
        stacked = raw_array(batch, batch=True) if batch is not None else ()
        self.admit(len(images) + len(stacked))
        served.enter()
        pending = PendingEmbed(self, served, len(images) + len(stacked), offset, call)
        try:
            self._look_up(pending, [*images, *stacked], all_or_nothing)
        except BaseException:
            pending.release()
            raise
        return pending

    def _look_up(self, pending: PendingEmbed, images: list[ImageInput], all_or_nothing: bool) -> None:
        name, offset = pending.served.spec.name, pending.offset
        pixels = []
        for i, image in enumerate(images):
            try:
                pixels.append(to_pixels(image, self.limits.max_decoded_pixels))
            except (InvalidInputError, LimitExceededError) as exc:
                self.events.decode_failed(name, 1)
                if all_or_nothing:
                    raise at_index(offset + i, exc) from None
                pending.errors.append((offset + i, at_index(offset + i, exc)))
                continue
            pending.good.append(i)
        pending.keys = pending.served.embedder.keys(pixels)
        pending.stored = self._stored(pending.keys)
        pending.missing = [j for j, key in enumerate(pending.keys) if key not in pending.stored]
        self.events.looked_up(name, len(pending.keys) - len(pending.missing), len(pending.missing))
        if pending.missing:
            if pending.call.expired():
                raise TimeoutError("deadline passed before the images were computed")
            pending.future = pending.served.batcher.submit([pixels[j] for j in pending.missing], pending.call)

    def embed(self, backbone: str, images: Sequence[ImageInput], *, batch: RawPixels | None = None,
              all_or_nothing: bool = False, call: Call = Call()) -> EmbedOutcome:
        """Get-or-compute the (n, d) float32 vectors of `images` and `batch` (see `begin_embed`)."""
        return self.begin_embed(backbone, images, batch=batch, all_or_nothing=all_or_nothing, call=call).result()

    def embed_stream(self, requests: Iterable[StreamRequest], call: Call = Call()) -> Iterator[EmbedOutcome]:
        """One outcome per request, in order; up to `stream_window` later requests are decoded, looked up
        and queued while an earlier one computes. Error indices count from the stream's first image."""
        def begun() -> Iterator[PendingEmbed]:
            backbone, offset = "", 0
            for request in requests:
                backbone = request.backbone or backbone
                pending = self.begin_embed(backbone, request.images, batch=request.batch,
                                           all_or_nothing=request.all_or_nothing, call=call, offset=offset)
                offset += pending.count
                yield pending

        for pending in prefetched(begun(), depth=self.stream_window):
            yield pending.result()

    def get_embeddings(self, backbone: str, keys: bytes) -> tuple[np.ndarray, np.ndarray]:
        """Stored vectors by content key (KEY_BYTES each, concatenated): (n, d) float32 with NaN rows for
        keys not found, and found (n,) bool. Never computes."""
        self.require_ready()
        dim = self.models.get(backbone).dim
        if len(keys) % KEY_BYTES:
            raise InvalidInputError(f"keys must be {KEY_BYTES} bytes each; got {len(keys)} bytes")
        n = len(keys) // KEY_BYTES
        self.admit(n, "keys per request")
        key_list = [keys[i:i + KEY_BYTES] for i in range(0, len(keys), KEY_BYTES)]
        stored = self._stored(key_list)
        vectors = np.full((n, dim), np.nan, dtype=np.float32)
        found = np.zeros(n, dtype=bool)
        for i, key in enumerate(key_list):
            vector = stored.get(key)
            if vector is None:
                continue
            if len(vector) != dim:
                raise InvalidInputError(f"key {i} holds a {len(vector)}-d vector, not a {dim}-d one of {backbone}")
            vectors[i] = vector
            found[i] = True
        return vectors, found

    def _stored(self, keys: list[bytes]) -> dict[bytes, np.ndarray]:
        """The vectors among `keys` that are stored: from memory when hot, else from the store (and kept)."""
        found = self.hot.get_many(keys)
        if len(found) < len(keys):
            from_store = self.store.get_many([key for key in keys if key not in found])
            self.hot.put_many(from_store)
            found.update(from_store)
        return found

    # --- heads ---------------------------------------------------------------------------------------

    def classify(self, head_name: str, images: Sequence[ImageInput], *, batch: RawPixels | None = None,
                 all_or_nothing: bool = False, call: Call = Call()) -> ClassifyOutcome:
        """Embed `images` with the head's backbone (through the cache), then the head's probabilities."""
        head = self.head(head_name)
        backbone = self.head_backbone(head)
        if backbone is None:
            raise UnknownNameError(
                f"served backbone for head {head_name!r}, which reads vectors of fingerprint",
                head.backbone_fingerprint[:16],
                [f"{name} {served.embedder.fingerprint[:16]}" for name, served in self.served.items()])
        started = time.perf_counter()
        try:
            outcome = self.embed(backbone, images, batch=batch, all_or_nothing=all_or_nothing, call=call)
            result = self._probabilities(head, outcome)
        except BaseException:
            self.events.request_done(head_name, False, time.perf_counter() - started)
            raise
        self.events.request_done(head_name, True, time.perf_counter() - started)
        return result

    @staticmethod
    def _probabilities(head: Head, outcome: EmbedOutcome) -> ClassifyOutcome:
        n, k = len(outcome.ok), len(head.class_names)
        probabilities = np.full((n, k), np.nan, dtype=np.float32)
        labels = [""] * n
        if outcome.ok.any():
            predicted = np.asarray(head.model.predict_proba(outcome.vectors[outcome.ok]), dtype=np.float32)
            if predicted.shape != (int(outcome.ok.sum()), k):
                raise RuntimeError(f"head {head.name!r} gave probabilities of shape {predicted.shape}, "
                                   f"expected ({int(outcome.ok.sum())}, {k})")
            probabilities[outcome.ok] = predicted
            for position, best in zip(np.flatnonzero(outcome.ok), predicted.argmax(axis=1)):
                labels[position] = head.class_names[best]
        return ClassifyOutcome(list(head.class_names), probabilities, labels, outcome.cached, outcome.errors)

