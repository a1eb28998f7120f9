"""The embedding store: float32 vectors by content key, and named feature sets, in one SQLite file.

WAL mode: many readers and one writer at a time; each batch is one transaction, so a killed job
loses nothing already committed. Every vector row carries a CRC32 of its key and bytes.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from extractor.errors import (InvalidInputError, StoreDamagedError, StoreError, StoreFullError, StoreIOError,
                              UnknownNameError)
from extractor.paths import file_identity

log = logging.getLogger(__name__)

APPLICATION_ID = 0x46455354  # "FEST": marks a SQLite file as an embedding store
# 2: images decode as a viewer shows them (EXIF orientation, deep samples scaled, gray RGB as gray), so the
# pixel digests that version 1 remembered for files describe other pixels and are forgotten on open.
# 3: each item's source, a feature set's source root and external flag (columns added on open, see MIGRATIONS).
SCHEMA_VERSION = 3
SQLITE_HEADER = b"SQLite format 3\x00"
QUERY_CHUNK = 500  # keys per SELECT ... IN (...), under SQLite's variable limit
SALVAGE_CHUNK = 1024  # rows per range read by verify and repair; a range SQLite cannot read is split down to rows
PROBLEMS_LISTED = 1000  # SQLite's integrity_check messages kept

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
    updated     REAL NOT NULL,
    source_root TEXT NOT NULL DEFAULT '',
    external    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS feature_set_items (
    set_name TEXT NOT NULL,
    position INTEGER NOT NULL,
    key      BLOB NOT NULL,
    label    INTEGER NOT NULL,
    source   TEXT,
    PRIMARY KEY (set_name, position)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS file_digests (
    path     TEXT PRIMARY KEY,
    size     INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    digest   BLOB NOT NULL
) WITHOUT ROWID;
"""
# Columns added by a schema version, each added to an older store when it is opened for writing; read-only,
# an older store reads them as their defaults.
MIGRATIONS = {
    3: (("feature_sets", "source_root", "TEXT NOT NULL DEFAULT ''"),
        ("feature_sets", "external", "INTEGER NOT NULL DEFAULT 0"),
        ("feature_set_items", "source", "TEXT")),
}
COLUMN_DEFAULTS = {"source_root": "''", "external": "0", "source": "NULL"}
SERVED_PREFIX = "served:"  # the feature sets of vectors a server computed (see ServedSet)
SERVED_DATA_SPEC = "served: vectors `extractor serve` computed"


def vector_checksum(key: bytes, blob: bytes) -> int:
    return zlib.crc32(blob, zlib.crc32(key))


def store_error(path: Path, exc: sqlite3.Error) -> StoreError | sqlite3.Error:
    """The domain error for what SQLite reported about the store at `path`, naming the cause; other
    errors (a programming error, a bad statement) come back as they are."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary code under SQLite's extended ones
    if code == sqlite3.SQLITE_FULL:
        return StoreFullError(f"store {path}: disk full, nothing more can be written ({exc})", "disk full")
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN) and _on_read_only_mount(path):
        return StoreIOError(f"store {path}: its file system is mounted read-only ({exc})", "read-only")
    if code == sqlite3.SQLITE_READONLY:
        return StoreIOError(f"store {path}: the file is read-only ({exc})", "read-only")
    if code in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN):
        return StoreIOError(f"store {path}: I/O error ({exc})", "I/O error")
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreIOError(f"store {path}: locked by another writer ({exc})", "locked")
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return StoreDamagedError(f"store {path} is damaged ({exc}): run `python -m extractor store verify`, then "
                                 "`store repair`")
    return exc


def _on_read_only_mount(path: Path) -> bool:
    """Whether the file system holding `path` (or its folder) is mounted read-only."""
    for place in (path, path.parent):
        try:
            return bool(os.statvfs(place).f_flag & os.ST_RDONLY)
        except OSError:
            continue
    return False


def _translated(method):
    """A store method whose SQLite errors surface as the domain errors of `store_error`."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise store_error(self.path, exc) from exc
    return wrapper


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
    source_root: str = ""   # the folder or array file that item sources are relative to
    external: bool = False  # vectors imported from another tool: no backbone, no fingerprint


