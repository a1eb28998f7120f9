"""Parquet shards and their manifest: `store import`, its checks, resuming; the Ray options without Ray."""

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from extractor import cli, paths
from extractor.errors import ChecksumError, InvalidInputError, StoreError
from extractor.shards import (MANIFEST_NAME, Manifest, ShardRecord, feature_table, import_shards, resume_manifest,
                              shard_file_name, write_feature_table)
from extractor.exports import export_feature_set
from extractor.store import EmbeddingStore

FINGERPRINT = "f" * 64
BACKBONE = {"name": "toy", "output_dim": 8}


def toy_rows(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    keys = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)) for _ in range(n)]
    return keys, rng.integers(0, 3, n).astype(np.int64), rng.standard_normal((n, 8)).astype(np.float32)


def toy_shards(directory, items: int = 25, shard_size: int = 10) -> Manifest:
    """A finished job's folder written by hand: shards of toy vectors and their manifest."""
    manifest = Manifest("toy", "npz:/toy.npz", FINGERPRINT, BACKBONE, ["a", "b", "c"], items, shard_size)
    for start, stop in manifest.ranges():
        keys, labels, vectors = toy_rows(stop - start, seed=start)
        name = shard_file_name(start, shard_size)
        sha256 = write_feature_table(feature_table(keys, labels, vectors, manifest.metadata), directory / name)
        manifest.add(ShardRecord(name, start, stop, stop - start, sha256, [{"source": f"x{start}", "reason": "bad"}]))
    manifest.save(directory / MANIFEST_NAME)
    return manifest


def test_import_of_a_shards_folder_keeps_order_labels_and_skipped(tmp_path):
    toy_shards(tmp_path)
    with EmbeddingStore(tmp_path / "store.sqlite") as store:
        summary = import_shards(store, [tmp_path])
        X, y, class_names = store.load_feature_set("toy")
        info = store.feature_set("toy")
        again = import_shards(store, [tmp_path / MANIFEST_NAME], "toy-again")
    expected = [toy_rows(n, seed=start) for start, n in ((0, 10), (10, 10), (20, 5))]
    np.testing.assert_array_equal(X, np.concatenate([v for _, _, v in expected]))
    np.testing.assert_array_equal(y, np.concatenate([labels for _, labels, _ in expected]))
    assert class_names == ["a", "b", "c"] and info.fingerprint == FINGERPRINT and info.backbone == BACKBONE
    assert [s["source"] for s in info.skipped] == ["x0", "x10", "x20"]
    assert (summary.rows, summary.new_vectors) == (25, 25)
    assert (again.rows, again.new_vectors) == (25, 0)  # the same vectors are not written twice


def test_import_refuses_a_changed_shard_and_an_unfinished_job(tmp_path):
    manifest = toy_shards(tmp_path)
    shard = tmp_path / manifest.shards[1].file
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with EmbeddingStore(tmp_path / "store.sqlite") as store:
        with pytest.raises(ChecksumError, match="sha256"):
            import_shards(store, [tmp_path])
        manifest.shards.pop()
        manifest.save(tmp_path / MANIFEST_NAME)
        with pytest.raises(StoreError, match="2 of 3 shards"):
            import_shards(store, [tmp_path])


def test_export_then_import_through_the_command_line(tmp_path, capsys):
    keys, labels, vectors = toy_rows(30)
    with EmbeddingStore(tmp_path / "a.sqlite") as store:
        store.begin_feature_set("toy", fingerprint=FINGERPRINT, backbone=BACKBONE, data_spec="npz:/toy.npz",
                                class_names=["a", "b", "c"])
        store.append_batch("toy", 0, keys, labels, keys, vectors)
        store.finish_feature_set("toy", 30)
        export_feature_set(store, "toy", tmp_path / "toy.parquet", "parquet")
    assert cli.main(["store", "import", "--store", str(tmp_path / "b.sqlite"), "--feature-set", "copy",
                     str(tmp_path / "toy.parquet")]) == 0
    assert "30 new" in capsys.readouterr().out
    with EmbeddingStore(tmp_path / "b.sqlite") as store:
        X, y, _ = store.load_feature_set("copy")
        assert store.feature_set_keys("copy")[0] == keys and store.feature_set("copy").backbone == BACKBONE
    np.testing.assert_array_equal(X, vectors)
    np.testing.assert_array_equal(y, labels)


def test_resume_keeps_intact_shards_and_refuses_another_jobs_folder(tmp_path):
    finished = toy_shards(tmp_path)
    (tmp_path / finished.shards[0].file).unlink()
    planned = Manifest("toy", "npz:/toy.npz", FINGERPRINT, BACKBONE, ["a", "b", "c"], 25, 10)
    resumed = resume_manifest(tmp_path, planned)
    assert [(s.start, s.stop) for s in resumed.shards] == [(10, 20), (20, 25)] and not resumed.complete
    other = Manifest("other", "npz:/toy.npz", FINGERPRINT, BACKBONE, ["a", "b", "c"], 25, 10)
    with pytest.raises(InvalidInputError, match="another --shards-dir"):
        resume_manifest(tmp_path, other)


def test_ray_engine_without_ray_says_how_to_install_it(monkeypatch, tmp_path, caplog):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` fail as if it were not installed
    with caplog.at_level(logging.ERROR):
        code = cli.main(["embed", "--engine", "ray", "--backbone", "vgg16", "--data", "mnist:small",
                         "--feature-set", "x", "--store", str(tmp_path / "s.sqlite")])
    assert code == 2 and "pip install 'frozen-features[ray]'" in caplog.text


def test_ray_options_without_the_ray_engine_are_refused(tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        code = cli.main(["embed", "--address", "auto", "--backbone", "vgg16", "--data", "mnist:small",
                         "--feature-set", "x", "--store", str(tmp_path / "s.sqlite")])
    assert code == 2 and "--address only apply with --engine ray" in caplog.text


def test_the_local_engine_and_store_commands_never_import_ray():
    code = ("import sys; from extractor import cli, shards; cli.build_parser().parse_args("
            "['embed', '--backbone', 'vgg16', '--data', 'mnist:small', '--feature-set', 'x']); "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=paths.PROJECT_ROOT)


def test_manifest_lists_what_a_user_needs(tmp_path):
    toy_shards(tmp_path)
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert data["complete"] and data["rows"] == 25 and len(data["skipped"]) == 3
    assert {"feature_set", "data_spec", "fingerprint", "backbone", "class_names", "shards"} <= set(data)
    assert all({"file", "rows", "sha256"} <= set(shard) for shard in data["shards"])
