"""Parquet shards of a feature set, the manifest that lists them, and importing them into the store.

A shard holds the rows of one range of dataset items: columns `key` binary(32), `source` string (see
`Dataset.source`), `label` int64, `label_name` string and `vector` fixed_size_list<float32>[d], with the
feature set's identity in the schema metadata (the same layout `store export --format parquet` writes). The manifest records each finished shard with
its row count, sha256 and the items it skipped, so a rerun redoes only what is missing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from extractor import paths
from extractor.errors import ChecksumError, InvalidInputError, StoreError
from extractor.store import EmbeddingStore
from extractor.wire import KEY_BYTES

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
IMPORT_BATCH_ROWS = 4096  # rows per store transaction when importing a large file


def feature_metadata(feature_set: str, fingerprint: str, data_spec: str, class_names: Sequence[str],
                     backbone: dict) -> dict[str, str]:
    """The Parquet schema metadata that names what a file's rows are."""
    return {"feature_set": feature_set, "class_names": json.dumps(list(class_names)), "fingerprint": fingerprint,
            "data_spec": data_spec, "backbone": json.dumps(backbone, sort_keys=True)}


def feature_table(keys: Sequence[bytes], labels: np.ndarray, vectors: np.ndarray, metadata: dict[str, str],
                  sources: Sequence[str | None] | None = None, label_names: Sequence[str] | None = None) -> pa.Table:
    """Keys (n,) of 32 bytes, labels (n,) and vectors (n, d) float32 as a `pyarrow.Table` with `metadata`;
    with `sources` and `label_names` (n,), columns `source` and `label_name` too (what an export joins on)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), vectors.shape[1])
    columns = {"key": pa.array(keys, type=pa.binary(KEY_BYTES))}
    if sources is not None:
        columns["source"] = pa.array(sources, type=pa.string())
    columns["label"] = pa.array(labels, type=pa.int64())
    if label_names is not None:
        columns["label_name"] = pa.array(label_names, type=pa.string())
    columns["vector"] = column
    return pa.table(columns).replace_schema_metadata(metadata)


def write_feature_table(table: pa.Table, path: str | os.PathLike) -> str:
    """Write `table` to Parquet file `path` whole or not at all (temporary file, then rename); its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        pq.write_table(table, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return paths.file_sha256(path)


@dataclass
class ShardRecord:
    """One finished shard: items start..stop of the dataset, of which `rows` were readable."""

    file: str
    start: int
    stop: int
    rows: int
    sha256: str
    skipped: list[dict] = field(default_factory=list)


@dataclass
class Manifest:
    """What a shards folder holds: the feature set's identity, the planned item ranges, the finished shards."""

    feature_set: str
    data_spec: str
    fingerprint: str
    backbone: dict
    class_names: list[str]
    items: int
    shard_size: int
    shards: list[ShardRecord] = field(default_factory=list)
    source_root: str = ""  # what the items' sources are relative to (see `Dataset.source`)

    def ranges(self) -> list[tuple[int, int]]:
        """The planned (start, stop) item range of every shard, in order."""
        return [(start, min(start + self.shard_size, self.items)) for start in range(0, self.items, self.shard_size)]

    @property
    def complete(self) -> bool:
        return {(s.start, s.stop) for s in self.shards} == set(self.ranges())

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def skipped(self) -> list[dict]:
        return [item for shard in self.shards for item in shard.skipped]

    @property
    def metadata(self) -> dict[str, str]:
        return {**feature_metadata(self.feature_set, self.fingerprint, self.data_spec, self.class_names, self.backbone),
                "source_root": self.source_root}

    def add(self, record: ShardRecord) -> None:
        self.shards = sorted([s for s in self.shards if (s.start, s.stop) != (record.start, record.stop)] + [record],
                             key=lambda s: s.start)

    def as_dict(self) -> dict:
        fields = asdict(self)
        return {"format": MANIFEST_FORMAT, **fields, "complete": self.complete, "rows": self.rows,
                "skipped": self.skipped}

    def save(self, path: str | os.PathLike) -> None:
        """Write the manifest atomically, so a killed job leaves the previous one readable."""
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(self.as_dict(), indent=1))
        os.replace(partial, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Manifest":
        try:
            data = json.loads(Path(path).read_text())
            if data.get("format") != MANIFEST_FORMAT:
                raise InvalidInputError(f"{path}: unknown manifest format {data.get('format')!r}")
            shards = [ShardRecord(**s) for s in data["shards"]]
            return cls(data["feature_set"], data["data_spec"], data["fingerprint"], data["backbone"],
                       data["class_names"], data["items"], data["shard_size"], shards, data.get("source_root", ""))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InvalidInputError(f"cannot read shard manifest {path}: {exc}") from None


def shard_file_name(start: int, shard_size: int) -> str:
    return f"shard-{start // shard_size:06d}.parquet"


def resume_manifest(directory: Path, planned: Manifest) -> Manifest:
    """`planned` plus the shards an earlier run of the same job finished intact in `directory`.

    A folder that holds another job's shards is refused rather than mixed into this one.
    """
    path = directory / MANIFEST_NAME
    if not path.exists():
        return planned
    earlier = Manifest.load(path)
    identity = ("feature_set", "fingerprint", "data_spec")
    if any(getattr(earlier, name) != getattr(planned, name) for name in identity):
        raise InvalidInputError(
            f"{directory} holds shards of feature set {earlier.feature_set!r} ({earlier.data_spec}, fingerprint "
            f"{earlier.fingerprint[:12]}), not of this job: choose another --shards-dir")
    ranges = set(planned.ranges())
    for record in earlier.shards:
        file = directory / record.file
        if (record.start, record.stop) not in ranges:
            log.info("shard %s covers items %d..%d, not planned now: redone", record.file, record.start, record.stop)
        elif not file.is_file() or paths.file_sha256(file) != record.sha256:
            log.warning("shard %s is missing or changed since it was written: redone", file)
        else:
            planned.add(record)
    return planned


@dataclass
class ImportSummary:
    feature_set: str
    files: int = 0
    rows: int = 0
    new_vectors: int = 0
    skipped: list[dict] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"feature set   {self.feature_set}  ({self.rows} rows from {self.files} files)",
                f"vectors       {self.new_vectors} new, {self.rows - self.new_vectors} already in the store",
                f"skipped       {len(self.skipped)} unreadable images recorded"]


