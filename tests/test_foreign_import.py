"""Vectors made by other tools come in as external feature sets that heads, `compare` and exports use."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from classifiers import cli as classifiers_cli
from extractor import api
from extractor import cli as extractor_cli
from extractor.store import EmbeddingStore

CLASSES = ["bird", "cat", "dog"]


def clustered(n: int, seed: int, dim: int = 6):
    """n vectors around three class centres (the same centres for every seed), their class names and file names."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(3, dim)) * 4
    labels = np.arange(n) % 3
    return centres[labels] + rng.normal(size=(n, dim)), [CLASSES[i] for i in labels], [f"img/{seed}-{i}.jpg"
                                                                                      for i in range(n)]


def write_parquet(path, n, seed):
    """A file as another tool writes it: a list<double> vector column, class names, paths, an extra column."""
    vectors, labels, files = clustered(n, seed)
    pq.write_table(pa.table({"path": files, "embedding": pa.array(vectors.tolist(), pa.list_(pa.float64())),
                             "label": labels, "score": np.ones(n)}), path)
    return vectors, labels, files


def test_parquet_from_another_tool_imports_trains_and_compares(tmp_path, caplog):
    store = str(tmp_path / "s.sqlite")
    vectors, labels, files = write_parquet(tmp_path / "train.parquet", 30, seed=0)
    write_parquet(tmp_path / "test.parquet", 30, seed=1)
    for split in ("train", "test"):
        assert extractor_cli.main(["store", "import", "--store", store, "--parquet", str(tmp_path / f"{split}.parquet"),
                                   "--vector-column", "embedding", "--label-column", "label", "--source-column",
                                   "path", "--as", f"clip-{split}"]) == 0
    X, y, class_names = api.load_feature_set("clip-train", store=store)
    np.testing.assert_array_equal(X, vectors.astype(np.float32))
    assert class_names == CLASSES and [class_names[i] for i in y] == labels
    assert api.feature_set_sources("clip-train", store=store) == files
    info = api.describe_feature_set("clip-train", store=store)
    assert info.external and info.fingerprint == "" and info.backbone["name"] == "external"
    runs = str(tmp_path / "runs")
    assert classifiers_cli.main(["--store", store, "--runs-dir", runs, "compare", "--train-set", "clip-train",
                                 "--test-set", "clip-test", "--heads", "linear,logreg", "--trials", "2",
                                 "--epochs", "30"]) == 0
    report = json.loads((tmp_path / "runs" / "latest-compare" / "report.json").read_text())
    assert min(report["experiments"]["compare"]["methods"]["logreg"]["accuracies"]) > 0.9
    assert classifiers_cli.main(["--store", store, "train", "--train-set", "clip-train", "--head", "logreg",
                                 "--out", str(tmp_path / "heads" / "clip")]) == 0
    sidecar = json.loads((tmp_path / "heads" / "clip.skops.json").read_text())
    assert sidecar["class_names"] == CLASSES and sidecar["backbone_fingerprint"] == ""
    api.export_feature_set("clip-train", tmp_path / "again.parquet", store=store)
    assert pq.read_table(tmp_path / "again.parquet").column("source").to_pylist() == files


def test_npy_with_labels_imports_and_a_rerun_stores_no_vector_twice(tmp_path, capsys):
    vectors, labels, _ = clustered(12, seed=2)
    np.save(tmp_path / "X.npy", vectors.astype(np.float32))
    np.save(tmp_path / "y.npy", np.arange(12) % 3)
    args = ["store", "import", "--store", str(tmp_path / "s.sqlite"), "--npy", str(tmp_path / "X.npy"), "--labels",
            str(tmp_path / "y.npy"), "--as", "colleague"]
    assert extractor_cli.main(args) == 0 and "12 new" in capsys.readouterr().out
    assert extractor_cli.main(args) == 0 and "0 new" in capsys.readouterr().out
    X, y, class_names = api.load_feature_set("colleague", store=tmp_path / "s.sqlite")
    np.testing.assert_array_equal(X, vectors.astype(np.float32))
    assert y.tolist() == (np.arange(12) % 3).tolist() and class_names == ["0", "1", "2"]
    with EmbeddingStore(tmp_path / "s.sqlite", readonly=True) as store:
        assert store.vector_count() == 12 and store.verify().ok


def test_an_external_set_is_not_compared_with_an_embedded_one(tmp_path, caplog):
    store = tmp_path / "s.sqlite"
    api.import_vectors(np.ones((3, 4)), "external", labels=[0, 1, 2], store=store)
    with EmbeddingStore(store) as opened:
        opened.begin_feature_set("embedded", fingerprint="f" * 64, backbone={"name": "vgg16"}, data_spec="d",
                                 class_names=["0", "1", "2"])
        opened.append_batch("embedded", 0, [b"k" * 32], [0], [b"k" * 32], np.ones((1, 4), np.float32))
        opened.finish_feature_set("embedded", 1)
    assert classifiers_cli.main(["--store", str(store), "compare", "--train-set", "external", "--test-set",
                                 "embedded", "--heads", "logreg"]) == 2
    assert "different backbones (external vs ffffffffffff)" in caplog.text


@pytest.mark.parametrize("args, words", [
    (["--parquet", "{dir}/train.parquet", "--vector-column", "vec", "--as", "x"],
     "has no column 'vec'; its columns: path, embedding, label, score"),
    (["--parquet", "{dir}/train.parquet", "--vector-column", "label", "--as", "x"], "must hold a list of numbers"),
    (["--parquet", "{dir}/train.parquet", "--vector-column", "embedding"], "need a feature set name: --as NAME"),
    (["--parquet", "{dir}/train.parquet", "--as", "x"], "--parquet needs --vector-column"),
    (["--npy", "{dir}/X.npy", "--vector-column", "v", "--as", "x"], "--vector-column only apply with --parquet"),
    (["--npy", "{dir}/missing.npy", "--as", "x"], "file not found"),
    (["--npy", "{dir}/X.npy", "--parquet", "{dir}/train.parquet", "--as", "x"], "give one of"),
    (["--npy", "{dir}/ragged.npy", "--as", "x"], "numeric (n, d) array"),
])
def test_bad_imports_are_one_line_errors(tmp_path, caplog, args, words):
    write_parquet(tmp_path / "train.parquet", 6, seed=0)
    np.save(tmp_path / "X.npy", np.ones((3, 2)))
    np.save(tmp_path / "ragged.npy", np.ones(3))
    args = [arg.format(dir=tmp_path) for arg in args]
    assert extractor_cli.main(["store", "import", "--store", str(tmp_path / "s.sqlite"), *args]) == 2
    assert words in caplog.text and "Traceback" not in caplog.text
