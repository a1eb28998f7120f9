"""Mapper: an actor holding one frozen backbone; a shard's packed images -> content keys and vectors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from extractor.models import BackboneSpec, load_backbone
from extractor.embedder import content_key
from extractor.ray_engine.reader import unpack_images


class ShardEmbedder:
    """Builds the backbone once (in the actor's constructor), then embeds shard after shard."""

    def __init__(self, spec: BackboneSpec, batch_size: int):
        self.spec = spec
        self.fingerprint = spec.fingerprint
        self.batch_size = batch_size
        self.backbone = load_backbone(spec)

    def __call__(self, shards: pa.Table) -> pa.Table:
        """Rows with packed images -> the same rows with `keys` (n * 32 bytes) and `vectors` (n * d float32)."""
        keys, vectors = [], []
        for pixels, shapes in zip(shards["pixels"], shards["shapes"]):
            images = unpack_images(pixels.as_buffer(), shapes.values.to_numpy())
            keys.append(b"".join(content_key(self.fingerprint, image) for image in images))
            vectors.append(self.embed(images).tobytes())
        return shards.drop_columns(["pixels", "shapes"]).append_column(
            "keys", pa.array(keys, pa.large_binary())).append_column(
            "vectors", pa.array(vectors, pa.large_binary())).append_column(
            "dim", pa.array([self.backbone.output_dim] * len(keys), pa.int64()))

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """(n, d) float32, `batch_size` images at a time: a whole shard preprocessed at once may not fit."""
        chunks = [self.backbone.embed(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        return np.concatenate(chunks) if chunks else np.empty((0, self.backbone.output_dim), np.float32)
