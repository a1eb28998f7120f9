"""The embedding store: float32 vectors by content key, and named feature sets, in one SQLite file.

WAL mode: many readers and one writer at a time; each batch is one transaction, so a killed job
loses nothing already committed. Every vector row carries a CRC32 of its key and bytes.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from extractor.errors import InvalidInputError, StoreError, UnknownNameError
from extractor.paths import file_identity

log = logging.getLogger(__name__)

APPLICATION_ID = 0x46455354  # "FEST": marks a SQLite file as an embedding store
SCHEMA_VERSION = 1
SQLITE_HEADER = b"SQLite format 3\x00"
QUERY_CHUNK = 500  # keys per SELECT ... IN (...), under SQLite's variable limit

SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (
    key      BLOB PRIMARY KEY,
    dim      INTEGER NOT NULL,
    vector   BLOB NOT NULL,
    checksum INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS feature_sets (
    name        TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    backbone    TEXT NOT NULL,
    data_spec   TEXT NOT NULL,
    class_names TEXT NOT NULL,
    count       INTEGER NOT NULL DEFAULT 0,
    complete    INTEGER NOT NULL DEFAULT 0,
    skipped     TEXT NOT NULL DEFAULT '[]',
    created     REAL NOT NULL,
    updated     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS feature_set_items (
    set_name TEXT NOT NULL,
    position INTEGER NOT NULL,
    key      BLOB NOT NULL,
    label    INTEGER NOT NULL,
    PRIMARY KEY (set_name, position)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS file_digests (
    path     TEXT PRIMARY KEY,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    digest   BLOB NOT NULL
) WITHOUT ROWID;
"""


def vector_checksum(key: bytes, blob: bytes) -> int:
    return zlib.crc32(blob, zlib.crc32(key))


@dataclass
class FeatureSetInfo:
    name: str
    fingerprint: str
    backbone: dict
    data_spec: str
    class_names: list[str]
    count: int
    complete: bool
    skipped: list[dict]
    created: float
    updated: float


@dataclass
class VerifyReport:
    vectors_checked: int
    corrupt_keys: list[bytes]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