@dataclass(frozen=True)
class ServedSet:
    """The feature set that every vector a server computes for one backbone joins, in the transaction that stores
    it, so that `gc` keeps what clients were served; `store drop NAME` lets gc delete them. One per backbone
    name and fingerprint: `served:<backbone>:<fingerprint prefix>`, one class `unlabelled`."""

    name: str
    fingerprint: str
    backbone: dict

    @classmethod
    def of(cls, backbone_name: str, fingerprint: str, backbone: dict) -> ServedSet:
        return cls(f"{SERVED_PREFIX}{backbone_name}:{fingerprint[:12]}", fingerprint, backbone)


@dataclass
class VerifyReport:
    vectors_checked: int
    corrupt_keys: list[bytes]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class GcReport:
    """What `gc` deletes (or, in a dry run, would delete), by reason."""

    vectors: int = 0                 # no feature set refers to them
    vector_bytes: int = 0
    vectors_by_width: dict[int, int] = field(default_factory=dict)
    stale_digests: int = 0           # remembered pixel digests of files that are gone or changed
    deleted: bool = False
    kept: int = 0                    # vectors some feature set refers to
    kept_by_served: dict[str, int] = field(default_factory=dict)  # of them, those only served sets refer to

    def lines(self) -> list[str]:
        verb = "deleted" if self.deleted else "would delete"
        widths = ", ".join(f"{count} of width {width}" for width, count in sorted(self.vectors_by_width.items()))
        size = f"{self.vector_bytes / 1e6:.1f} MB" if self.vector_bytes >= 1e5 else f"{self.vector_bytes / 1e3:.1f} kB"
        return [f"{verb} {self.vectors} vectors ({size}) that no feature set refers to"
                + (f": {widths}" if widths else ""),
                f"{'forgot' if self.deleted else 'would forget'} {self.stale_digests} remembered file digests whose "
                "files are gone or changed",
                f"kept {self.kept} vectors that feature sets refer to" + (
                    f"; {sum(self.kept_by_served.values())} of them only because a server computed them: "
                    + ", ".join(f"{name} ({count})" for name, count in sorted(self.kept_by_served.items()))
                    + "; `store drop NAME` lets gc delete those" if self.kept_by_served else ""),
                *([] if self.deleted else ["dry run: nothing was deleted; run again with --yes to delete"])]


