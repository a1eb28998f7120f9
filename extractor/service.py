"""The feature service's transport-free core: image checks, limits, micro-batched get-or-compute, heads."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from extractor.models import BackboneSpec, FrozenBackbone, load_backbone
from extractor.embedder import Embedder
from extractor.errors import ExtractorError, InvalidInputError, LimitExceededError, NotReadyError, UnknownNameError
from extractor.images import canonical_pixels, decode_image
from extractor.jobs import prefetched
from extractor.store import EmbeddingStore
from extractor.wire import KEY_BYTES, vectors_per_response, vectors_response_bytes

log = logging.getLogger(__name__)

HEAD_SUFFIXES = (".keras", ".skops", ".joblib")  # see classifiers.persistence, which refuses .joblib (pickles)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; over any of them the request fails with a `LimitExceededError`."""

    max_images_per_request: int = 1024
    max_message_bytes: int = 64 * 1024 * 1024
    # Per image; lower than a local job's default because a server decodes for many clients at once.
    max_decoded_pixels: int = 16 * 1024 * 1024


@dataclass(frozen=True)
class RawPixels:
    """An image sent as pixels rather than as an encoded file: its bytes, shape and dtype name."""

    data: bytes
    shape: tuple[int, ...]
    dtype: str


ImageInput = bytes | RawPixels | np.ndarray  # bytes: an encoded file; an array: one image of a batch


@dataclass(frozen=True)
class Call:
    """What the transport knows about one call: its deadline (on `time.monotonic`) and whether it is still wanted."""

    deadline: float | None = None
    is_active: Callable[[], bool] = lambda: True

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.0)

    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


@dataclass
class EmbedOutcome:
    """The result for one batch of images, in request order."""

    fingerprint: str
    vectors: np.ndarray   # (n, d) float32; rows of failed images are NaN
    cached: np.ndarray    # (n,) bool: found in the store rather than computed for this call
    ok: np.ndarray        # (n,) bool
    keys: bytes           # n content keys of KEY_BYTES each; zeros for failed images
    errors: list[tuple[int, ExtractorError]]  # (index within the call, error), by index
    offset: int = 0       # index of the first image within the call


@dataclass
class ClassifyOutcome:
    class_names: list[str]
    probabilities: np.ndarray  # (n, k) float32 over class_names; rows of failed images are NaN
    labels: list[str]          # (n,) most probable class; "" for failed images
    cached: np.ndarray         # (n,) bool
    errors: list[tuple[int, ExtractorError]]


@dataclass
class Head:
    """A saved head as the service uses it: class probabilities for vectors of one backbone."""

    name: str
    backbone_fingerprint: str
    class_names: list[str]
    model: Any  # predict_proba((n, d) float32) -> (n, k), columns in class_names order


HeadLoader = Callable[[Path], Head]


def load_saved_head(path: Path) -> Head:
    """Load a head written by `classifiers.persistence.save_head`; its name is the file's stem."""
    from classifiers.persistence import load_head, read_sidecar

    metadata = read_sidecar(path)
    model = load_head(path)  # checks the file's sha256 against the sidecar first
    names = list(metadata["class_names"])
    # predict_proba's columns follow model.classes_: integer labels index the class names
    columns = [names[int(c)] if isinstance(c, (int, np.integer)) and 0 <= c < len(names) else str(c)
               for c in model.classes_]
    return Head(path.stem, metadata["backbone_fingerprint"], columns, model)