class EmbeddingStore:
    """Vectors by content key and named, ordered feature sets; safe to share between threads."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False, timeout: float = 60.0):
        self.path = Path(path)
        self.readonly = readonly
        _check_is_store(self.path)
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.exists():
            raise StoreError(f"no store at {self.path}")
        uri = f"file:{self.path.resolve()}" + ("?mode=ro" if readonly else "")
        self._db = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        try:
            self._db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            self._db.execute("PRAGMA cache_size = -65536")  # 64 MiB of pages: lookups stay in memory
            self._db.execute("PRAGMA mmap_size = 1073741824")
            if not readonly:
                self._initialise()
            elif not self._db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
                # A file whose creator was stopped before its first commit: an empty store. The schema goes
                # in this connection's temporary tables, the file stays untouched.
                for statement in SCHEMA.replace("CREATE TABLE", "CREATE TEMP TABLE").split(";"):
                    if statement.strip():
                        self._db.execute(statement)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(f"{self.path} is not a usable embedding store: {exc}") from exc

    def _initialise(self) -> None:
        with self.transaction():
            app_id = self._db.execute("PRAGMA application_id").fetchone()[0]
            if app_id == 0:
                self._db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
        if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable against process kills

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "EmbeddingStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: everything inside lands whole or not at all."""
        if self.readonly:
            raise StoreError(f"{self.path} is open read-only")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- vectors -------------------------------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, np.ndarray]:
        """The stored vectors among `keys`, as {key: (d,) float32}; missing or corrupt rows are absent."""
        found: dict[bytes, np.ndarray] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            for start in range(0, len(unique), QUERY_CHUNK):
                chunk = unique[start:start + QUERY_CHUNK]
                rows = self._db.execute(
                    f"SELECT key, vector, checksum FROM vectors WHERE key IN ({','.join('?' * len(chunk))})", chunk)
                for key, blob, checksum in rows:
                    if vector_checksum(key, blob) != checksum:
                        log.error("store %s: corrupt vector %s ignored (it will be recomputed)", self.path, key.hex())
                        continue
                    found[key] = np.frombuffer(blob, dtype=np.float32)
        return found

    def has(self, key: bytes) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM vectors WHERE key = ?", (key,)).fetchone() is not None

    def put_many(self, keys: Sequence[bytes], vectors: np.ndarray, *, connection: sqlite3.Connection | None = None) -> None:
        """Store (n, d) float32 `vectors` under `keys` in one transaction (or inside the caller's)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) != len(keys):
            raise InvalidInputError(f"need (n, d) vectors for {len(keys)} keys, got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise InvalidInputError("refusing to store vectors with NaN or infinite values")
        rows = []
        for key, vector in zip(keys, vectors):
            blob = vector.tobytes()
            rows.append((key, vector.shape[0], blob, vector_checksum(key, blob)))
        sql = "INSERT OR REPLACE INTO vectors (key, dim, vector, checksum) VALUES (?, ?, ?, ?)"
        if connection is not None:
            connection.executemany(sql, rows)
        else:
            with self.transaction() as db:
                db.executemany(sql, rows)

    def vector_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]

    # --- feature sets --------------------------------------------------------------------------------

    def begin_feature_set(self, name: str, *, fingerprint: str, backbone: dict, data_spec: str,
                          class_names: Sequence[str]) -> None:
        """Create or restart feature set `name`: its items are cleared and it is marked incomplete."""
        _check_set_name(name)
        now = time.time()
        with self.transaction() as db:
            db.execute("DELETE FROM feature_set_items WHERE set_name = ?", (name,))
            db.execute(
                "INSERT INTO feature_sets (name, fingerprint, backbone, data_spec, class_names, count, complete,"
                " skipped, created, updated) VALUES (?, ?, ?, ?, ?, 0, 0, '[]', ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET fingerprint = excluded.fingerprint, backbone = excluded.backbone,"
                " data_spec = excluded.data_spec, class_names = excluded.class_names, count = 0, complete = 0,"
                " skipped = '[]', updated = excluded.updated",
                (name, fingerprint, json.dumps(backbone, sort_keys=True), data_spec, json.dumps(list(class_names)),
                 now, now))

    def append_batch(self, name: str, start: int, keys: Sequence[bytes], labels: Sequence[int],
                     new_keys: Sequence[bytes] = (), new_vectors: np.ndarray | None = None,
                     file_digests: Sequence[tuple[str, int, int, bytes]] = ()) -> None:
        """In one transaction: store new vectors, append items start.. of feature set `name`, and
        remember the pixel digests of files read (path, size, mtime_ns, digest)."""
        with self.transaction() as db:
            if len(new_keys):
                self.put_many(new_keys, new_vectors, connection=db)
            db.executemany(
                "INSERT OR REPLACE INTO feature_set_items (set_name, position, key, label) VALUES (?, ?, ?, ?)",
                [(name, start + i, key, int(label)) for i, (key, label) in enumerate(zip(keys, labels))])
            db.executemany("INSERT OR REPLACE INTO file_digests (path, size, mtime_ns, digest) VALUES (?, ?, ?, ?)",
                           file_digests)

    def known_file_digests(self, files: Sequence[tuple[str, int, int]]) -> dict[str, bytes]:
        """Pixel digests remembered for files (path, size, mtime_ns) whose size and mtime still match."""
        wanted = {path: (size, mtime_ns) for path, size, mtime_ns in files}
        found: dict[str, bytes] = {}
        paths = list(wanted)
        with self._lock:
            for start in range(0, len(paths), QUERY_CHUNK):
                chunk = paths[start:start + QUERY_CHUNK]
                for path, size, mtime_ns, digest in self._db.execute(
                        f"SELECT path, size, mtime_ns, digest FROM file_digests WHERE path IN "
                        f"({','.join('?' * len(chunk))})", chunk):
                    if wanted[path] == (size, mtime_ns):
                        found[path] = digest
        return found

    def finish_feature_set(self, name: str, count: int, skipped: Sequence[dict] = ()) -> None:
        with self.transaction() as db:
            db.execute("UPDATE feature_sets SET count = ?, complete = 1, skipped = ?, updated = ? WHERE name = ?",
                       (count, json.dumps(list(skipped)), time.time(), name))

    def feature_sets(self) -> list[FeatureSetInfo]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, fingerprint, backbone, data_spec, class_names, count, complete, skipped, created,"
                " updated FROM feature_sets ORDER BY name").fetchall()
        return [FeatureSetInfo(r[0], r[1], json.loads(r[2]), r[3], json.loads(r[4]), r[5], bool(r[6]),
                               json.loads(r[7]), r[8], r[9]) for r in rows]

    def feature_set(self, name: str) -> FeatureSetInfo:
        for info in self.feature_sets():
            if info.name == name:
                return info
        raise UnknownNameError("feature set", name, [info.name for info in self.feature_sets()])

    def feature_set_keys(self, name: str) -> tuple[list[bytes], np.ndarray]:
        """The ordered keys (n,) and labels (n,) of a feature set."""
        with self._lock:
            rows = self._db.execute("SELECT key, label FROM feature_set_items WHERE set_name = ? ORDER BY position",
                                    (name,)).fetchall()
        return [r[0] for r in rows], np.array([r[1] for r in rows], dtype=np.int64)

    def load_feature_set(self, name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """X (n, d) float32, y (n,) int64 and the class names of a complete feature set, in one call."""
        info = self.feature_set(name)
        if not info.complete:
            raise StoreError(f"feature set {name!r} is incomplete (its job did not finish): run the job again")
        with self._lock:
            rows = self._db.execute(
                "SELECT i.key, i.label, v.vector, v.checksum, v.dim FROM feature_set_items i"
                " LEFT JOIN vectors v ON v.key = i.key WHERE i.set_name = ? ORDER BY i.position", (name,)).fetchall()
        if len(rows) != info.count:
            raise StoreError(f"feature set {name!r} lists {info.count} items but has {len(rows)}")
        dims = {row[4] for row in rows}
        if None in dims:
            raise StoreError(f"feature set {name!r} refers to vectors missing from the store: run `store verify`")
        if len(dims) > 1:
            raise StoreError(f"feature set {name!r} mixes vector widths {sorted(dims)}")
        for key, _, blob, checksum, _ in rows:
            if vector_checksum(key, blob) != checksum:
                raise StoreError(f"feature set {name!r}: vector {key.hex()} is corrupt: run `store verify`")
        dim = dims.pop() if dims else 0
        X = np.frombuffer(b"".join(row[2] for row in rows), dtype=np.float32).reshape(len(rows), dim)
        y = np.array([row[1] for row in rows], dtype=np.int64)
        return X, y, info.class_names

    # --- maintenance ---------------------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Re-check every vector's checksum and every feature set's references."""
        problems, corrupt, checked = [], [], 0
        with self._lock:
            integrity = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if integrity != "ok":
                problems.append(f"SQLite integrity check: {integrity}")
            for key, dim, blob, checksum in self._db.execute("SELECT key, dim, vector, checksum FROM vectors"):
                checked += 1
                if vector_checksum(key, blob) != checksum or len(blob) != 4 * dim:
                    corrupt.append(key)
            for key in corrupt:
                problems.append(f"vector {key.hex()}: checksum mismatch")
            for name, count, complete, items, missing in self._db.execute(
                    "SELECT s.name, s.count, s.complete,"
                    " (SELECT COUNT(*) FROM feature_set_items i WHERE i.set_name = s.name),"
                    " (SELECT COUNT(*) FROM feature_set_items i LEFT JOIN vectors v ON v.key = i.key"
                    "  WHERE i.set_name = s.name AND v.key IS NULL) FROM feature_sets s"):
                if missing:
                    problems.append(f"feature set {name!r}: {missing} items refer to missing vectors")
                if complete and items != count:
                    problems.append(f"feature set {name!r}: {items} items, expected {count}")
            orphans = self._db.execute(
                "SELECT COUNT(*) FROM feature_set_items WHERE set_name NOT IN (SELECT name FROM feature_sets)").fetchone()[0]
            if orphans:
                problems.append(f"{orphans} items belong to no feature set")
        return VerifyReport(checked, corrupt, problems)

    def gc(self, dry_run: bool = False) -> int:
        """Delete vectors that no feature set refers to, and the remembered digests of files that are
        gone or changed; return how many vectors (would) go."""
        unreferenced = "FROM vectors WHERE key NOT IN (SELECT key FROM feature_set_items)"
        if dry_run:
            with self._lock:
                return self._db.execute(f"SELECT COUNT(*) {unreferenced}").fetchone()[0]
        with self._lock:
            remembered = self._db.execute("SELECT path, size, mtime_ns FROM file_digests").fetchall()
        stale = [(path,) for path, size, mtime_ns in remembered if file_identity(path) != (path, size, mtime_ns)]
        with self.transaction() as db:
            removed = db.execute(f"DELETE {unreferenced}").rowcount
            db.executemany("DELETE FROM file_digests WHERE path = ?", stale)
        with self._lock:
            self._db.execute("VACUUM")
        return removed

    def info(self) -> dict:
        with self._lock:
            widths = dict(self._db.execute("SELECT dim, COUNT(*) FROM vectors GROUP BY dim").fetchall())
        return {
            "path": str(self.path),
            "bytes": sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file()),
            "vectors": sum(widths.values()),
            "vectors_by_width": widths,
            "feature_sets": [
                {"name": s.name, "count": s.count, "complete": s.complete, "data_spec": s.data_spec,
                 "backbone": s.backbone.get("name"), "fingerprint": s.fingerprint[:16], "skipped": len(s.skipped)}
                for s in self.feature_sets()
            ],
        }


