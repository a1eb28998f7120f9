"""The Python API of the core: embed images with a named backbone into a store or straight to numpy; load,
export and import feature sets. The `extractor` command line calls these same functions.

    from extractor import api
    X, y, class_names = api.embed("folder:photos", "vgg16")            # (n, 512) float32, (n,), names
    api.embed_to_store("cifar10:test", "vgg16", "c10-test")             # a feature set in the store
    X, y, class_names = api.load_feature_set("c10-test")
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from extractor import paths
from extractor.datasets import Dataset, array_dataset, file_dataset, open_dataset
from extractor.errors import InvalidInputError, UnknownFeatureSetError, UnknownNameError
from extractor.jobs import EmbedSummary, run_embed_job
from extractor.shards import ImportSummary
from extractor.store import EmbeddingStore, FeatureSetInfo

StoreLike = EmbeddingStore | str | os.PathLike | None  # an open store, a store file, or None: the default store
FeatureSet = tuple[np.ndarray, np.ndarray, list[str]]   # X (n, d) float32, y (n,) int64 class indices, class names


@contextmanager
def opened_store(store: StoreLike = None, *, readonly: bool = False) -> Iterator[EmbeddingStore]:
    """`store` open: an `EmbeddingStore` as it is (left open), a path opened and closed around the block, None
    the default store (EXTRACTOR_STORE, else the user cache)."""
    if isinstance(store, EmbeddingStore):
        yield store
        return
    with EmbeddingStore(paths.store_path(store), readonly=readonly) as opened:
        yield opened


def backbone_spec(model, *, recipe: str | None = None, input_size: int | None = None, pooling: str | None = None,
                  repository: str | os.PathLike | None = None, data_dir=None):
    """The `BackboneSpec` of model repository entry `model` (yours in `repository`, else the shipped one;
    see `extractor models list`) with these options; a `BackboneSpec` is taken as it is."""
    from extractor.models import BackboneSpec, get_backbone_spec

    if isinstance(model, BackboneSpec):
        return model
    return get_backbone_spec(model, input_size=input_size, recipe=recipe, pooling=pooling, repository=repository,
                             data_dir=data_dir)


def as_dataset(images, labels=None, class_names=None, data_dir=None) -> Dataset:
    """A dataset from a data spec (`"cifar10:test"`, `"folder:PATH"`, see `extractor.datasets`), a
    `Dataset`, uint8 images (one (n, H, W[, C]) array or a list of (H, W[, C]) arrays) or image file paths.

    Labels and class names go with arrays and paths: n integer class indices or n class names (default:
    one class, `unlabelled`); a data spec or a dataset brings its own."""
    if isinstance(images, (str, Dataset)):
        if labels is not None or class_names is not None:
            raise InvalidInputError("a data spec or dataset brings its own labels: give labels only with arrays or "
                                    "paths")
        return images if isinstance(images, Dataset) else open_dataset(images, data_dir)
    if isinstance(images, np.ndarray):
        if images.ndim not in (3, 4):
            raise InvalidInputError(f"images must be one (n, H, W[, C]) array or a list of images, got {images.shape}")
        return array_dataset(images, labels, class_names)
    images = list(images)
    if images and all(isinstance(image, (str, os.PathLike)) for image in images):
        return file_dataset(images, labels, class_names)
    if all(isinstance(image, np.ndarray) for image in images):
        return array_dataset(images, labels, class_names)
    raise InvalidInputError("images must be a data spec, uint8 arrays, or image file paths (not a mix)")


def embed(images, model="vgg16", *, labels=None, class_names=None, store: StoreLike = None, batch_size: int = 256,
          data_dir=None, backbone=None, **backbone_options) -> FeatureSet:
    """Vectors of `images` (see `as_dataset`) by backbone `model` (an entry name with options `recipe`,
    `input_size`, `pooling`, `repository` as `backbone_spec` takes them, or a `BackboneSpec`), straight to numpy: (X (n, d) float32, y (n,),
    class names), rows in the images' order. Unreadable files are skipped (and logged).

    Vectors come from `store` where it holds them, and what is computed is kept there for next time;
    nothing else is written. `backbone`: an already built backbone for `model` (default: built on the
    first vector the store lacks)."""
    from extractor.embedder import Embedder

    spec = backbone_spec(model, data_dir=data_dir, **backbone_options)
    dataset = as_dataset(images, labels, class_names, data_dir)
    vectors, y = [], []
    with opened_store(store) as opened:
        embedder = Embedder(spec, opened, backbone)
        for batch in dataset.batches(batch_size):
            vectors.append(embedder.embed([batch.pixels(j) for j in range(len(batch.images))]).vectors)
            y.append(batch.labels)
    if not vectors:  # nothing readable: no backbone was built to tell the width, unless the entry records it
        return np.empty((0, spec.output_dim or 0), np.float32), np.empty(0, np.int64), list(dataset.class_names)
    return np.concatenate(vectors), np.concatenate(y), list(dataset.class_names)


def embed_to_store(images, model, feature_set: str, *, labels=None, class_names=None, store: StoreLike = None,
                   batch_size: int = 256, limit: int | None = None, data_dir=None, backbone=None,
                   progress: bool = False, **backbone_options) -> EmbedSummary:
    """Embed `images` (see `as_dataset`) by backbone `model` (see `embed`) into feature set `feature_set`
    of `store`, with each item's source for exports; resumable: a rerun computes only what is missing.
    `backbone`: an already built one, or a remote one (`extractor.serving.client.RemoteBackbone`)."""
    from extractor.embedder import Embedder

    spec = backbone_spec(model, data_dir=data_dir, **backbone_options)
    dataset = as_dataset(images, labels, class_names, data_dir)
    with opened_store(store) as opened:
        return run_embed_job(dataset, Embedder(spec, opened, backbone), feature_set, batch_size=batch_size,
                             limit=limit, progress=progress)


def describe_feature_set(name: str, store: StoreLike = None) -> FeatureSetInfo:
    """What the store records of feature set `name`: backbone, fingerprint, data spec, classes, count, ..."""
    with opened_store(store, readonly=True) as opened:
        return _feature_set_info(opened, name)


def load_feature_set(name: str, store: StoreLike = None) -> FeatureSet:
    """Feature set `name` as (X (n, d) float32, y (n,) int64 class indices, class names)."""
    with opened_store(store, readonly=True) as opened:
        _feature_set_info(opened, name)
        return opened.load_feature_set(name)


def feature_set_sources(name: str, store: StoreLike = None) -> list[str | None]:
    """Where each row of feature set `name` came from: a path under its dataset's root, or an array index."""
    with opened_store(store, readonly=True) as opened:
        _feature_set_info(opened, name)
        return opened.feature_set_sources(name)


