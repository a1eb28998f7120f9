"""Batch embedding jobs: get-or-compute, resumable after kill -9, concurrent writers, no stale vectors."""

import contextlib
import dataclasses
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

from conftest import make_npz, reliability_sizes
from extractor.datasets import open_dataset
from extractor.embedder import Embedder, content_key
from extractor.models import get_backbone_spec, load_backbone
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
                get_backbone_spec("vgg16", pooling="avg"), dataclasses.replace(get_backbone_spec("vgg16"), sha256="1" * 64)]
    assert len({content_key(spec.fingerprint, image) for spec in variants}) == len(variants)
    assert content_key(vgg.fingerprint, image) != content_key(vgg.fingerprint, np.zeros((32, 32, 1), np.uint8))


def committed_vectors(path) -> dict[bytes, bytes]:
    """Every vector committed to the store at `path`, by key, read as another process would (none while the
    file is being created)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            return dict(db.execute("SELECT key, vector FROM vectors"))
    except sqlite3.DatabaseError:
        return {}


def kill_at_a_random_moment(job, store_path, rng) -> dict[bytes, bytes] | None:
    """SIGKILL `job` at a random moment: a random time after its start (while it imports, builds the
    backbone, creates the store), or a random time after it has committed 1-16 more vectors. Returns the
    vectors committed just before the kill, or None if the job finished first."""
    if rng.random() < 1 / 3:
        time.sleep(rng.uniform(0.1, 6.0))
    else:
        wanted, deadline = len(committed_vectors(store_path)) + rng.integers(1, 17), time.monotonic() + 120
        while len(committed_vectors(store_path)) < wanted and job.poll() is None:
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.25))
    before = committed_vectors(store_path)
    job.send_signal(signal.SIGKILL)
    return before if job.wait() == -signal.SIGKILL else None


@pytest.mark.parametrize("kills", reliability_sizes(3, 20))
def test_kill_9_at_random_moments_loses_nothing(kills, tmp_path, vgg, figures):
    """One store, a job killed -9 again and again: after each kill `store verify` is clean and every vector
    committed before it is still there, bit for bit; the rerun computes only what is missing, and the store
    ends equal to an uninterrupted run's, vector for vector."""
    spec_text = make_npz(tmp_path / "d.npz", 24 * kills + 48, seed=5)
    store_path = tmp_path / "killed.sqlite"
    job_args = ("--data", spec_text, "--feature-set", "d", "--store", str(store_path), "--batch-size", "8")
    rng = np.random.default_rng(kills)
    done = 0
    for _ in range(3 * kills):
        before = kill_at_a_random_moment(embed_cli(*job_args), store_path, rng)
        if before is None:
            continue
        done += 1
        figures.add(kills=1)
        verify = subprocess.run([sys.executable, "-m", "extractor", "store", "verify", "--store", str(store_path)],
                                capture_output=True, text=True)
        after = committed_vectors(store_path)
        lost = sum(after.get(key) != vector for key, vector in before.items())
        figures.add(vectors_lost=lost, store_verify_failures=int(store_path.exists() and verify.returncode != 0))
        assert not store_path.exists() or verify.returncode == 0, verify.stdout + verify.stderr
        assert lost == 0
        if done == kills:
            break
    assert done == kills, "the job finished before it could be killed often enough"

    committed = committed_vectors(store_path)
    rerun = embed_cli(*job_args, "--json")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    summary = json.loads(out)
    assert (summary["computed"], summary["reused"]) == (summary["images"] - len(committed), len(committed))

    with EmbeddingStore(tmp_path / "clean.sqlite") as clean:
        run_embed_job(open_dataset(spec_text), Embedder(vgg, clean), "d", batch_size=8)
        expected = clean.load_feature_set("d")
    with EmbeddingStore(store_path, readonly=True) as resumed:
        assert resumed.verify().ok
        actual = resumed.load_feature_set("d")
    assert committed_vectors(store_path) == committed_vectors(tmp_path / "clean.sqlite")
    assert np.array_equal(actual[0], expected[0]) and np.array_equal(actual[1], expected[1])


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


def test_unchanged_files_are_not_decoded_again(tmp_path, vgg, monkeypatch):
    import extractor.datasets as datasets

    rng = np.random.default_rng(3)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "a" / f"{i}.png")
    old = time.time() - 60  # settled files: their digests are remembered
    for path in (tmp_path / "imgs" / "a").iterdir():
        os.utime(path, (old, old))
    decoded = []
    real_read = datasets.read_image_file
    monkeypatch.setattr(datasets, "read_image_file", lambda path: decoded.append(path) or real_read(path))
    spec_text = f"folder:{tmp_path / 'imgs'}"
    with EmbeddingStore(tmp_path / "s.sqlite") as store:
        run_embed_job(open_dataset(spec_text), Embedder(vgg, store), "f")
        assert len(decoded) == 6
        first = store.load_feature_set("f")[0]

        decoded.clear()
        again = run_embed_job(open_dataset(spec_text), Embedder(vgg, store), "f")
        assert decoded == [] and again.reused == 6
        np.testing.assert_array_equal(store.load_feature_set("f")[0], first)

        changed = tmp_path / "imgs" / "a" / "2.png"
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(changed)
        os.utime(changed, (old + 5, old + 5))
        third = run_embed_job(open_dataset(spec_text), Embedder(vgg, store), "f")
        assert decoded == [str(changed)] and third.computed == 1
        np.testing.assert_array_equal(store.load_feature_set("f")[0][2], load_backbone(vgg).embed(
            [np.zeros((32, 32, 3), np.uint8)])[0])

        (tmp_path / "imgs" / "a" / "5.png").unlink()
        store.gc()
        assert len(store.known_file_digests([(p, 0, 0) for p in decoded])) == 0
        with store.transaction() as db:
            assert db.execute("SELECT COUNT(*) FROM file_digests").fetchone()[0] == 5
