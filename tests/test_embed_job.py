"""Batch embedding jobs: get-or-compute, resumable after kill -9, concurrent writers, no stale vectors."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import make_npz
from extractor.backbones import get_backbone_spec, load_backbone
from extractor.datasets import open_dataset
from extractor.embedder import Embedder, content_key
from extractor.jobs import run_embed_job
from extractor.store import EmbeddingStore


@pytest.fixture(scope="module")
def vgg():
    spec = get_backbone_spec("vgg16")
    load_backbone(spec)
    return spec


def embed_cli(*args, **popen):
    command = [sys.executable, "-m", "extractor", "embed", "--backbone", "vgg16", "--no-progress", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def test_each_distinct_image_is_computed_once(tmp_path, vgg):
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    other = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with EmbeddingStore(tmp_path / "s.sqlite") as store:
        embedder = Embedder(vgg, store)
        first = embedder.embed([image, other, image.copy()])
        assert len(first.new_keys) == 2 and not first.cached.any()
        assert np.array_equal(first.vectors[0], first.vectors[2])
        second = embedder.embed([other, image])
        assert second.cached.all() and not second.new_keys
        assert np.array_equal(second.vectors, first.vectors[[1, 0]])
        assert store.vector_count() == 2


def test_job_writes_a_feature_set_and_a_rerun_reuses_everything(tmp_path, vgg):
    spec_text = make_npz(tmp_path / "d.npz", 40)
    with EmbeddingStore(tmp_path / "s.sqlite") as store:
        cold = run_embed_job(open_dataset(spec_text), Embedder(vgg, store), "d", batch_size=16)
        warm = run_embed_job(open_dataset(spec_text), Embedder(vgg, store), "d", batch_size=7)
        X, y, names = store.load_feature_set("d")
    assert (cold.computed, cold.reused, warm.computed, warm.reused) == (40, 0, 0, 40)
    assert X.shape == (40, 512) and names == ["c0", "c1", "c2"]
    x = np.load(tmp_path / "d.npz")["x"]
    np.testing.assert_array_equal(X[:5], load_backbone(vgg).embed(list(x[:5])))
    assert np.array_equal(y, np.load(tmp_path / "d.npz")["y"])


def test_limit_takes_the_first_images(tmp_path, vgg):
    spec_text = make_npz(tmp_path / "d.npz", 30)
    with EmbeddingStore(tmp_path / "s.sqlite") as store:
        summary = run_embed_job(open_dataset(spec_text), Embedder(vgg, store), "first", limit=12)
        X, y, _ = store.load_feature_set("first")
    assert summary.images == 12 and len(X) == 12 and np.array_equal(y, np.load(tmp_path / "d.npz")["y"][:12])


def test_corrupt_and_truncated_images_are_skipped_and_listed(tmp_path, vgg):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / name / f"{i}.jpg")
    whole = (tmp_path / "imgs" / "a" / "0.jpg").read_bytes()
    (tmp_path / "imgs" / "a" / "1.jpg").write_bytes(whole[:200])
    (tmp_path / "imgs" / "b" / "2.jpg").write_bytes(os.urandom(300))
    with EmbeddingStore(tmp_path / "s.sqlite") as store:
        summary = run_embed_job(open_dataset(f"folder:{tmp_path / 'imgs'}"), Embedder(vgg, store), "f", batch_size=3)
        X, y, _ = store.load_feature_set("f")
        listed = store.feature_set("f").skipped
    assert summary.images == 6 and len(X) == 6 and y.tolist() == [0, 0, 0, 1, 1, 1]
    assert sorted(s["source"][-7:] for s in summary.skipped) == ["a/1.jpg", "b/2.jpg"] == sorted(
        s["source"][-7:] for s in listed)
    assert "skipped as unreadable 2" in "\n".join(summary.lines())


def test_changed_weights_recipe_size_or_cut_never_reuse_vectors(vgg):
    image = np.zeros((32, 32, 3), np.uint8)
    variants = [vgg, get_backbone_spec("vgg16", recipe="caffe"), get_backbone_spec("vgg16", input_size=64),
                get_backbone_spec("vgg16", pooling="avg"), get_backbone_spec("vgg16", weights_sha256="1" * 64)]
    assert len({content_key(spec.fingerprint, image) for spec in variants}) == len(variants)
    assert content_key(vgg.fingerprint, image) != content_key(vgg.fingerprint, np.zeros((32, 32, 1), np.uint8))


def vector_count(path):
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1) as db:
            return db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_kill_9_then_rerun_computes_only_the_missing_images(tmp_path, vgg):
    spec_text = make_npz(tmp_path / "d.npz", 300, seed=5)
    store_path = tmp_path / "killed.sqlite"
    job = embed_cli("--data", spec_text, "--feature-set", "d", "--store", str(store_path), "--batch-size", "8")
    deadline = time.time() + 120
    while vector_count(store_path) < 40 and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    committed = vector_count(store_path)
    assert 0 < committed < 300, "the job was not killed mid-way"

    verify = subprocess.run([sys.executable, "-m", "extractor", "store", "verify", "--store", str(store_path)],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    rerun = embed_cli("--data", spec_text, "--feature-set", "d", "--store", str(store_path), "--json")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    summary = json.loads(out)
    assert summary["computed"] == 300 - committed and summary["reused"] == committed

    with EmbeddingStore(tmp_path / "clean.sqlite") as clean:
        run_embed_job(open_dataset(spec_text), Embedder(vgg, clean), "d")
        expected = clean.load_feature_set("d")
    with EmbeddingStore(store_path, readonly=True) as resumed:
        actual = resumed.load_feature_set("d")
        assert resumed.verify().ok
    np.testing.assert_allclose(actual[0], expected[0], rtol=1e-5, atol=1e-5)
    assert np.array_equal(actual[1], expected[1])


def test_two_jobs_writing_one_store_at_once(tmp_path, vgg):
    first = make_npz(tmp_path / "a.npz", 120, seed=1)
    second = make_npz(tmp_path / "b.npz", 120, seed=1)  # the same images: both jobs race on the same keys
    store_path = tmp_path / "shared.sqlite"
    jobs = [embed_cli("--data", data, "--feature-set", name, "--store", str(store_path), "--batch-size", "16")
            for data, name in ((first, "a"), (second, "b"))]
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
    with EmbeddingStore(store_path, readonly=True) as store:
        assert store.verify().ok and store.vector_count() == 120
        np.testing.assert_array_equal(store.load_feature_set("a")[0], store.load_feature_set("b")[0])
