"""Exports of a feature set for other tools: `.npy` files with a rows CSV, or one Parquet file, each row with
its source file and class name and the feature set's metadata, so vectors join back to what they came from."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from extractor.errors import UnknownNameError
from extractor.shards import feature_metadata, feature_table, write_feature_table
from extractor.store import EmbeddingStore, FeatureSetInfo


# What of a backbone's description says how pixels became vectors (`recipe` in stores older than the
# model repository, `preprocessing` since).
PREPROCESSING_FIELDS = ("input_size", "channels", "recipe", "preprocessing", "pooling", "cut")


def export_metadata(info: FeatureSetInfo) -> dict[str, str]:
    """What an export says of its rows (Parquet key-value metadata, or the JSON beside `.npy` files): the
    feature set's identity (see `shards.feature_metadata`), its preprocessing, where sources are relative to."""
    preprocessing = {field: info.backbone[field] for field in PREPROCESSING_FIELDS if field in info.backbone}
    return {**feature_metadata(info.name, info.fingerprint, info.data_spec, info.class_names, info.backbone),
            "preprocessing": json.dumps(preprocessing, sort_keys=True), "source_root": info.source_root,
            "external": json.dumps(info.external)}


def export_feature_set(store: EmbeddingStore, name: str, out: str | os.PathLike, fmt: str) -> list[Path]:
    """Write a feature set as `.npy` files (X, y, keys) with `rows.csv` (source, label, label_name and key
    of every row) and `metadata.json` beside them, or as one Parquet file with columns key, source, label,
    label_name, vector and the same metadata in its schema; return the paths written."""
    X, y, class_names = store.load_feature_set(name)
    keys, _ = store.feature_set_keys(name)
    sources = store.feature_set_sources(name)
    metadata = export_metadata(store.feature_set(name))
    label_names = [class_names[label] for label in y]
    out = Path(out)
    if fmt == "npy":
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "X.npy", out / "y.npy", out / "keys.npy", out / "class_names.json", out / "rows.csv",
                   out / "metadata.json"]
        np.save(written[0], X)
        np.save(written[1], y)
        np.save(written[2], np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), -1))
        written[3].write_text(json.dumps(class_names))
        with open(written[4], "w", newline="") as f:
            rows = csv.writer(f)
            rows.writerow(["row", "source", "label", "label_name", "key"])
            rows.writerows(zip(range(len(y)), sources, y.tolist(), label_names, (key.hex() for key in keys)))
        written[5].write_text(json.dumps(metadata, indent=2))
        return written
    if fmt == "parquet":
        write_feature_table(feature_table(keys, y, X, metadata, sources=sources, label_names=label_names), out)
        return [out]
    raise UnknownNameError("export format", fmt, ["npy", "parquet"])
