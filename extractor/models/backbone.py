"""`FrozenBackbone`: a spec's model built once per process (file verified first): images -> (n, d) float32."""

from __future__ import annotations

import logging
import threading

import numpy as np

from extractor import paths
from extractor.errors import ChecksumError, InvalidInputError
from extractor.models.runtimes import open_network
from extractor.models.spec import BackboneSpec

log = logging.getLogger(__name__)


class FrozenBackbone:
    """A built backbone: canonical uint8 images -> (n, output_dim) float32 vectors.

    The file's sha256 is checked before anything reads it. Building runs one probe image through the
    network, so a cut of the wrong rank or a model that gives NaN fails here, with its name, rather
    than in the middle of a job. Batches are cut into chunks of at most `max_batch` images.
    """

    def __init__(self, spec: BackboneSpec, max_batch: int = 128):
        self.spec = spec
        self.max_batch = max_batch
        if spec.path == "imagenet":  # Keras' own download, checked by Keras' own hash
            path = spec.path
        elif not spec.sha256:
            raise ChecksumError(f"cannot build {spec.name}: {spec.missing_hint()}")
        else:
            path = str(paths.verified_file(spec.path, spec.sha256))
        log.info("building %s (%s, cut %s, input %s, preprocessing %s, pooling %s)", spec.name, spec.runtime,
                 spec.cut or "(output)", spec.input_size, spec.preprocessing.name, spec.pooling)
        self.network = open_network(spec, path)
        probe = self._run(self.preprocess([np.zeros(spec.input_shape, dtype=np.uint8)]))
        self.output_dim = probe.shape[1]
        if spec.at_defaults and spec.config.output_dim and spec.config.output_dim != self.output_dim:
            raise InvalidInputError(f"{spec.name} gives {self.output_dim} features, its config says "
                                    f"{spec.config.output_dim}")

    def preprocess(self, images: list[np.ndarray]) -> np.ndarray:
        """Canonical uint8 images -> the backbone's input batch (n, S, S, C)."""
        return self.spec.preprocessing.apply(images, self.spec.input_size, self.spec.channels)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        out = self.network.forward(batch)
        if out.ndim != 2 or len(out) != len(batch):
            raise InvalidInputError(f"{self.spec.name} gave shape {tuple(out.shape)} for {len(batch)} images, "
                                    "expected (n, d)")
        if not np.isfinite(out).all():
            raise InvalidInputError(f"{self.spec.name} gave NaN or infinite values: the model or its "
                                    "preprocessing is broken")
        return out.astype(np.float32, copy=False)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed batch (n, S, S, C) -> (n, output_dim) float32."""
        expected = self.network.input_dtype
        if not isinstance(batch, np.ndarray) or batch.dtype != expected or batch.shape[1:] != self.spec.input_shape:
            received = (f"{batch.dtype} array of shape {batch.shape}" if isinstance(batch, np.ndarray)
                        else type(batch).__name__)
            raise InvalidInputError(f"expected a {expected.name} array of shape (n, "
                                    f"{', '.join(map(str, self.spec.input_shape))}), got {received}")
        if len(batch) == 0:
            return np.empty((0, self.output_dim), dtype=np.float32)
        chunks = [self._run(batch[i:i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        out = np.concatenate(chunks)
        if out.shape[1] != self.output_dim:
            raise InvalidInputError(f"{self.spec.name} gave {out.shape[1]} features, expected {self.output_dim}")
        return out

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """Canonical uint8 images -> (n, output_dim) float32."""
        return self.forward(self.preprocess(images))


_built: dict[str, FrozenBackbone] = {}
_build_locks: dict[str, threading.Lock] = {}
_guard = threading.Lock()


def load_backbone(spec: BackboneSpec) -> FrozenBackbone:
    """The built backbone for `spec`, built once per process (keyed by fingerprint).

    One lock per model: building one never holds up callers of another.
    """
    key = spec.fingerprint
    if (built := _built.get(key)) is not None:
        return built
    with _guard:
        lock = _build_locks.setdefault(key, threading.Lock())
    with lock:
        if key not in _built:
            _built[key] = FrozenBackbone(spec)
        return _built[key]


def release_backbone(spec: BackboneSpec) -> bool:
    """Forget the built backbone for `spec` (its memory goes once no caller holds it); whether one was built."""
    with _guard:
        return _built.pop(spec.fingerprint, None) is not None


def release_all_backbones() -> int:
    """Forget every built backbone (the next `load_backbone` builds afresh); how many there were."""
    with _guard:
        count = len(_built)
        _built.clear()
        return count
