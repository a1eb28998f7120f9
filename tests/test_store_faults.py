"""Storage faults are clear states: a full disk, a read-only file system and I/O errors raise errors that
name the cause (computed vectors still come back); a damaged store is found on open, listed by `store
verify` (exit 1, no traceback) and salvaged by `store repair`; `store gc` only shows unless told --yes."""

import contextlib
import hashlib
import logging
import sqlite3
import subprocess

import numpy as np
import pytest

from conftest import reliability_sizes
from extractor.cli import main
from extractor.embedder import Embedder
from extractor.errors import StoreDamagedError, StoreError, StoreFullError, StoreIOError
from extractor.store import (SCHEMA_VERSION, EmbeddingStore, open_checked_store, quick_check, repair_store,
                             store_error, verify_store)

DIM = 64


def keys(n, offset=0):
    return [hashlib.sha256(str(i + offset).encode()).digest() for i in range(n)]


def vectors(n, offset=0):
    return np.random.default_rng(offset).normal(size=(n, DIM)).astype(np.float32)


def build_store(path, n=2000, in_set=1000):
    """A store of `n` vectors, the first `in_set` of them in feature set "s" (complete)."""
    with EmbeddingStore(path) as store:
        store.put_many(keys(n), vectors(n))
        store.begin_feature_set("s", fingerprint="f" * 64, backbone={"name": "b"}, data_spec="npz:x",
                                class_names=["a", "b"])
        store.append_batch("s", 0, keys(in_set), np.arange(in_set) % 2)
        store.finish_feature_set("s", in_set)
    return path


def page_size(path) -> int:
    size = int.from_bytes(path.read_bytes()[16:18], "big")
    return 65536 if size == 1 else size


def damage_pages(path, pages, seed=0) -> None:
    """Overwrite whole pages (numbered from 1, as SQLite does) with random bytes."""
    size, rng = page_size(path), np.random.default_rng(seed)
    with open(path, "r+b") as f:
        for page in pages:
            f.seek((page - 1) * size)
            f.write(rng.integers(0, 256, size, dtype=np.uint8).tobytes())


def page_count(path) -> int:
    return path.stat().st_size // page_size(path)


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


class VectorOfPixels:
    """A backbone stand-in: the vector is the first DIM pixels as floats."""

    def embed(self, images):
        return np.stack([np.resize(image.astype(np.float32).ravel(), DIM) for image in images])


def embedder(store) -> Embedder:
    spec = type("Spec", (), {"fingerprint": "f" * 64, "output_dim": DIM, "name": "fake"})()
    return Embedder(spec, store, VectorOfPixels())


def images(n, offset=0):
    return [np.full((4, 4, 3), (i + offset) % 256, dtype=np.uint8) + np.arange(3, dtype=np.uint8) for i in range(n)]


# --- write faults ----------------------------------------------------------------------------------------------

def test_a_full_disk_is_a_clear_error_and_computed_vectors_still_come_back(tmp_path):
    with EmbeddingStore(tmp_path / "s.sqlite") as store:
        store.put_many(keys(10), vectors(10))
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own size limit: SQLITE_FULL past it
        with pytest.raises(StoreFullError, match="disk full") as caught:
            store.put_many(keys(500, 10), vectors(500, 10))
        assert caught.value.cause == "disk full" and str(tmp_path / "s.sqlite") in str(caught.value)
        resolved = embedder(store).embed(images(50))
        assert isinstance(resolved.store_error, StoreFullError) and resolved.vectors.shape == (50, DIM)
        np.testing.assert_array_equal(resolved.vectors, VectorOfPixels().embed(images(50)))
        assert store.vector_count() == 10 and store.verify().ok  # nothing half-written
        store._db.execute("PRAGMA max_page_count = 1000000")  # room again: writes succeed again
        assert embedder(store).embed(images(50)).store_error is None and store.vector_count() == 60


def test_a_read_only_store_refuses_writes_by_name_and_still_returns_vectors(tmp_path):
    build_store(tmp_path / "s.sqlite", n=20, in_set=5)
    with EmbeddingStore(tmp_path / "s.sqlite", readonly=True) as store:
        with pytest.raises(StoreIOError, match="read-only") as caught:
            store.put_many(keys(1, 100), vectors(1, 100))
        assert caught.value.cause == "read-only"
        resolved = embedder(store).embed(images(3))
        assert resolved.store_error.cause == "read-only" and resolved.vectors.shape == (3, DIM)
    with EmbeddingStore(tmp_path / "s.sqlite") as store:
        store._db.execute("PRAGMA query_only = 1")  # what SQLite says when the file cannot be written
        with pytest.raises(StoreIOError, match="read-only"):
            store.put_many(keys(1, 100), vectors(1, 100))