def import_shards(store: EmbeddingStore, sources: Sequence[str | os.PathLike],
                  feature_set: str | None = None) -> ImportSummary:
    """Load shards into `store` as a feature set, in order; vectors the store already has are not rewritten.

    `sources` is a shards folder or its manifest (every shard is checked against the sha256 the
    manifest lists, and an unfinished job is refused), or Parquet files in the order their rows go.
    """
    metadata, files, skipped = _import_plan([Path(s) for s in sources])
    name = feature_set or metadata["feature_set"]
    summary = ImportSummary(name, files=len(files), skipped=skipped)
    store.begin_feature_set(name, fingerprint=metadata["fingerprint"], backbone=json.loads(metadata["backbone"]),
                            data_spec=metadata["data_spec"], class_names=json.loads(metadata["class_names"]),
                            source_root=metadata.get("source_root", ""),
                            external=json.loads(metadata.get("external", "false")))
    for path, expected_sha256, expected_rows in files:
        if expected_sha256 is not None and paths.file_sha256(path) != expected_sha256:
            raise ChecksumError(f"shard {path} does not match the sha256 its manifest lists: rerun the job")
        rows_before = summary.rows
        for keys, labels, vectors, item_sources in _read_rows(path, metadata["fingerprint"]):
            stored = store.get_many(keys)
            first_new: dict[bytes, int] = {}
            for i, key in enumerate(keys):
                if key not in stored:
                    first_new.setdefault(key, i)
            store.append_batch(name, summary.rows, keys, labels, list(first_new), vectors[list(first_new.values())],
                               sources=item_sources)
            summary.rows += len(keys)
            summary.new_vectors += len(first_new)
        if expected_rows is not None and summary.rows - rows_before != expected_rows:
            raise StoreError(f"shard {path} has {summary.rows - rows_before} rows, its manifest says {expected_rows}")
    store.finish_feature_set(name, summary.rows, skipped)
    log.info("imported %d rows (%d new vectors) from %d files into feature set %s", summary.rows,
             summary.new_vectors, len(files), name)
    return summary