def _feature_set_info(store: EmbeddingStore, name: str) -> FeatureSetInfo:
    try:
        return store.feature_set(name)
    except UnknownNameError as exc:
        raise UnknownFeatureSetError(name, exc.known, store.path) from None


def export_feature_set(name: str, out: str | os.PathLike, format: str = "parquet",
                       store: StoreLike = None) -> list[Path]:
    """Write feature set `name` as Parquet (one file) or `.npy` files (a folder), each row with its source
    and class name, and the feature set's metadata; return the paths written (see `exports.export_feature_set`)."""
    from extractor.exports import export_feature_set as export

    with opened_store(store, readonly=True) as opened:
        _feature_set_info(opened, name)
        return export(opened, name, out, format)


def import_shards(sources: Sequence[str | os.PathLike], feature_set: str | None = None,
                  store: StoreLike = None) -> ImportSummary:
    """Load this project's Parquet shards (a folder, its manifest.json) or exports into `store`."""
    from extractor.shards import import_shards as load_shards

    with opened_store(store) as opened:
        return load_shards(opened, sources, feature_set)


def import_vectors(vectors, feature_set: str, labels=None, *, class_names=None, sources: Sequence[str] | None = None,
                   store: StoreLike = None, origin: str = "arrays") -> ImportSummary:
    """Vectors (n, d) made by another tool into `store` as external feature set `feature_set`, with labels
    (n integers or class names; default one class) and sources (n, default the row numbers)."""
    from extractor.foreign import import_vectors as load_vectors

    with opened_store(store) as opened:
        return load_vectors(opened, feature_set, vectors, labels, class_names=class_names, sources=sources,
                            origin=origin)


def import_parquet(path: str | os.PathLike, feature_set: str, *, vector_column: str, label_column: str | None = None,
                   source_column: str | None = None, store: StoreLike = None) -> ImportSummary:
    """A Parquet file's vector column (and label and source columns) into `store` as an external feature set."""
    from extractor.foreign import read_parquet_vectors

    vectors, labels, sources = read_parquet_vectors(path, vector_column, label_column, source_column)
    return import_vectors(vectors, feature_set, labels, sources=sources, store=store,
                          origin=f"parquet:{Path(path).resolve()}#{vector_column}")


def import_npy(path: str | os.PathLike, feature_set: str, *, labels: str | os.PathLike | None = None,
               store: StoreLike = None) -> ImportSummary:
    """An (n, d) `.npy` array of vectors (and a `.npy` of n labels) into `store` as an external feature set."""
    from extractor.foreign import read_npy_vectors

    vectors, label_values = read_npy_vectors(path, labels)
    return import_vectors(vectors, feature_set, label_values, store=store, origin=f"npy:{Path(path).resolve()}")