@pytest.mark.parametrize("code, cause, kind", [
    (sqlite3.SQLITE_FULL, "disk full", StoreFullError),
    (sqlite3.SQLITE_IOERR | (3 << 8), "I/O error", StoreIOError),  # SQLITE_IOERR_WRITE
    (sqlite3.SQLITE_READONLY | (1 << 8), "read-only", StoreIOError),
    (sqlite3.SQLITE_CANTOPEN, "I/O error", StoreIOError),
    (sqlite3.SQLITE_BUSY, "locked", StoreIOError),
])
def test_sqlite_failures_become_errors_naming_their_cause(code, cause, kind, tmp_path):
    exc = sqlite3.OperationalError("what SQLite said")
    exc.sqlite_errorcode = code
    error = store_error(tmp_path / "s.sqlite", exc)
    assert type(error) is kind and error.cause == cause and "what SQLite said" in str(error)
    corrupt = sqlite3.DatabaseError("database disk image is malformed")
    corrupt.sqlite_errorcode = sqlite3.SQLITE_CORRUPT
    assert isinstance(store_error(tmp_path / "s.sqlite", corrupt), StoreDamagedError)
    assert store_error(tmp_path, sqlite3.ProgrammingError("a bug")).__class__ is sqlite3.ProgrammingError


# --- damage ----------------------------------------------------------------------------------------------------

