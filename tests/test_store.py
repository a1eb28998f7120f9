"""The embedding store: round trips, integrity checks, refusing foreign files, export."""

import sqlite3

import numpy as np
import pytest

from extractor.errors import StoreError, UnknownNameError
from extractor.exports import export_feature_set
from extractor.store import EmbeddingStore


def keys(n, offset=0):
    return [bytes([i + offset]) * 32 for i in range(n)]


def fill(store, name="s", n=5, dim=4, offset=0):
    vectors = np.random.default_rng(offset).normal(size=(n, dim)).astype(np.float32)
    store.begin_feature_set(name, fingerprint="f" * 64, backbone={"name": "b"}, data_spec="npz:x",
                            class_names=["a", "b"])
    store.append_batch(name, 0, keys(n, offset), np.arange(n) % 2, keys(n, offset), vectors)
    store.finish_feature_set(name, n)
    return vectors


def test_round_trip(tmp_path):
    with EmbeddingStore(tmp_path / "s.sqlite") as store:
        vectors = fill(store)
        X, y, names = store.load_feature_set("s")
        assert np.array_equal(X, vectors) and y.tolist() == [0, 1, 0, 1, 0] and names == ["a", "b"]
        got = store.get_many(keys(5) + [b"z" * 32])
        assert len(got) == 5 and np.array_equal(got[keys(5)[2]], vectors[2])
        assert store.has(keys(1)[0]) and not store.has(b"z" * 32)
    with EmbeddingStore(tmp_path / "s.sqlite", readonly=True) as store:  # reopened: still there
        assert np.array_equal(store.load_feature_set("s")[0], vectors)
        assert store.verify().ok


def test_incomplete_feature_set_is_not_loaded(tmp_path):
    with EmbeddingStore(tmp_path / "s.sqlite") as store:
        store.begin_feature_set("s", fingerprint="f", backbone={}, data_spec="d", class_names=["a"])
        with pytest.raises(StoreError, match="incomplete"):
            store.load_feature_set("s")
        with pytest.raises(UnknownNameError, match="known: s"):
            store.load_feature_set("t")


def test_a_store_file_left_empty_by_a_killed_job_reads_as_an_empty_store(tmp_path):
    path = tmp_path / "s.sqlite"
    path.touch()  # what a job killed between creating the file and its first commit leaves
    with EmbeddingStore(path, readonly=True) as store:
        assert store.verify().ok and store.vector_count() == 0 and store.feature_sets() == []
        assert store.info()["vectors"] == 0
    assert path.stat().st_size == 0
    with EmbeddingStore(path) as store:
        fill(store)
        assert store.verify().ok


def test_corruption_is_detected_and_not_served(tmp_path):
    path = tmp_path / "s.sqlite"
    with EmbeddingStore(path) as store:
        fill(store)
    db = sqlite3.connect(path)
    db.execute("UPDATE vectors SET vector = zeroblob(16) WHERE key = ?", (keys(5)[3],))
    db.commit()
    db.close()
    with EmbeddingStore(path) as store:
        report = store.verify()
        assert not report.ok and report.corrupt_keys == [keys(5)[3]]
        assert keys(5)[3] not in store.get_many(keys(5))  # a corrupt row is a miss, recomputed later
        with pytest.raises(StoreError, match="corrupt"):
            store.load_feature_set("s")


def test_missing_vectors_fail_verify(tmp_path):
    with EmbeddingStore(tmp_path / "s.sqlite") as store:
        fill(store)
        with store.transaction() as db:
            db.execute("DELETE FROM vectors WHERE key = ?", (keys(5)[0],))
        assert any("missing vectors" in p for p in store.verify().problems)


@pytest.mark.parametrize("content", [b"hello, not a database\n" * 10, b"SQLite format 3\x00" + b"\x01" * 200])
def test_a_file_that_is_not_a_store_is_refused_and_untouched(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(StoreError, match="not"):
        EmbeddingStore(path)
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_another_applications_database_is_refused(tmp_path):
    path = tmp_path / "other.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE people (name TEXT)")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(StoreError, match="another application"):
        EmbeddingStore(path)
    assert path.read_bytes() == before


def test_gc_removes_only_unreferenced_vectors(tmp_path):
    with EmbeddingStore(tmp_path / "s.sqlite") as store:
        fill(store, "kept", n=3)
        store.put_many(keys(2, offset=100), np.ones((2, 4), np.float32))
        assert store.gc(dry_run=True).vectors == 2 and store.vector_count() == 5
        assert store.gc().vectors == 2 and store.vector_count() == 3
        assert store.load_feature_set("kept")[0].shape == (3, 4)


def test_export_npy_and_parquet(tmp_path):
    import pyarrow.parquet as pq

    with EmbeddingStore(tmp_path / "s.sqlite") as store:
        vectors = fill(store, n=6, dim=3)
        export_feature_set(store, "s", tmp_path / "npy", "npy")
        export_feature_set(store, "s", tmp_path / "s.parquet", "parquet")
    assert np.array_equal(np.load(tmp_path / "npy" / "X.npy"), vectors)
    assert np.load(tmp_path / "npy" / "y.npy").tolist() == [0, 1, 0, 1, 0, 1]
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.column_names == ["key", "source", "label", "label_name", "vector"]
    assert table.column("label_name").to_pylist() == ["a", "b"] * 3
    assert np.array_equal(np.array(table.column("vector").to_pylist(), np.float32), vectors)
    assert table.column("key").to_pylist() == keys(6)
    assert b"class_names" in table.schema.metadata


def test_non_finite_vectors_are_refused(tmp_path):
    with EmbeddingStore(tmp_path / "s.sqlite") as store, pytest.raises(ValueError, match="NaN"):
        store.put_many(keys(1), np.array([[np.nan, 1.0]], np.float32))


def test_an_unknown_feature_set_among_many_names_the_closest(tmp_path):
    with EmbeddingStore(tmp_path / "store.sqlite") as store:
        for seed in range(30):
            store.begin_feature_set(f"vgg16/cifar10:small?seed={seed}", fingerprint="f", backbone={},
                                    data_spec="d", class_names=["a"])
        with pytest.raises(UnknownNameError) as caught:
            store.load_feature_set("vgg16/cifar10:small?seed=7x")
    message = str(caught.value)
    assert "closest of the 30 known: vgg16/cifar10:small?seed=7," in message
    assert message.count("vgg16/") == 1 + UnknownNameError.SHOWN  # the name asked for, then the closest
