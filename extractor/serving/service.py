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
from extractor.serving.budget import PixelBudget
from extractor.serving.events import EventFanout, ModelUsage, ServingEvents, UsageStatistics
from extractor.serving.heads import Head
from extractor.serving.hot_cache import HotVectors
from extractor.serving.loaded_models import Catalog, LoadedModels, ModelLoadFailed, ModelStatus, ServedBackbone
from extractor.serving.requests import PER_REQUEST, Call, ClassifyOutcome, EmbedOutcome, ImageInput, Limits, \
    RawPixels, StreamRequest, at_index, declared_pixels, pixel_slices, raw_array, to_pixels
from extractor.store import EmbeddingStore, ServedSet
from extractor.wire import KEY_BYTES

log = logging.getLogger(__name__)


class PendingEmbed:
    """A call's images checked and looked up, slice by slice; the last slice's misses, if any, queued for the
    backbone. `result` waits for them."""

    def __init__(self, service: FeatureService, served: ServedBackbone, count: int, offset: int, call: Call):
        self.service, self.served, self.count, self.offset, self.call = service, served, count, offset, call
        self.errors: list[tuple[int, ExtractorError]] = []
        self.vectors = np.full((count, served.dim), np.nan, dtype=np.float32)
        self.cached = np.zeros(count, dtype=bool)
        self.ok = np.zeros(count, dtype=bool)
        self.keys = [bytes(KEY_BYTES)] * count  # zeros for images that failed
        self.future: Future | None = None  # the last slice's misses
        self.future_rows: list[int] = []   # their request positions
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
            self.take_computed()
        except BaseException:
            self.service.events.request_done(self.served.spec.name, False, time.perf_counter() - self.started)
            raise
        finally:
            self.release()
        self.service.events.request_done(self.served.spec.name, True, time.perf_counter() - self.started)
        return EmbedOutcome(self.served.embedder.fingerprint, self.vectors, self.cached, self.ok,
                            b"".join(self.keys), sorted(self.errors, key=lambda error: error[0]), self.offset)

    def take_computed(self) -> None:
        """Wait for the queued misses (if any) and put their vectors in their rows."""
        if self.future is None:
            return
        future, rows, self.future, self.future_rows = self.future, self.future_rows, None, []
        try:
            computed, computed_cached = future.result(timeout=self.call.remaining())
        except TimeoutError:
            future.cancel()  # still queued: the batcher skips it
            raise
        self.vectors[rows] = computed
        self.cached[rows] = computed_cached


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
        self.budget = PixelBudget(limits.max_pixels_in_flight)
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

    def admit_pixels(self, pixels: int) -> None:
        """A request's images, by the sizes they declare, before any is decoded."""
        if pixels > self.limits.max_request_pixels:
            raise LimitExceededError(PER_REQUEST, pixels, self.limits.max_request_pixels)

    # --- embedding -----------------------------------------------------------------------------------

    def begin_embed(self, backbone: str, images: Sequence[ImageInput], *, batch: RawPixels | None = None,
                    all_or_nothing: bool = False, call: Call = Call(), offset: int = 0) -> PendingEmbed:
        """Check the images (`images`, then those of `batch`) and their declared sizes, then decode them in
        slices of at most `max_decoded_pixels`, each within the server-wide budget of pixels in flight: answer
        what the store holds, queue the rest for the backbone, and wait for a slice's vectors before decoding
        the next one, so the pixels a call holds follow the budget, not the request. The last slice is left
        queued (`PendingEmbed.result` waits for it).

        A bad image is recorded against its index (`offset` + position) and the others go on, unless
        `all_or_nothing`, which raises the first image's error instead. A malformed batch fails the call.
        """
        self.require_ready()
        served = self.models.get(backbone)
        stacked = raw_array(batch, batch=True) if batch is not None else ()
        self.admit(len(images) + len(stacked))  # before listing them: a batch of no pixels may hold 2**31 images
        every = [*images, *stacked]
        served.enter()
        pending = PendingEmbed(self, served, len(every), offset, call)
        try:
            sizes = self._declared_sizes(pending, every, all_or_nothing)
            self.admit_pixels(sum(sizes.values()))
            for positions in pixel_slices(sizes, self.limits.max_decoded_pixels):
                pending.take_computed()  # the previous slice's vectors, which also frees its share of the budget
                self._embed_slice(pending, every, positions, sum(sizes[i] for i in positions), all_or_nothing)
        except BaseException:
            if pending.future is not None:
                pending.future.cancel()
            pending.release()
            raise
        return pending

    def _declared_sizes(self, pending: PendingEmbed, images: list[ImageInput], all_or_nothing: bool) -> dict[int, int]:
        """The pixels each image declares (headers and shapes only, nothing decoded), by position; an image
        that cannot be read or is over the per-image limit is recorded as failed and left out."""
        sizes = {}
        for i, image in enumerate(images):
            try:
                sizes[i] = declared_pixels(image, self.limits.max_decoded_pixels)
            except (InvalidInputError, LimitExceededError) as exc:
                self._failed(pending, i, exc, all_or_nothing)
        return sizes

    def _failed(self, pending: PendingEmbed, position: int, error: ExtractorError, all_or_nothing: bool) -> None:
        index = pending.offset + position
        self.events.decode_failed(pending.served.spec.name, 1)
        if all_or_nothing:
            raise at_index(index, error) from None
        pending.errors.append((index, at_index(index, error)))

    def _embed_slice(self, pending: PendingEmbed, images: list[ImageInput], positions: list[int], pixels: int,
                     all_or_nothing: bool) -> None:
        """Decode the images at `positions` (`pixels` in all) within the server-wide budget, answer the stored
        ones, queue the misses; the budget's share is given back once they are computed (or dropped)."""
        call = pending.call
        remaining = call.remaining()
        # Give up a little before the deadline, so that the caller hears which budget was busy.
        wait = self.limits.max_pixel_wait_seconds if remaining is None else \
            min(self.limits.max_pixel_wait_seconds, 0.9 * remaining)
        reservation = self.budget.reserve(pixels, time.monotonic() + wait, call.is_active)
        try:
            decoded, good = [], []
            for i in positions:
                try:
                    decoded.append(to_pixels(images[i], self.limits.max_decoded_pixels))
                except (InvalidInputError, LimitExceededError) as exc:  # a header that lied about its data
                    self._failed(pending, i, exc, all_or_nothing)
                    continue
                good.append(i)
            keys = pending.served.embedder.keys(decoded)
            stored = self._stored(keys)
            pending.ok[good] = True
            missing = []
            for j, (position, key) in enumerate(zip(good, keys)):
                pending.keys[position] = key
                vector = stored.get(key)
                if vector is None:
                    missing.append(j)
                else:
                    pending.vectors[position] = vector
                    pending.cached[position] = True
            self.events.looked_up(pending.served.spec.name, len(keys) - len(missing), len(missing))
            if missing:
                if call.expired():
                    raise TimeoutError("deadline passed before the images were computed")
                pending.future = pending.served.batcher.submit([decoded[j] for j in missing], call)
                pending.future_rows = [good[j] for j in missing]
                pending.future.add_done_callback(reservation.release)
        finally:
            if pending.future is None:
                reservation.release()

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