def load_heads(directory: str | Path, loader: HeadLoader) -> dict[str, Head]:
    """Every saved head in `directory` (files ending in .keras, .skops or .joblib), by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidInputError(f"heads directory not found: {directory}")
    heads: dict[str, Head] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix in HEAD_SUFFIXES:
            head = loader(path)
            if head.name in heads:
                raise InvalidInputError(f"two heads named {head.name!r} in {directory}")
            heads[head.name] = head
    return heads


def raw_array(raw: RawPixels, *, batch: bool = False) -> np.ndarray:
    """Bytes with a shape -> a uint8 array: one image (H, W[, C]), or a batch of n images (n, H, W[, C])."""
    what, ndims, expected = ("batch", (3, 4), "(n, H, W) or (n, H, W, C)") if batch else \
        ("pixel", (2, 3), "(H, W) or (H, W, C)")
    shape = tuple(raw.shape)
    if raw.dtype not in ("uint8", ""):
        raise InvalidInputError(f"{what} dtype must be uint8, got {raw.dtype!r}")
    if len(shape) not in ndims:
        raise InvalidInputError(f"{what} shape must be {expected}, got {shape}")
    if math.prod(shape) != len(raw.data):
        raise InvalidInputError(f"{len(raw.data)} bytes of {what} data do not fill shape {shape}")
    try:
        return np.frombuffer(raw.data, dtype=np.uint8).reshape(shape)
    except ValueError as exc:  # sides too large for an array even with no pixels, e.g. (2**32 - 1, 2**32 - 1, 0)
        raise InvalidInputError(f"{what} shape {shape} cannot be an array: {exc}") from None


def to_pixels(image: ImageInput, max_pixels: int) -> np.ndarray:
    """One request image -> canonical uint8 (H, W, C); raises InvalidInputError or LimitExceededError."""
    if isinstance(image, bytes):
        return decode_image(image, max_pixels)
    array = raw_array(image) if isinstance(image, RawPixels) else image
    if array.shape[0] * array.shape[1] > max_pixels:
        raise LimitExceededError("decoded pixels", array.shape[0] * array.shape[1], max_pixels)
    return canonical_pixels(array)


def at_index(index: int, error: ExtractorError) -> ExtractorError:
    """The same kind of error, its message naming the image it is about."""
    if isinstance(error, LimitExceededError):
        return LimitExceededError(f"image {index}: {error.limit}", error.value, error.maximum)
    return type(error)(f"image {index}: {error}")


class HotVectors:
    """The most recently used stored vectors, in memory up to `max_bytes`, in front of the store.

    Reading a vector from SQLite costs a B-tree walk and an overflow-page read; repeated hits skip
    that. Keys are content hashes, so an entry can never be stale.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._vectors: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        found = {}
        with self._lock:
            for key in keys:
                vector = self._vectors.get(key)
                if vector is not None:
                    self._vectors.move_to_end(key)
                    found[key] = vector
        return found

    def put_many(self, vectors: dict[bytes, np.ndarray]) -> None:
        with self._lock:
            for key, vector in vectors.items():
                if key not in self._vectors:
                    self._bytes += vector.nbytes
                self._vectors[key] = vector
            while self._bytes > self.max_bytes and self._vectors:
                self._bytes -= self._vectors.popitem(last=False)[1].nbytes


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

    def __init__(self, embedder: Embedder, max_batch: int, max_wait: float):
        self.embedder = embedder
        self.max_batch = max_batch
        self.max_wait = max_wait
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
                raise NotReadyError("the service is shutting down")
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
            for work in batch:
                if not work.future.set_running_or_notify_cancel():
                    continue
                if work.call.expired():
                    work.future.set_exception(TimeoutError("deadline passed before the images were computed"))
                elif not work.call.is_active():
                    work.future.set_exception(CancelledError())
                else:
                    live.append(work)
            if live:
                self._compute(live)

    def _compute(self, works: list[_Work]) -> None:
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
        start = 0
        for work in works:
            end = start + len(work.images)
            work.future.set_result((resolved.vectors[start:end], resolved.cached[start:end]))
            start = end


@dataclass
class ServedBackbone:
    spec: BackboneSpec
    embedder: Embedder
    batcher: MicroBatcher
    dim: int              # the built model's vector width


class PendingEmbed:
    """Images checked and looked up; the misses, if any, queued for the backbone. `result` waits for them."""

    def __init__(self, served: ServedBackbone, count: int, offset: int, call: Call):
        self.served, self.count, self.offset, self.call = served, count, offset, call
        self.errors: list[tuple[int, ExtractorError]] = []
        self.good: list[int] = []          # request positions of the images that decoded
        self.keys: list[bytes] = []        # their content keys
        self.stored: dict[bytes, np.ndarray] = {}
        self.missing: list[int] = []       # positions within `good` left for the backbone
        self.future: Future | None = None

    def result(self) -> EmbedOutcome:
        """Wait (up to the call's deadline) for the computed vectors and put every row in place."""
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


@dataclass(frozen=True)
class StreamRequest:
    backbone: str  # empty: the previous request's
    images: Sequence[ImageInput]
    all_or_nothing: bool = False
    batch: RawPixels | None = None


