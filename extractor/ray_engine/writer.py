"""Writer: a shard's keys, labels, sources and vectors -> one Parquet file in the shards folder, and its record."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from extractor.shards import feature_table, shard_file_name, write_feature_table
from extractor.wire import KEY_BYTES

log = logging.getLogger(__name__)


def write_shards(shards: pa.Table, *, directory: str, shard_size: int, metadata: dict[str, str]) -> pa.Table:
    """Rows with keys and vectors -> rows (start, stop, file, rows, sha256, skipped) of the files written.

    A file is written whole under a temporary name and renamed, so a retried or killed writer never
    leaves a half shard under a real name.
    """
    records = {"start": [], "stop": [], "file": [], "rows": [], "sha256": [], "skipped": []}
    class_names = json.loads(metadata["class_names"])
    for row in shards.to_pylist():
        keys = [row["keys"][i:i + KEY_BYTES] for i in range(0, len(row["keys"]), KEY_BYTES)]
        vectors = np.frombuffer(row["vectors"], dtype=np.float32).reshape(len(keys), row["dim"])
        name = shard_file_name(row["start"], shard_size)
        labels = np.asarray(row["labels"], np.int64)
        table = feature_table(keys, labels, vectors, metadata, sources=row["sources"],
                              label_names=[class_names[label] for label in labels])
        sha256 = write_feature_table(table, Path(directory) / name)
        log.info("wrote shard %s: items %d..%d, %d rows", name, row["start"], row["stop"], len(keys))
        for column, value in (("start", row["start"]), ("stop", row["stop"]), ("file", name), ("rows", len(keys)),
                              ("sha256", sha256), ("skipped", row["skipped"])):
            records[column].append(value)
    return pa.table(records)
