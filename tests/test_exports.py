"""Exports join back to their files: `source`, `label_name` and the feature set's metadata, read with pandas;
a store written before sources were kept stays readable and is brought up to date when opened for writing."""

import json
import sqlite3

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from extractor.datasets import open_dataset
from extractor.embedder import Embedder
from extractor.exports import export_feature_set
from extractor.jobs import run_embed_job
from extractor.store import SCHEMA_VERSION, EmbeddingStore


class MeanColour:
    """A stand-in backbone: an image's mean colour, so that the test is about the export, not TensorFlow."""

    def embed(self, images):
        return np.stack([image.reshape(-1, image.shape[-1]).mean(axis=0) for image in images]).astype(np.float32)


@pytest.fixture
def folder_feature_set(tmp_path, spec):
    """A folder of 2 classes x 4 PNGs (one unreadable) embedded into feature set `photos`; the folder's files."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    files = {}
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            colour = rng.integers(0, 256, 3, dtype=np.uint8)
            Image.fromarray(np.tile(colour, (8, 8, 1))).save(root / name / f"{i}.png")
            files[f"{name}/{i}.png"] = colour
    (root / "dog" / "3.png").write_bytes(b"not a png")
    del files["dog/3.png"]
    store = EmbeddingStore(tmp_path / "store.sqlite")
    run_embed_job(open_dataset(f"folder:{root}"), Embedder(WithWidth(spec, 3), store, MeanColour()), "photos",
                  batch_size=3)
    yield store, root, files
    store.close()


class WithWidth:
    """`spec` as the stand-in backbone sees it: the same description, vectors of `width`."""

    def __init__(self, spec, width):
        self._spec, self.output_dim = spec, width

    def __getattr__(self, name):
        return getattr(self._spec, name)


def files_frame(files: dict) -> pd.DataFrame:
    """What a user holds beside the vectors: their own table of files, keyed by the path under the root."""
    return pd.DataFrame({"source": list(files), "red": [int(c[0]) for c in files.values()]})


def test_parquet_export_joins_back_to_the_files_with_pandas(folder_feature_set, tmp_path, spec):
    store, root, files = folder_feature_set
    (path,) = export_feature_set(store, "photos", tmp_path / "photos.parquet", "parquet")
    vectors = pd.read_parquet(path)
    assert list(vectors.columns) == ["key", "source", "label", "label_name", "vector"]
    joined = vectors.merge(files_frame(files), on="source", validate="one_to_one")
    assert len(joined) == len(files) == 7
    assert (joined["label_name"] == joined["source"].str.split("/").str[0]).all()
    assert [vector[0] for vector in joined["vector"]] == joined["red"].tolist()  # each vector is its file's
    metadata = {k.decode(): v.decode() for k, v in pq.read_schema(path).metadata.items()}
    assert metadata["fingerprint"] == spec.fingerprint and metadata["source_root"] == str(root.resolve())
    described = spec.describe()
    assert json.loads(metadata["preprocessing"]) == {key: described[key] for key in
                                                     ("input_size", "channels", "preprocessing", "pooling", "cut")}
    assert json.loads(metadata["class_names"]) == ["cat", "dog"] and metadata["external"] == "false"


def test_npy_export_writes_the_same_beside_the_arrays(folder_feature_set, tmp_path, spec):
    store, root, files = folder_feature_set
    export_feature_set(store, "photos", tmp_path / "npy", "npy")
    rows = pd.read_csv(tmp_path / "npy" / "rows.csv")
    X = np.load(tmp_path / "npy" / "X.npy")
    assert list(rows.columns) == ["row", "source", "label", "label_name", "key"] and len(rows) == len(X)
    joined = rows.merge(files_frame(files), on="source", validate="one_to_one")
    assert X[joined["row"], 0].tolist() == joined["red"].tolist()
    assert (np.load(tmp_path / "npy" / "y.npy")[joined["row"]] == joined["label"]).all()
    metadata = json.loads((tmp_path / "npy" / "metadata.json").read_text())
    assert metadata["fingerprint"] == spec.fingerprint and metadata["source_root"] == str(root.resolve())


def test_npz_items_are_known_by_their_index(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 0, 1, 1]))
    dataset = open_dataset(f"npz:{tmp_path / 'd.npz'}?per_class=2&seed=0")
    assert dataset.root == str((tmp_path / "d.npz").resolve())
    assert [int(dataset.source(i)) for i in range(len(dataset))] == sorted(int(s) for s in dataset.relative_sources)
    for i in range(len(dataset)):
        assert np.array_equal(dataset.load(i), x[int(dataset.source(i))])


SCHEMA_1 = """
PRAGMA application_id = 1178948436;
PRAGMA user_version = 1;
CREATE TABLE vectors (key BLOB PRIMARY KEY, dim INTEGER NOT NULL, vector BLOB NOT NULL, checksum INTEGER NOT NULL);
CREATE TABLE feature_sets (name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, backbone TEXT NOT NULL,
    data_spec TEXT NOT NULL, class_names TEXT NOT NULL, count INTEGER NOT NULL DEFAULT 0,
    complete INTEGER NOT NULL DEFAULT 0, skipped TEXT NOT NULL DEFAULT '[]', created REAL NOT NULL,
    updated REAL NOT NULL);
CREATE TABLE feature_set_items (set_name TEXT NOT NULL, position INTEGER NOT NULL, key BLOB NOT NULL,
    label INTEGER NOT NULL, PRIMARY KEY (set_name, position)) WITHOUT ROWID;
CREATE TABLE file_digests (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    digest BLOB NOT NULL) WITHOUT ROWID;
"""


def test_a_store_of_schema_1_reads_and_is_migrated_when_opened_for_writing(tmp_path):
    from extractor.store import vector_checksum

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_1)
    vector = np.arange(4, dtype=np.float32).tobytes()
    db.execute("INSERT INTO vectors VALUES (?, 4, ?, ?)", (b"k" * 32, vector, vector_checksum(b"k" * 32, vector)))
    db.execute("INSERT INTO feature_sets VALUES ('old', 'f', '{}', 'npz:x', '[\"a\"]', 1, 1, '[]', 0, 0)")
    db.execute("INSERT INTO feature_set_items VALUES ('old', 0, ?, 0)", (b"k" * 32,))
    db.commit()
    db.close()
    with EmbeddingStore(path, readonly=True) as store:  # read as it is: nothing written
        X, y, names = store.load_feature_set("old")
        assert X.tolist() == [[0, 1, 2, 3]] and names == ["a"]
        assert store.feature_set_sources("old") == [None] and not store.feature_set("old").external
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 1
    with EmbeddingStore(path) as store:
        assert store.load_feature_set("old")[0].tolist() == [[0, 1, 2, 3]]
        store.begin_feature_set("new", fingerprint="f", backbone={}, data_spec="d", class_names=["a"],
                                source_root="/data")
        store.append_batch("new", 0, [b"k" * 32], [0], sources=["a/1.png"])
        store.finish_feature_set("new", 1)
        assert store.feature_set_sources("new") == ["a/1.png"] and store.feature_set("new").source_root == "/data"
        export_feature_set(store, "old", tmp_path / "old.parquet", "parquet")  # a source it never had is empty
        assert store.verify().ok
    assert pd.read_parquet(tmp_path / "old.parquet")["source"].isna().all()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