class FeatureService:
    """Serves frozen backbones' embeddings and saved heads' predictions through one store.

    Cache hits are answered in the caller's thread without waiting for a batch; only misses go to
    the backbone's `MicroBatcher`, which writes what it computes to the store, so vectors computed
    here are hits for batch jobs on the same store and the other way round.
    """

    def __init__(self, specs: Sequence[BackboneSpec], store: EmbeddingStore, *, limits: Limits = Limits(),
                 max_batch: int = 128, max_wait: float = 0.005, heads_dir: str | Path | None = None,
                 head_loader: HeadLoader = load_saved_head,
                 backbone_loader: Callable[[BackboneSpec], FrozenBackbone] = load_backbone,
                 stream_window: int = 4, hot_bytes: int = 256 * 2**20):
        if not specs:
            raise InvalidInputError("the service needs at least one backbone")
        if max_batch < 1 or max_wait < 0:
            raise InvalidInputError(f"need max batch >= 1 and max wait >= 0, got {max_batch} and {max_wait}")
        self.specs = {spec.name: spec for spec in specs}
        self.store = store
        self.limits = limits
        self.max_batch, self.max_wait = max_batch, max_wait
        self.heads_dir, self.head_loader, self.backbone_loader = heads_dir, head_loader, backbone_loader
        self.stream_window = stream_window
        self.hot = HotVectors(hot_bytes)
        self.served: dict[str, ServedBackbone] = {}
        self.heads: dict[str, Head] = {}
        self._ready = threading.Event()

    # --- life cycle ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the heads, build every backbone and run it once (so the first call pays no tracing),
        then accept calls."""
        if self.heads_dir is not None:
            self.heads = load_heads(self.heads_dir, self.head_loader)
            log.info("heads loaded from %s: %s", self.heads_dir, ", ".join(self.heads) or "(none)")
        for spec in self.specs.values():
            backbone = self.backbone_loader(spec)
            started = time.perf_counter()
            backbone.embed([np.zeros(spec.input_shape, dtype=np.uint8)])
            log.info("backbone %s ready (%d-d, fingerprint %s, warm-up %.2f s)", spec.name, backbone.output_dim,
                     spec.fingerprint[:12], time.perf_counter() - started)
            embedder = Embedder(spec, self.store, backbone)
            self.served[spec.name] = ServedBackbone(spec, embedder, MicroBatcher(embedder, self.max_batch,
                                                                                 self.max_wait),
                                                    backbone.output_dim)
        self._ready.set()

    def close(self) -> None:
        """Stop accepting calls, finish queued work, close the store."""
        self._ready.clear()
        for served in self.served.values():
            served.batcher.close()
        self.store.close()

    def _require_ready(self) -> None:
        if not self._ready.is_set():
            raise NotReadyError("the service is not ready: it is loading its backbones or shutting down")

    # --- what is served ------------------------------------------------------------------------------

    def backbone(self, name: str) -> BackboneSpec:
        self._require_ready()
        return self._served(name).spec

    def backbones(self) -> list[BackboneSpec]:
        self._require_ready()
        return [served.spec for served in self.served.values()]

    def output_dim(self, name: str) -> int:
        return self._served(name).dim

    def _served(self, name: str) -> ServedBackbone:
        if name not in self.served:
            raise UnknownNameError("backbone", name, self.served)
        return self.served[name]

    def head_backbone(self, head: Head) -> str | None:
        """The name of the served backbone whose vectors `head` reads, or None."""
        return next((name for name, served in self.served.items()
                     if served.embedder.fingerprint == head.backbone_fingerprint), None)

    def list_heads(self) -> list[Head]:
        self._require_ready()
        return list(self.heads.values())

    # --- embedding -----------------------------------------------------------------------------------

    def begin_embed(self, backbone: str, images: Sequence[ImageInput], *, batch: RawPixels | None = None,
                    all_or_nothing: bool = False, call: Call = Call(), offset: int = 0,
                    returns_vectors: bool = True) -> PendingEmbed:
        """Check and decode the images (`images`, then those of `batch`), answer what the store holds,
        queue the rest for the backbone.

        A bad image is recorded against its index (`offset` + position) and the others go on, unless
        `all_or_nothing`, which raises the first image's error instead. A malformed batch fails the call,
        and so do more vectors than one response message holds when they go back to the caller
        (`returns_vectors`).
        """
        self._require_ready()
        served = self._served(backbone)
        stacked = raw_array(batch, batch=True) if batch is not None else ()
        count = len(images) + len(stacked)
        if count > self.limits.max_images_per_request:
            raise LimitExceededError("images per request", count, self.limits.max_images_per_request)
        if returns_vectors:
            self._check_response_size(count, served.dim)
        images = [*images, *stacked]
        pending = PendingEmbed(served, len(images), offset, call)
        pixels = []
        for i, image in enumerate(images):
            try:
                pixels.append(to_pixels(image, self.limits.max_decoded_pixels))
            except (InvalidInputError, LimitExceededError) as exc:
                if all_or_nothing:
                    raise at_index(offset + i, exc) from None
                pending.errors.append((offset + i, at_index(offset + i, exc)))
                continue
            pending.good.append(i)
        pending.keys = served.embedder.keys(pixels)
        pending.stored = self._stored(pending.keys)
        pending.missing = [j for j, key in enumerate(pending.keys) if key not in pending.stored]
        if pending.missing:
            if call.expired():
                raise TimeoutError("deadline passed before the images were computed")
            pending.future = served.batcher.submit([pixels[j] for j in pending.missing], call)
        return pending

    def embed(self, backbone: str, images: Sequence[ImageInput], *, batch: RawPixels | None = None,
              all_or_nothing: bool = False, call: Call = Call(), returns_vectors: bool = True) -> EmbedOutcome:
        """Get-or-compute the (n, d) float32 vectors of `images` and `batch` (see `begin_embed`)."""
        return self.begin_embed(backbone, images, batch=batch, all_or_nothing=all_or_nothing, call=call,
                                returns_vectors=returns_vectors).result()

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
        self._require_ready()
        served = self._served(backbone)
        if len(keys) % KEY_BYTES:
            raise InvalidInputError(f"keys must be {KEY_BYTES} bytes each; got {len(keys)} bytes")
        n = len(keys) // KEY_BYTES
        if n > self.limits.max_images_per_request:
            raise LimitExceededError("keys per request", n, self.limits.max_images_per_request)
        dim = served.dim
        self._check_response_size(n, dim)
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

    def _check_response_size(self, count: int, dim: int) -> None:
        """Refuse, before any work, a request whose vectors could not travel back in one message."""
        size = vectors_response_bytes(count, dim)
        if size > self.limits.max_message_bytes:
            fit = vectors_per_response(self.limits.max_message_bytes, dim)
            raise LimitExceededError(f"response bytes ({count} vectors of {dim} floats; {fit} fit)",
                                     size, self.limits.max_message_bytes)

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
        self._require_ready()
        if head_name not in self.heads:
            raise UnknownNameError("head", head_name, self.heads)
        head = self.heads[head_name]
        backbone = self.head_backbone(head)
        if backbone is None:
            raise UnknownNameError(
                f"served backbone for head {head_name!r}, which reads vectors of fingerprint",
                head.backbone_fingerprint[:16],
                [f"{name} {served.embedder.fingerprint[:16]}" for name, served in self.served.items()])
        outcome = self.embed(backbone, images, batch=batch, all_or_nothing=all_or_nothing, call=call,
                             returns_vectors=False)  # only probabilities go back
        n, k = len(outcome.ok), len(head.class_names)
        probabilities = np.full((n, k), np.nan, dtype=np.float32)
        labels = [""] * n
        if outcome.ok.any():
            predicted = np.asarray(head.model.predict_proba(outcome.vectors[outcome.ok]), dtype=np.float32)
            if predicted.shape != (int(outcome.ok.sum()), k):
                raise RuntimeError(f"head {head_name!r} gave probabilities of shape {predicted.shape}, "
                                   f"expected ({int(outcome.ok.sum())}, {k})")
            probabilities[outcome.ok] = predicted
            for position, best in zip(np.flatnonzero(outcome.ok), predicted.argmax(axis=1)):
                labels[position] = head.class_names[best]
        return ClassifyOutcome(list(head.class_names), probabilities, labels, outcome.cached, outcome.errors)