def test_a_damaged_store_is_found_on_open_refused_or_opened_read_only(tmp_path, caplog):
    path = build_store(tmp_path / "s.sqlite")
    assert quick_check(path) == [] and quick_check(tmp_path / "absent.sqlite") == []
    open_checked_store(path).close()
    damage_pages(path, [page_count(path) // 2])
    assert quick_check(path)
    with pytest.raises(StoreDamagedError) as refused:
        open_checked_store(path)
    assert "\n" not in str(refused.value) and "store verify" in str(refused.value)
    with caplog.at_level(logging.WARNING), open_checked_store(path, when_damaged="readonly") as store:
        assert store.readonly and "opened read-only" in caplog.text
        with pytest.raises(StoreIOError, match="read-only"):
            store.put_many(keys(1, 5000), vectors(1, 5000))


def test_verify_lists_every_problem_and_exits_1_without_a_traceback(tmp_path, capsys):
    path = build_store(tmp_path / "s.sqlite")
    assert run_cli(capsys, "store", "verify", "--store", str(path))[0] == 0
    damage_pages(path, [page_count(path) // 3, page_count(path) // 2])
    code, output = run_cli(capsys, "store", "verify", "--store", str(path))
    assert code == 1 and "Traceback" not in output
    assert "SQLite integrity check" in output and "unreadable" in output
    assert "feature set 's'" in output or "vectors rows" in output
    with EmbeddingStore(path, readonly=True) as store:  # a damaged page no longer hides behind a traceback
        with pytest.raises(StoreDamagedError, match="store verify"):
            for start in range(0, 2000, 100):
                store.get_many(keys(100, start))


def test_verify_of_a_file_that_is_no_store_at_all(tmp_path, capsys, caplog):
    (tmp_path / "junk").write_bytes(b"SQLite format 3\x00" + bytes(5000))
    code, output = run_cli(capsys, "store", "verify", "--store", str(tmp_path / "junk"))
    assert code == 1 and "Traceback" not in output and "1 problems" in output
    code, output = run_cli(capsys, "store", "verify", "--store", str(tmp_path / "absent"))
    assert code == 2 and "no store" in caplog.text


def test_repair_salvages_what_is_intact_into_a_new_file(tmp_path, capsys):
    path = build_store(tmp_path / "s.sqlite")
    damage_pages(path, [page_count(path) // 4])  # among the vectors of feature set "s"
    before = path.read_bytes()
    code, output = run_cli(capsys, "store", "repair", "--store", str(path), "--out", str(tmp_path / "new.sqlite"))
    assert code == 0 and "Traceback" not in output and "marked incomplete" in output
    assert path.read_bytes() == before  # the damaged file is left as it was
    assert verify_store(tmp_path / "new.sqlite").ok
    with EmbeddingStore(tmp_path / "new.sqlite") as repaired:
        salvaged = repaired.get_many(keys(2000))
        assert 1500 < len(salvaged) < 2000
        originals = dict(zip(keys(2000), vectors(2000)))
        assert all(np.array_equal(vector, originals[key]) for key, vector in salvaged.items())
        info = repaired.feature_set("s")
        assert not info.complete and info.class_names == ["a", "b"]
    with pytest.raises(Exception, match="exists"):
        repair_store(path, tmp_path / "new.sqlite")


def test_repair_finds_the_end_of_a_table_whose_last_page_and_index_are_damaged(tmp_path):
    path = build_store(tmp_path / "s.sqlite", n=600, in_set=300)
    with contextlib.closing(sqlite3.connect(path)) as db:
        try:
            pages = db.execute("SELECT name, pagetype, pageno FROM dbstat WHERE name IN "
                               "('vectors', 'sqlite_autoindex_vectors_1') ORDER BY path").fetchall()
        except sqlite3.OperationalError:
            pytest.skip("this SQLite has no dbstat table to find the pages")
    last_leaf = [page for name, kind, page in pages if name == "vectors" and kind == "leaf"][-1]
    index_root = [page for name, kind, page in pages if name != "vectors"][0]
    damage_pages(path, [last_leaf, index_root])
    report = repair_store(path, tmp_path / "new.sqlite")
    assert any("last row cannot be found" in problem for problem in report.problems)
    assert 570 < report.vectors < 600 and verify_store(tmp_path / "new.sqlite").ok


def test_a_store_whose_digests_an_older_decoder_remembered_forgets_them(tmp_path):
    path = tmp_path / "s.sqlite"
    with EmbeddingStore(path) as store:
        store.append_batch("x", 0, [], [], file_digests=[("/a.png", 1, 2, b"d" * 32)])
        store._db.execute("PRAGMA user_version = 1")
    with EmbeddingStore(path) as store:
        assert store.known_file_digests([("/a.png", 1, 2)]) == {}
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        store.append_batch("x", 0, [], [], file_digests=[("/a.png", 1, 2, b"d" * 32)])
    with EmbeddingStore(path) as store:  # the current version's digests stay
        assert store.known_file_digests([("/a.png", 1, 2)]) == {"/a.png": b"d" * 32}


# --- gc --------------------------------------------------------------------------------------------------------

def test_gc_is_a_dry_run_unless_told_yes(tmp_path, capsys):
    path = build_store(tmp_path / "s.sqlite", n=30, in_set=10)
    code, output = run_cli(capsys, "store", "gc", "--store", str(path))
    assert code == 0 and "would delete 20 vectors" in output and "that no feature set refers to" in output
    assert "of width 64" in output and "--yes" in output
    with EmbeddingStore(path) as store:
        assert store.vector_count() == 30
    code, output = run_cli(capsys, "store", "gc", "--store", str(path), "--yes")
    assert code == 0 and "deleted 20 vectors" in output
    with EmbeddingStore(path) as store:
        assert store.vector_count() == 10 and store.verify().ok


# --- reliability: random damage, a real full disk -----------------------------------------------------------------

@pytest.mark.parametrize("trials", reliability_sizes(3, 40))
def test_stores_damaged_at_random_pages(trials, tmp_path, capsys, figures):
    """Each trial damages 1-3 random pages (the header page too) of a fresh store: open refuses it, verify
    exits 1 without a traceback, and repair writes a store that verifies."""
    rng = np.random.default_rng(7)
    for trial in range(trials):
        path = build_store(tmp_path / f"s{trial}.sqlite", n=600, in_set=300)
        pages = rng.choice(np.arange(1, page_count(path) + 1), size=rng.integers(1, 4), replace=False)
        damage_pages(path, pages.tolist(), seed=trial)
        try:
            open_checked_store(path).close()
        except StoreError as refused:  # whichever way the damage shows: one line
            assert "\n" not in str(refused)
            figures.add(damaged_store_open_refused=1)
        code, output = run_cli(capsys, "store", "verify", "--store", str(path))
        assert "Traceback" not in output
        figures.add(damaged_stores=1, damaged_store_verify_exit_1=int(code == 1),
                    store_verify_failures=int(code != 1))
        assert code == 1, output
        try:
            report = repair_store(path, tmp_path / f"r{trial}.sqlite")
        except StoreError:  # no schema left to salvage from: said in one line
            figures.add(damaged_store_unrepairable=1)
            continue
        assert verify_store(tmp_path / f"r{trial}.sqlite").ok
        figures.add(damaged_store_vectors_salvaged=report.vectors)
    figures.add(damaged_store_vectors_written=trials * 600, damaged_store_tracebacks=0)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs: a disk that really fills (needs root and mount; skipped where there is neither)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.reliability
def test_a_store_on_a_disk_that_fills_up(small_tmpfs, figures):
    """Embed until the 1 MiB disk is full: every failed write is a StoreFullError, the vectors still come back,
    nothing stored is lost, and once room is made writes succeed again; a read-only remount is named too."""
    path = small_tmpfs / "s.sqlite"
    refused, returned, internal = 0, 0, 0
    with EmbeddingStore(path) as store:
        stored = 0
        for batch in range(200):
            rng = np.random.default_rng(batch)
            try:
                resolved = embedder(store).embed([rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(20)])
            except Exception:
                internal += 1
                raise
            returned += len(resolved.vectors)
            if resolved.store_error is None:
                stored += len(resolved.new_keys)
            else:
                assert isinstance(resolved.store_error, StoreFullError), resolved.store_error
                refused += 1
                if refused >= 10:
                    break
        assert refused and store.vector_count() == stored and store.verify().ok
        (small_tmpfs / "s.sqlite-wal").stat()  # still there: SQLite keeps its log
        subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
        assert embedder(store).embed(images(5, 900)).store_error is None
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    with pytest.raises(StoreIOError) as caught:
        with EmbeddingStore(path) as store:
            store.put_many(keys(1, 9000), vectors(1, 9000))
    assert caught.value.cause == "read-only" and "mounted read-only" in str(caught.value)
    figures.add(disk_full_writes_refused=refused, disk_full_vectors_returned=returned, disk_full_vectors_stored=stored,
                internal_errors=internal)
    figures.set(disk_full_read_only_cause=caught.value.cause)