def _check_is_store(path: Path) -> None:
    """Refuse, without writing a byte, a file that is not an embedding store."""
    if not path.exists():
        return
    if path.is_dir():
        raise StoreError(f"{path} is a directory, not an embedding store file")
    if path.stat().st_size == 0:
        return
    with open(path, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise StoreError(f"{path} is not an embedding store (not a SQLite database); it was left untouched")
    try:
        probe = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
        try:
            app_id = probe.execute("PRAGMA application_id").fetchone()[0]
            tables = probe.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]
        finally:
            probe.close()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path} is not a readable embedding store: {exc}; it was left untouched") from exc
    if app_id != APPLICATION_ID and not (app_id == 0 and tables == 0):
        raise StoreError(f"{path} is a SQLite database of another application; it was left untouched")


def _check_set_name(name: str) -> None:
    if not name or len(name) > 200 or any(ord(c) < 32 for c in name):
        raise InvalidInputError(f"feature set name must be 1-200 printable characters, got {name!r}")


def export_feature_set(store: EmbeddingStore, name: str, out: str | os.PathLike, fmt: str) -> list[Path]:
    """Write a feature set as `.npy` files (X, y, keys, class names) or one Parquet file; return paths."""
    X, y, class_names = store.load_feature_set(name)
    keys, _ = store.feature_set_keys(name)
    out = Path(out)
    if fmt == "npy":
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "X.npy", out / "y.npy", out / "keys.npy", out / "class_names.json"]
        np.save(written[0], X)
        np.save(written[1], y)
        np.save(written[2], np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), -1))
        written[3].write_text(json.dumps(class_names))
        return written
    if fmt == "parquet":
        from extractor.shards import feature_metadata, feature_table, write_feature_table

        info = store.feature_set(name)
        write_feature_table(feature_table(keys, y, X, feature_metadata(
            name, info.fingerprint, info.data_spec, class_names, info.backbone)), out)
        return [out]
    raise UnknownNameError("export format", fmt, ["npy", "parquet"])

