"""Get-or-compute: content keys for images, vectors from the store, the backbone only for what is missing."""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from extractor.errors import StoreDamagedError, StoreError, StoreIOError
from extractor.images import pixel_digest
from extractor.models import BackboneSpec, FrozenBackbone, load_backbone
from extractor.store import EmbeddingStore, ServedSet

log = logging.getLogger(__name__)


def content_key(fingerprint: str, image: np.ndarray) -> bytes:
    """The cache key of an image's vector: sha256 over the backbone fingerprint and the image's pixel
    digest (sha256 of its canonical uint8 pixels with their shape); 32 bytes."""
    return key_for_digest(fingerprint, pixel_digest(image))


def key_for_digest(fingerprint: str, digest: bytes) -> bytes:
    hasher = _fingerprint_hasher(fingerprint).copy()
    hasher.update(digest)
    return hasher.digest()


@functools.lru_cache(maxsize=64)
def _fingerprint_hasher(fingerprint: str):
    return hashlib.sha256(fingerprint.encode() + b"|")


@dataclass
class Resolved:
    """The outcome for one batch of images, in input order."""

    keys: list[bytes]
    vectors: np.ndarray      # (n, d) float32
    cached: np.ndarray       # (n,) bool: found in the store rather than computed now
    new_keys: list[bytes]    # keys computed now, each once
    new_vectors: np.ndarray  # (len(new_keys), d) float32
    store_error: StoreError | None = None  # why the new vectors could not be kept, if they could not


class Embedder:
    """Turns canonical uint8 images into vectors of one backbone, computing each distinct image once.

    The backbone is built on the first miss only, so a fully cached job never loads TensorFlow. `served`: the
    feature set that what `embed` stores joins (a server's, so that `gc` keeps it).
    """

    def __init__(self, spec: BackboneSpec, store: EmbeddingStore, backbone: FrozenBackbone | None = None,
                 served: ServedSet | None = None):
        self.spec = spec
        self.store = store
        self.fingerprint = spec.fingerprint
        self.served = served
        self._backbone = backbone

    @property
    def backbone(self) -> FrozenBackbone:
        if self._backbone is None:
            self._backbone = load_backbone(self.spec)
        return self._backbone

    def keys(self, images: list[np.ndarray]) -> list[bytes]:
        return [content_key(self.fingerprint, image) for image in images]

    def resolve(self, images: list[np.ndarray]) -> Resolved:
        """Look every image up; compute the missing ones (duplicates once); write nothing."""
        return self.resolve_digests([pixel_digest(image) for image in images], images.__getitem__)

    def resolve_digests(self, digests: list[bytes], pixels: Callable[[int], np.ndarray]) -> Resolved:
        """`resolve` for images known by their pixel digests; `pixels(i)` is asked only for image i
        whose vector is missing (so a fully cached batch is never decoded)."""
        keys = [key_for_digest(self.fingerprint, digest) for digest in digests]
        stored = self.store.get_many(keys)
        first_missing: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in stored and key not in first_missing:
                first_missing[key] = i
        new_keys = list(first_missing)
        if new_keys:
            new_vectors = self.backbone.embed([pixels(i) for i in first_missing.values()])
        else:  # the width from what is stored: a fully cached batch never builds the backbone
            new_vectors = np.empty((0, next(iter(stored.values())).shape[0] if stored else 0), dtype=np.float32)
        computed = dict(zip(new_keys, new_vectors))
        vectors = np.empty((len(keys), new_vectors.shape[1]), dtype=np.float32)
        cached = np.zeros(len(keys), dtype=bool)
        for i, key in enumerate(keys):
            if key in stored:
                vectors[i] = stored[key]
                cached[i] = True
            else:
                vectors[i] = computed[key]
        return Resolved(keys, vectors, cached, new_keys, new_vectors)

    def embed(self, images: list[np.ndarray]) -> Resolved:
        """`resolve`, then store what was computed (one transaction). When the store cannot be written
        (disk full, read-only, I/O error, a damaged page) the vectors are still returned, with the error in
        `store_error`."""
        resolved = self.resolve(images)
        if resolved.new_keys:
            try:
                self.store.put_many(resolved.new_keys, resolved.new_vectors, served=self.served)
            except (StoreIOError, StoreDamagedError) as exc:
                log.warning("%d new vectors returned but not stored: %s", len(resolved.new_keys), exc)
                resolved.store_error = exc
        return resolved
