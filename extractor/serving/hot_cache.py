"""Recently used vectors in memory, in front of the store, bounded in bytes (a `cachetools` LRU)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from cachetools import LRUCache


class HotVectors:
    """The most recently used stored vectors, in memory up to `max_bytes`, in front of the store.

    Reading a vector from SQLite costs a B-tree walk and an overflow-page read; repeated hits skip
    that. Keys are content hashes, so an entry can never be stale.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._vectors: LRUCache = LRUCache(maxsize=max(max_bytes, 1), getsizeof=lambda vector: vector.nbytes)
        self._lock = threading.Lock()  # cachetools caches are not thread-safe

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        found = {}
        with self._lock:
            for key in keys:
                vector = self._vectors.get(key)
                if vector is not None:
                    found[key] = vector
        return found

    def put_many(self, vectors: dict[bytes, np.ndarray]) -> None:
        with self._lock:
            for key, vector in vectors.items():
                if vector.nbytes <= self._vectors.maxsize:  # a larger one would raise ValueError
                    self._vectors[key] = vector