def _import_plan(sources: list[Path]) -> tuple[dict[str, str], list[tuple[Path, str | None, int | None]], list[dict]]:
    """(metadata, [(file, expected sha256, expected rows)], skipped) for a manifest, a folder or Parquet files."""
    if len(sources) == 1 and (sources[0].is_dir() or sources[0].suffix == ".json"):
        path = sources[0] / MANIFEST_NAME if sources[0].is_dir() else sources[0]
        manifest = Manifest.load(path)
        if not manifest.complete:
            raise StoreError(f"{path}: the job finished {len(manifest.shards)} of {len(manifest.ranges())} shards; "
                             "rerun it to finish the rest before importing")
        files = [(path.parent / s.file, s.sha256, s.rows) for s in manifest.shards]
        return manifest.metadata, files, manifest.skipped
    if not sources or any(s.is_dir() or s.suffix == ".json" for s in sources):
        raise InvalidInputError("give one shards folder or manifest.json, or one or more Parquet files")
    metadata = [_parquet_metadata(s) for s in sources]
    for path, other in zip(sources[1:], metadata[1:]):
        if other["fingerprint"] != metadata[0]["fingerprint"] or other["data_spec"] != metadata[0]["data_spec"]:
            raise InvalidInputError(f"{path} holds vectors of {other['data_spec']} ({other['fingerprint'][:12]}), "
                                    f"{sources[0]} of {metadata[0]['data_spec']} ({metadata[0]['fingerprint'][:12]})")
    return metadata[0], [(s, None, None) for s in sources], []


def _parquet_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise InvalidInputError(f"file not found: {path}")
    try:
        raw = pq.read_schema(path).metadata or {}
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise InvalidInputError(f"cannot read {path} as Parquet: {exc}") from None
    metadata = {k.decode(): v.decode() for k, v in raw.items()}
    missing = {"feature_set", "fingerprint", "data_spec", "class_names"} - set(metadata)
    if missing:
        raise InvalidInputError(f"{path} lacks feature set metadata {sorted(missing)}: not a shard or export")
    metadata.setdefault("backbone", "{}")  # exports written before the backbone was recorded
    return metadata


def _read_rows(path: Path, fingerprint: str) -> Iterator[tuple[list[bytes], np.ndarray, np.ndarray, list | None]]:
    """Keys, labels (n,), vectors (n, d) float32 and sources (n,) (None without a `source` column) of a
    shard or export, in batches of rows."""
    if _parquet_metadata(path)["fingerprint"] != fingerprint:
        raise InvalidInputError(f"{path} holds vectors of another backbone than its manifest")
    parquet = pq.ParquetFile(path)
    columns = ["key", "label", "vector"] + (["source"] if "source" in parquet.schema_arrow.names else [])
    for batch in parquet.iter_batches(batch_size=IMPORT_BATCH_ROWS, columns=columns):
        vectors = batch.column("vector")
        dim = vectors.type.list_size
        keys = batch.column("key").to_pylist()
        if any(len(key) != KEY_BYTES for key in keys):
            raise InvalidInputError(f"{path}: keys must be {KEY_BYTES} bytes")
        yield (keys, batch.column("label").to_numpy().astype(np.int64),
               vectors.flatten().to_numpy().astype(np.float32, copy=False).reshape(len(keys), dim),
               batch.column("source").to_pylist() if "source" in columns else None)