class EmbeddingStore:
    """Vectors by content key and named, ordered feature sets; safe to share between threads."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool = False, timeout: float = 60.0):
        self.path = Path(path)
        self.readonly = readonly
        _check_is_store(self.path)
        if not readonly:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreIOError(f"store {self.path}: cannot create its folder: {exc.strerror or exc}",
                                   "read-only" if exc.errno == errno.EROFS else "I/O error") from exc
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
            self._columns = {table: {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                             for table in ("feature_sets", "feature_set_items")}
        except StoreError:
            self._db.close()
            raise
        except sqlite3.DatabaseError as exc:
            self._db.close()
            error = store_error(self.path, exc)
            if isinstance(error, StoreError):
                raise error from exc
            raise StoreError(f"{self.path} is not a usable embedding store: {exc}") from exc

    def _initialise(self) -> None:
        with self.transaction():
            app_id = self._db.execute("PRAGMA application_id").fetchone()[0]
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if app_id == 0:
                self._db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            if app_id and version < 2:
                self._db.execute("DELETE FROM file_digests")  # see SCHEMA_VERSION
            self._migrate(version)
        if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable against process kills

    def _migrate(self, version: int) -> None:
        """Bring a store of schema `version` up to this one, inside `_initialise`'s transaction."""
        if version > SCHEMA_VERSION:
            log.warning("store %s has schema %d, newer than this version's %d", self.path, version, SCHEMA_VERSION)
            return
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for table, column, declaration in MIGRATIONS.get(target, ()):
                if column not in {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
        if version < SCHEMA_VERSION:
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            if version:  # 0: a new store
                log.info("store %s: schema %d -> %d", self.path, version, SCHEMA_VERSION)

    def _column(self, table: str, column: str) -> str:
        """`column` where the store has it, else its default: a read-only store of an older schema reads as if
        migrated."""
        return column if column in self._columns[table] else f"{COLUMN_DEFAULTS[column]} AS {column}"

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "EmbeddingStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: everything inside lands whole or not at all. A write the system refuses
        (disk full, read-only file system, I/O error) raises StoreIOError naming the cause."""
        if self.readonly:
            raise StoreIOError(f"store {self.path} is open read-only", "read-only")
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:  # SQLite rolls back by itself after some I/O errors
                        self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):  # the error being raised says more
                        self._db.execute("ROLLBACK")
                raise store_error(self.path, exc) from exc

    # --- vectors -------------------------------------------------------------------------------------

    @_translated
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

    @_translated
    def has(self, key: bytes) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM vectors WHERE key = ?", (key,)).fetchone() is not None

    def put_many(self, keys: Sequence[bytes], vectors: np.ndarray, *, connection: sqlite3.Connection | None = None,
                 served: ServedSet | None = None) -> None:
        """Store (n, d) float32 `vectors` under `keys` in one transaction (or inside the caller's), the keys
        added to the `served` feature set in the same transaction when one is given."""
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
            if served is not None:
                _add_to_served_set(connection, served, keys)
        else:
            with self.transaction() as db:
                db.executemany(sql, rows)
                if served is not None:
                    _add_to_served_set(db, served, keys)

    @_translated
    def vector_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]

    # --- feature sets --------------------------------------------------------------------------------

    def begin_feature_set(self, name: str, *, fingerprint: str, backbone: dict, data_spec: str,
                          class_names: Sequence[str], source_root: str = "", external: bool = False) -> None:
        """Create or restart feature set `name`: its items are cleared and it is marked incomplete.

        `source_root`: the folder or array file its items' sources are relative to; `external`: vectors
        made by another tool (an empty fingerprint)."""
        _check_set_name(name)
        now = time.time()
        with self.transaction() as db:
            db.execute("DELETE FROM feature_set_items WHERE set_name = ?", (name,))
            db.execute(
                "INSERT INTO feature_sets (name, fingerprint, backbone, data_spec, class_names, count, complete,"
                " skipped, created, updated, source_root, external) VALUES (?, ?, ?, ?, ?, 0, 0, '[]', ?, ?, ?, ?)"
                " ON CONFLICT(name) DO UPDATE SET fingerprint = excluded.fingerprint, backbone = excluded.backbone,"
                " data_spec = excluded.data_spec, class_names = excluded.class_names, count = 0, complete = 0,"
                " skipped = '[]', updated = excluded.updated, source_root = excluded.source_root,"
                " external = excluded.external",
                (name, fingerprint, json.dumps(backbone, sort_keys=True), data_spec, json.dumps(list(class_names)),
                 now, now, source_root, int(external)))

    def append_batch(self, name: str, start: int, keys: Sequence[bytes], labels: Sequence[int],
                     new_keys: Sequence[bytes] = (), new_vectors: np.ndarray | None = None,
                     file_digests: Sequence[tuple[str, int, int, bytes]] = (),
                     sources: Sequence[str | None] | None = None) -> None:
        """In one transaction: store new vectors, append items start.. of feature set `name` (with each
        item's source, see `Dataset.source`), and remember the pixel digests of files read (path, size,
        mtime_ns, digest)."""
        sources = sources if sources is not None else [None] * len(keys)
        if len(sources) != len(keys):
            raise InvalidInputError(f"got {len(sources)} sources for {len(keys)} items")
        with self.transaction() as db:
            if len(new_keys):
                self.put_many(new_keys, new_vectors, connection=db)
            db.executemany(
                "INSERT OR REPLACE INTO feature_set_items (set_name, position, key, label, source)"
                " VALUES (?, ?, ?, ?, ?)",
                [(name, start + i, key, int(label), source)
                 for i, (key, label, source) in enumerate(zip(keys, labels, sources))])
            db.executemany("INSERT OR REPLACE INTO file_digests (path, size, mtime_ns, digest) VALUES (?, ?, ?, ?)",
                           file_digests)

    @_translated
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

    @_translated
    def feature_sets(self) -> list[FeatureSetInfo]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, fingerprint, backbone, data_spec, class_names, count, complete, skipped, created,"
                f" updated, {self._column('feature_sets', 'source_root')}, {self._column('feature_sets', 'external')}"
                " FROM feature_sets ORDER BY name").fetchall()
        return [FeatureSetInfo(r[0], r[1], json.loads(r[2]), r[3], json.loads(r[4]), r[5], bool(r[6]),
                               json.loads(r[7]), r[8], r[9], r[10], bool(r[11])) for r in rows]

    def drop_feature_set(self, name: str) -> int:
        """Forget feature set `name` and its items (its vectors stay until `gc`); the number of items it had."""
        info = self.feature_set(name)
        with self.transaction() as db:
            db.execute("DELETE FROM feature_set_items WHERE set_name = ?", (name,))
            db.execute("DELETE FROM feature_sets WHERE name = ?", (name,))
        return info.count

    def feature_set(self, name: str) -> FeatureSetInfo:
        for info in self.feature_sets():
            if info.name == name:
                return info
        raise UnknownNameError("feature set", name, [info.name for info in self.feature_sets()])

    @_translated
    def feature_set_keys(self, name: str) -> tuple[list[bytes], np.ndarray]:
        """The ordered keys (n,) and labels (n,) of a feature set."""
        with self._lock:
            rows = self._db.execute("SELECT key, label FROM feature_set_items WHERE set_name = ? ORDER BY position",
                                    (name,)).fetchall()
        return [r[0] for r in rows], np.array([r[1] for r in rows], dtype=np.int64)

    @_translated
    def feature_set_sources(self, name: str) -> list[str | None]:
        """The source of every item of a feature set, in order (None where the store did not record it)."""
        self.feature_set(name)
        with self._lock:
            rows = self._db.execute(f"SELECT {self._column('feature_set_items', 'source')} FROM feature_set_items"
                                    " WHERE set_name = ? ORDER BY position", (name,)).fetchall()
        return [row[0] for row in rows]

    @_translated
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
        """Every page-level problem SQLite finds, every vector whose checksum or width is wrong, and every
        broken feature-set reference (see `verify_store`); a damaged file is reported, never raised."""
        with self._lock:
            return _verify(self._db)

    @_translated
    def gc(self, dry_run: bool = False) -> GcReport:
        """Delete vectors that no feature set refers to, and the remembered digests of files that are
        gone or changed; a dry run only counts them."""
        unreferenced = "FROM vectors WHERE key NOT IN (SELECT key FROM feature_set_items)"
        with self._lock:
            widths = dict(self._db.execute(f"SELECT dim, COUNT(*) {unreferenced} GROUP BY dim").fetchall())
            size = self._db.execute(f"SELECT COALESCE(SUM(length(vector)), 0) {unreferenced}").fetchone()[0]
            remembered = self._db.execute("SELECT path, size, mtime_ns FROM file_digests").fetchall()
            kept = self._db.execute("SELECT COUNT(*) FROM vectors WHERE key IN (SELECT key FROM feature_set_items)"
                                    ).fetchone()[0]
            served = dict(self._db.execute(
                "SELECT set_name, COUNT(DISTINCT key) FROM feature_set_items WHERE substr(set_name, 1, ?) = ?"
                " AND key NOT IN (SELECT key FROM feature_set_items WHERE substr(set_name, 1, ?) != ?)"
                " GROUP BY set_name", (len(SERVED_PREFIX), SERVED_PREFIX) * 2).fetchall())
        stale = [(path,) for path, size, mtime_ns in remembered if file_identity(path) != (path, size, mtime_ns)]
        report = GcReport(sum(widths.values()), size, widths, len(stale), kept=kept, kept_by_served=served)
        if dry_run:
            return report
        with self.transaction() as db:
            report.vectors = db.execute(f"DELETE {unreferenced}").rowcount  # a job may have claimed some since
            db.executemany("DELETE FROM file_digests WHERE path = ?", stale)
        report.deleted = True
        try:
            with self._lock:
                self._db.execute("VACUUM")
        except sqlite3.Error as exc:  # the deletion stands; VACUUM needs room for a copy of the file
            log.warning("%s; the deleted rows' space stays in the file until a VACUUM succeeds",
                        store_error(self.path, exc))
        return report

    @_translated
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


def _add_to_served_set(db: sqlite3.Connection, served: ServedSet, keys: Sequence[bytes]) -> None:
    """Append `keys` to the served feature set (made on first use, complete, one class), inside `db`'s
    transaction."""
    now = time.time()
    db.execute("INSERT INTO feature_sets (name, fingerprint, backbone, data_spec, class_names, count, complete,"
               " skipped, created, updated) VALUES (?, ?, ?, ?, ?, 0, 1, '[]', ?, ?) ON CONFLICT(name) DO NOTHING",
               (served.name, served.fingerprint, json.dumps(served.backbone, sort_keys=True), SERVED_DATA_SPEC,
                json.dumps(["unlabelled"]), now, now))
    start = db.execute("SELECT COALESCE(MAX(position) + 1, 0) FROM feature_set_items WHERE set_name = ?",
                       (served.name,)).fetchone()[0]
    db.executemany("INSERT INTO feature_set_items (set_name, position, key, label) VALUES (?, ?, ?, 0)",
                   [(served.name, start + i, key) for i, key in enumerate(keys)])
    db.execute("UPDATE feature_sets SET count = ?, updated = ? WHERE name = ?", (start + len(keys), now, served.name))


# --- integrity: quick_check on open, verify, repair ------------------------------------------------------

def _open_raw(path: Path) -> sqlite3.Connection:
    """A read-only connection to a store file that reads no table yet (a damaged schema is found later)."""
    if not path.is_file():
        raise StoreError(f"no store at {path}")
    return sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, isolation_level=None)


def quick_check(path: str | os.PathLike) -> list[str]:
    """What SQLite's `quick_check` finds wrong in the store file at `path` ([] when healthy or absent),
    read-only; a file SQLite cannot read at all is one problem. It reads every page: seconds per GB."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return []
    try:
        db = _open_raw(path)
        try:
            rows = db.execute(f"PRAGMA quick_check({PROBLEMS_LISTED})").fetchall()
        finally:
            db.close()
    except sqlite3.Error as exc:
        return [f"SQLite cannot read it: {exc}"]
    return [] if [row[0] for row in rows] == ["ok"] else [_one_line(row[0]) for row in rows]


def _one_line(message: str) -> str:
    """SQLite's integrity messages can span lines ("*** in database main ***\nPage 5: ...")."""
    return " ".join(message.split())


def open_checked_store(path: str | os.PathLike, *, when_damaged: str = "refuse") -> EmbeddingStore:
    """Open a store for a long-running server after SQLite's `quick_check`: a damaged store raises
    StoreDamagedError with a one-line reason (`when_damaged="refuse"`), or is opened read-only with a
    warning that says so (`"readonly"`: lookups work, new vectors are returned but not kept)."""
    if when_damaged not in ("refuse", "readonly"):
        raise InvalidInputError(f"when_damaged must be 'refuse' or 'readonly', got {when_damaged!r}")
    path = Path(path)
    problems = quick_check(path)
    if not problems:
        return EmbeddingStore(path)
    reason = (f"store {path} is damaged: {problems[0]}" + (f" (and {len(problems) - 1} more problems)"
                                                             if len(problems) > 1 else "")
              + f"; run `python -m extractor store verify --store {path}`, then `store repair`")
    if when_damaged == "refuse":
        raise StoreDamagedError(reason)
    log.warning("%s; opened read-only", reason)
    return EmbeddingStore(path, readonly=True)


def verify_store(path: str | os.PathLike) -> VerifyReport:
    """`EmbeddingStore.verify` of the file at `path`, opened read-only without the checks an open makes,
    so that a store too damaged to open is still reported on (StoreError only when there is no file)."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"no store at {path}")
    try:
        _check_is_store(path)
    except StoreError as exc:  # a header or schema too damaged to recognise is verify's finding, not a usage error
        return VerifyReport(0, [], [str(exc)])
    db = _open_raw(path)
    try:
        return _verify(db)
    finally:
        db.close()


def _verify(db: sqlite3.Connection) -> VerifyReport:
    problems = _integrity_problems(db)
    good, corrupt = set(), []
    for key, dim, blob, checksum in _vector_rows(db, problems):
        if _vector_ok(key, dim, blob, checksum):
            good.add(key)
        else:
            corrupt.append(key)
    problems += [f"vector {_hex(key)}: checksum or width mismatch" for key in corrupt]
    bad = set(corrupt)
    sets = _feature_set_rows(db, problems)
    for row in sets:
        name, count, complete = row["name"], row["count"], row["complete"]
        items = _feature_set_items(db, name, count, problems)
        missing = sum(1 for item in items if item["key"] not in good and item["key"] not in bad)
        broken = sum(1 for item in items if item["key"] in bad)
        if missing:
            problems.append(f"feature set {name!r}: {missing} items refer to missing vectors")
        if broken:
            problems.append(f"feature set {name!r}: {broken} items refer to corrupt vectors")
        if complete and len(items) != count:
            problems.append(f"feature set {name!r}: {len(items)} items, expected {count}")
    try:
        names = [row["name"] for row in sets]
        orphans = db.execute(f"SELECT COUNT(*) FROM feature_set_items WHERE set_name NOT IN "
                             f"({','.join('?' * len(names))})", names).fetchone()[0]
        if orphans:
            problems.append(f"{orphans} items belong to no feature set")
    except sqlite3.DatabaseError as exc:
        problems.append(f"feature set items: cannot be counted ({exc})")
    return VerifyReport(len(good) + len(corrupt), corrupt, problems)


def _integrity_problems(db: sqlite3.Connection) -> list[str]:
    """SQLite's own integrity_check (every page, every index entry), as messages."""
    try:
        rows = [row[0] for row in db.execute(f"PRAGMA integrity_check({PROBLEMS_LISTED})")]
    except sqlite3.DatabaseError as exc:
        return [f"SQLite integrity check cannot run: {exc}"]
    return [] if rows == ["ok"] else [f"SQLite integrity check: {_one_line(row)}" for row in rows]


def _vector_ok(key, dim, blob, checksum) -> bool:
    return (isinstance(key, bytes) and isinstance(blob, bytes) and isinstance(dim, int)
            and len(blob) == 4 * dim and vector_checksum(key, blob) == checksum)


def _hex(key) -> str:
    return key.hex() if isinstance(key, bytes) else repr(key)


def _read_ranges(read, first: int, last: int, what: str, problems: list[str]) -> list:
    """Rows `read(lo, hi)` returns for positions first..last, in chunks; a chunk SQLite cannot read is
    split down to single positions, and what stays unreadable is reported as ranges of `what`."""
    unreadable: list[tuple[int, str]] = []

    def walk(lo: int, hi: int) -> list:
        try:
            return read(lo, hi)
        except sqlite3.DatabaseError as exc:
            if lo == hi:
                unreadable.append((lo, str(exc)))
                return []
            middle = (lo + hi) // 2
            return walk(lo, middle) + walk(middle + 1, hi)

    rows = []
    for lo in range(first, last + 1, SALVAGE_CHUNK):
        rows += walk(lo, min(lo + SALVAGE_CHUNK - 1, last))
    start = None
    for i, (position, reason) in enumerate(unreadable):
        start = position if start is None else start
        if i + 1 == len(unreadable) or unreadable[i + 1][0] != position + 1:
            problems.append(f"{what} {start}-{position}: unreadable ({reason})" if start != position
                            else f"{what} {position}: unreadable ({reason})")
            start = None
    return rows


def _fetch(db: sqlite3.Connection, sql: str, params=()) -> list[dict]:
    cursor = db.execute(sql, params)
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def _rowid_rows(db: sqlite3.Connection, table: str, columns: str, problems: list[str]) -> list:
    """Every readable row of a rowid table as a tuple, read by rowid ranges; unreadable ranges reported."""
    found_first, first = _rowid_edge(db, table, "min")
    found_last, last = _rowid_edge(db, table, "max")
    if not found_last:
        problems.append(f"{table}: its last row cannot be found; rows past the last readable one are not read")
        last = _last_readable_rowid(db, table)
    if last is None:  # an empty table
        return []
    return _read_ranges(lambda lo, hi: db.execute(f"SELECT {columns} FROM {table} WHERE rowid BETWEEN ? AND ?",
                                                  (lo, hi)).fetchall(),
                        first if found_first and first is not None else 1, last, f"{table} rows", problems)


def _rowid_edge(db: sqlite3.Connection, table: str, edge: str) -> tuple[bool, int | None]:
    """(found, min or max rowid): each from one edge of the table's b-tree (one aggregate alone reads only
    that edge), else from its key index; found is False when both are damaged, the rowid None when empty."""
    for source in (table, f"{table} INDEXED BY sqlite_autoindex_{table}_1"):
        try:
            return True, db.execute(f"SELECT {edge}(rowid) FROM {source}").fetchone()[0]
        except sqlite3.DatabaseError:
            continue
    return False, None


def _last_readable_rowid(db: sqlite3.Connection, table: str, patience: int = 16) -> int | None:
    """Where to stop reading a table whose last row cannot be found (its right edge damaged): the last
    readable rowid, or the end of the first unreadable chunk right after it, once `patience` chunks in a
    row held nothing readable (gaps that gc left are skipped over)."""
    end, probe, idle = None, 1, 0
    while idle < patience:
        chunk_end = probe + SALVAGE_CHUNK - 1
        try:
            found = db.execute(f"SELECT max(rowid) FROM {table} WHERE rowid BETWEEN ? AND ?",
                               (probe, chunk_end)).fetchone()[0]
        except sqlite3.DatabaseError:
            found = None
            if idle == 0:
                end = chunk_end
        if found is None:
            idle += 1
        else:
            end, idle = found, 0
        probe += SALVAGE_CHUNK
    return end


def _vector_rows(db: sqlite3.Connection, problems: list[str]) -> list[tuple]:
    """(key, dim, vector, checksum) of every readable vector row."""
    return _rowid_rows(db, "vectors", "key, dim, vector, checksum", problems)


def _feature_set_rows(db: sqlite3.Connection, problems: list[str]) -> list[dict]:
    try:
        names = [row[1] for row in db.execute("PRAGMA table_info(feature_sets)")]
    except sqlite3.DatabaseError as exc:
        problems.append(f"feature_sets: the schema cannot be read ({exc})")
        return []
    return [dict(zip(names, row)) for row in _rowid_rows(db, "feature_sets", ", ".join(names), problems)]


def _feature_set_items(db: sqlite3.Connection, name: str, count: int, problems: list[str]) -> list[dict]:
    """The readable items of feature set `name`, by position ranges; unreadable ranges reported."""
    try:
        last = db.execute("SELECT max(position) FROM feature_set_items WHERE set_name = ?", (name,)).fetchone()[0]
    except sqlite3.DatabaseError:
        last = None
    last = max(count - 1 if isinstance(count, int) else -1, last if isinstance(last, int) else -1)
    return _read_ranges(lambda lo, hi: _fetch(
        db, "SELECT * FROM feature_set_items WHERE set_name = ? AND position BETWEEN ? AND ?", (name, lo, hi)),
        0, last, f"feature set {name!r}: items", problems)


@dataclass
class RepairReport:
    """What `repair_store` salvaged into a new store, and what it could not."""

    target: Path
    vectors: int
    vectors_corrupt: int
    feature_sets: int
    incomplete: list[str]
    problems: list[str]  # what the damaged file had: page-level messages and unreadable ranges

    def lines(self) -> list[str]:
        return [f"salvaged {self.vectors} vectors and {self.feature_sets} feature sets into {self.target}; "
                f"left out {self.vectors_corrupt} corrupt vectors and the unreadable ranges below",
                *(f"  {problem}" for problem in self.problems),
                *(f"  feature set {name!r} lost items or vectors: marked incomplete, its job rerun recomputes "
                  "only what is missing" for name in self.incomplete),
                "remembered file digests were not copied (the next job reads those files again)",
                f"check it with `store verify --store {self.target}`, then move it in place of the damaged file"]


def repair_store(source: str | os.PathLike, target: str | os.PathLike) -> RepairReport:
    """Copy what is intact in the store at `source` (possibly damaged, opened read-only, left untouched)
    into a new store at `target`: vectors whose checksum holds, feature sets, and their readable items whose
    vectors were kept. A feature set that lost any is marked incomplete, so its job, rerun, fills it again.
    Remembered file digests are not copied: unlike vectors they carry no checksum to prove them intact."""
    source, target = Path(source), Path(target)
    if target.exists():
        raise InvalidInputError(f"{target} exists: repair writes a new file")
    problems: list[str] = []
    db = _open_raw(source)
    try:
        try:
            db.execute("SELECT name FROM sqlite_master").fetchall()
        except sqlite3.DatabaseError as exc:  # page 1: the header and where every table starts
            raise StoreDamagedError(f"nothing can be salvaged from {source}: SQLite cannot read its schema "
                                    f"({exc})") from None
        rows = _vector_rows(db, problems)
        sets = _feature_set_rows(db, problems)
        items = {row["name"]: _feature_set_items(db, row["name"], row["count"], problems) for row in sets}
    finally:
        db.close()
    if not rows and not sets and problems:
        raise StoreDamagedError(f"nothing can be salvaged from {source}: {problems[0]}")
    good = [row for row in rows if _vector_ok(*row)]
    kept = {row[0] for row in good}
    incomplete = []
    with EmbeddingStore(target) as store, store.transaction() as out:
        out.executemany("INSERT OR REPLACE INTO vectors (key, dim, vector, checksum) VALUES (?, ?, ?, ?)", good)
        for row in sets:
            whole = len(items[row["name"]]) == row["count"] and all(item["key"] in kept for item in items[row["name"]])
            if row["complete"] and not whole:
                row["complete"] = 0
                incomplete.append(row["name"])
            _insert(out, "feature_sets", [row])
            _insert(out, "feature_set_items", [item for item in items[row["name"]] if item["key"] in kept])
    return RepairReport(target, len(good), len(rows) - len(good), len(sets), incomplete, problems)


def _insert(db: sqlite3.Connection, table: str, rows: list[dict]) -> None:
    """Rows of the damaged store into the new one, by the columns both have."""
    if not rows:
        return
    columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})") if row[1] in rows[0]]
    db.executemany(f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                   [[row[c] for c in columns] for row in rows])


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
        error = store_error(path, exc)
        if isinstance(error, StoreIOError):
            raise error from exc
        raise StoreDamagedError(f"{path} is not a readable embedding store: {exc}; it was left untouched") from exc
    if app_id != APPLICATION_ID and not (app_id == 0 and tables == 0):
        raise StoreError(f"{path} is a SQLite database of another application; it was left untouched")


def _check_set_name(name: str) -> None:
    if not name or len(name) > 200 or any(ord(c) < 32 for c in name):
        raise InvalidInputError(f"feature set name must be 1-200 printable characters, got {name!r}")
