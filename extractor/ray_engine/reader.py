"""Reader: a shard's range of dataset items -> its readable images, packed into one Arrow row."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict

import numpy as np
import pyarrow as pa

from extractor.datasets import Dataset, open_dataset

_opened: dict[tuple[str, str | None], Dataset] = {}
_open_lock = threading.Lock()


def open_once(data_spec: str, data_dir: str | None) -> Dataset:
    """The dataset a spec names, opened once per worker process (listing a large folder is not free)."""
    with _open_lock:
        if (data_spec, data_dir) not in _opened:
            _opened[data_spec, data_dir] = open_dataset(data_spec, data_dir)
        return _opened[data_spec, data_dir]


def pack_images(images: list[np.ndarray]) -> tuple[bytes, list[int]]:
    """Canonical uint8 images -> their pixels in one buffer and their shapes, three ints per image."""
    return b"".join(image.tobytes() for image in images), [side for image in images for side in image.shape]


def unpack_images(pixels, shapes: np.ndarray) -> list[np.ndarray]:
    """The inverse of `pack_images`: a buffer and flat (H, W, C) shapes -> canonical uint8 images."""
    flat = np.frombuffer(pixels, dtype=np.uint8)
    images, offset = [], 0
    for shape in np.asarray(shapes, dtype=np.int64).reshape(-1, 3):
        size = int(np.prod(shape))
        images.append(flat[offset:offset + size].reshape(shape))
        offset += size
    return images


def read_shards(shards: pa.Table, *, data_spec: str, data_dir: str | None) -> pa.Table:
    """Rows (start, stop) -> the same rows with labels, sources, shapes, pixels and the items skipped (JSON).

    Items are read by the dataset's own loader, so pixels, and therefore content keys, are those of
    the local engine; an unreadable item is recorded as skipped, as the local engine records it.
    """
    dataset = open_once(data_spec, data_dir)
    labels, sources, shapes, pixels, skipped = [], [], [], [], []
    for start, stop in zip(shards["start"].to_pylist(), shards["stop"].to_pylist()):
        items = dataset.subset(np.arange(start, stop), data_spec)
        batch = next(items.batches(max(stop - start, 1)), None)
        images = batch.images if batch is not None else []
        packed, sides = pack_images(images)
        labels.append(batch.labels.tolist() if batch is not None else [])
        sources.append([items.source(i) for i in batch.indices] if batch is not None else [])
        shapes.append(sides)
        pixels.append(packed)
        skipped.append(json.dumps([asdict(s) for s in items.skipped]))
    return shards.select(["start", "stop"]).append_column(
        "labels", pa.array(labels, pa.list_(pa.int64()))).append_column(
        "sources", pa.array(sources, pa.list_(pa.string()))).append_column(
        "shapes", pa.array(shapes, pa.list_(pa.int32()))).append_column(
        "pixels", pa.array(pixels, pa.large_binary())).append_column(
        "skipped", pa.array(skipped, pa.string()))
