"""Vectors made by other tools (a Parquet column, a `.npy` array) imported into the store as external feature sets.

An external feature set has no backbone and an empty fingerprint: nothing here can recompute its
vectors, so its keys hash the vectors themselves. Heads, `compare` and exports use it like any other.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from extractor.datasets import encode_labels
from extractor.errors import InvalidInputError
from extractor.shards import IMPORT_BATCH_ROWS, ImportSummary
from extractor.store import EmbeddingStore

log = logging.getLogger(__name__)

EXTERNAL_BACKBONE = "external"  # the backbone name an external feature set records


def external_key(vector: np.ndarray) -> bytes:
    """The content key of a vector made elsewhere: sha256 over a tag, its width and its float32 bytes; 32 bytes."""
    vector = np.ascontiguousarray(vector, dtype=np.float32)
    return hashlib.sha256(b"external|%d|" % vector.shape[0] + vector.tobytes()).digest()


def import_vectors(store: EmbeddingStore, name: str, vectors, labels=None, *, class_names=None,
                   sources: Sequence[str] | None = None, origin: str = "arrays") -> ImportSummary:
    """Store `vectors` (n, d) as external feature set `name`, row i with label i (as `encode_labels` takes
    them) and source i (default: its row number); `origin` says where they came from."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.number) or not vectors.shape[1]:
        raise InvalidInputError(f"vectors must be a numeric (n, d) array, got {vectors.dtype} {vectors.shape}")
    vectors = vectors.astype(np.float32)
    if not np.isfinite(vectors).all():
        raise InvalidInputError(f"{origin}: vectors hold NaN or infinite values (or values too large for float32)")
    y, names = encode_labels(labels, len(vectors), class_names)
    sources = [str(i) for i in range(len(vectors))] if sources is None else [str(s) for s in sources]
    if len(sources) != len(vectors):
        raise InvalidInputError(f"got {len(sources)} sources for {len(vectors)} vectors")
    store.begin_feature_set(name, fingerprint="", backbone={"name": EXTERNAL_BACKBONE, "output_dim": vectors.shape[1]},
                            data_spec=origin, class_names=names, external=True)
    summary = ImportSummary(name, files=1)
    for start in range(0, len(vectors), IMPORT_BATCH_ROWS):
        batch = vectors[start:start + IMPORT_BATCH_ROWS]
        keys = [external_key(vector) for vector in batch]
        stored = store.get_many(keys)
        first_new: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in stored:
                first_new.setdefault(key, i)
        store.append_batch(name, start, keys, y[start:start + len(batch)], list(first_new),
                           batch[list(first_new.values())], sources=sources[start:start + len(batch)])
        summary.rows += len(batch)
        summary.new_vectors += len(first_new)
    store.finish_feature_set(name, summary.rows)
    log.info("imported %d external vectors of width %d from %s as feature set %s", summary.rows, vectors.shape[1],
             origin, name)
    return summary


def read_parquet_vectors(path: str | os.PathLike, vector_column: str, label_column: str | None = None,
                         source_column: str | None = None) -> tuple[np.ndarray, list | None, list | None]:
    """Vectors (n, d), labels (n,) and sources (n,) from columns of a Parquet file; the vector column holds
    one list of d numbers per row (any list type, any numeric type)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"file not found: {path}")
    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise InvalidInputError(f"cannot read {path} as Parquet: {exc}") from None
    wanted = [c for c in (vector_column, label_column, source_column) if c]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise InvalidInputError(f"{path} has no column {missing[0]!r}; its columns: {', '.join(names)}")
    table = pq.read_table(path, columns=list(dict.fromkeys(wanted)))
    column = table.column(vector_column).combine_chunks()
    is_list = any(check(column.type) for check in (pa.types.is_list, pa.types.is_large_list,
                                                     pa.types.is_fixed_size_list))
    if not is_list or not (pa.types.is_integer(column.type.value_type) or pa.types.is_floating(column.type.value_type)):
        raise InvalidInputError(f"{path}: column {vector_column!r} must hold a list of numbers per row, "
                                f"got {column.type}")
    if column.null_count:
        raise InvalidInputError(f"{path}: column {vector_column!r} has {column.null_count} empty rows")
    widths = set(pc.list_value_length(column).to_pylist())
    if len(widths) > 1:
        raise InvalidInputError(f"{path}: the vectors of {vector_column!r} have several widths {sorted(widths)[:5]}")
    width = widths.pop() if widths else 0
    vectors = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), width)
    return vectors, _plain_column(table, label_column, path), _plain_column(table, source_column, path)


def _plain_column(table, name: str | None, path: Path) -> list | None:
    if name is None:
        return None
    values = table.column(name).to_pylist()
    if any(value is None for value in values):
        raise InvalidInputError(f"{path}: column {name!r} has empty values")
    return values


def read_npy_vectors(path: str | os.PathLike,
                     labels_path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Vectors (n, d) from a `.npy` file and labels (n,) from another (integers or names), never unpickling."""
    return _load_npy(path), (_load_npy(labels_path).reshape(-1) if labels_path else None)


def _load_npy(path: str | os.PathLike) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InvalidInputError(f"file not found: {path}") from None
    except (OSError, ValueError, EOFError) as exc:
        raise InvalidInputError(f"cannot read {path} as .npy (pickled objects are refused): {exc}") from None
