"""The Ray engine ends with the local engine's feature set; its shards import anywhere; reruns resume."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("ray", reason="Ray is not installed (the optional extra: pip install '.[ray]' or make setup-ray)")

from PIL import Image  # noqa: E402

from extractor import cli, paths  # noqa: E402
from extractor.datasets import open_dataset  # noqa: E402
from extractor.embedder import Embedder  # noqa: E402
from extractor.jobs import run_embed_job  # noqa: E402
from extractor.ray_engine.mapper import ShardEmbedder  # noqa: E402
from extractor.ray_engine.runner import RayOptions, ray_session, run_ray_embed_job  # noqa: E402
from extractor.shards import MANIFEST_NAME, Manifest  # noqa: E402
from extractor.exports import export_feature_set  # noqa: E402
from extractor.store import EmbeddingStore  # noqa: E402

SHARD_SIZE = 64
CORRUPT = "b/050-corrupt.png"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Three classes of 70 PNGs of assorted sizes, and one file that is not an image."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (root / name).mkdir()
        for i in range(70):
            side = int(rng.integers(24, 48))
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / name / f"{i:03d}.png")
    (root / CORRUPT).write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, image_folder, spec):
    path = tmp_path_factory.mktemp("local") / "store.sqlite"
    with EmbeddingStore(path) as store:
        run_embed_job(open_dataset(f"folder:{image_folder}"), Embedder(spec, store), "images", batch_size=100)
    return path


@pytest.fixture(scope="module")
def ray_local():
    """One in-process Ray with two workers for the module, started the way the engine starts it."""
    with ray_session(RayOptions(num_workers=2)):
        yield


@pytest.fixture(scope="module")
def ray_job(tmp_path_factory, image_folder, ray_local):
    """The command line's `embed --engine ray`: (store path, shards folder, printed summary)."""
    work = tmp_path_factory.mktemp("ray")
    args = ["embed", "--engine", "ray", "--num-workers", "2", "--shard-size", str(SHARD_SIZE),
            "--backbone", "vgg16", "--data", f"folder:{image_folder}", "--feature-set", "images",
            "--store", str(work / "store.sqlite"), "--shards-dir", str(work / "shards"), "--json", "--no-progress"]
    return work / "store.sqlite", work / "shards", args


def feature_set(path, name="images"):
    with EmbeddingStore(path, readonly=True) as store:
        X, y, class_names = store.load_feature_set(name)
        keys, _ = store.feature_set_keys(name)
        return X, y, keys, class_names, store.feature_set(name)


def assert_same_feature_set(actual_path, expected_path):
    X, y, keys, class_names, info = feature_set(actual_path)
    X0, y0, keys0, class_names0, info0 = feature_set(expected_path)
    assert keys == keys0  # same images, same order
    np.testing.assert_array_equal(y, y0)
    # The same backbone over the same pixels; only the batch sizes differ, so allow float round-off.
    np.testing.assert_allclose(X, X0, rtol=1e-5, atol=1e-6)
    assert class_names == class_names0
    assert (info.fingerprint, info.data_spec, info.backbone, info.count) == \
           (info0.fingerprint, info0.data_spec, info0.backbone, info0.count)
    assert [s["source"] for s in info.skipped] == [s["source"] for s in info0.skipped]
    with EmbeddingStore(actual_path, readonly=True) as actual, EmbeddingStore(expected_path, readonly=True) as expected:
        assert actual.feature_set_sources("images") == expected.feature_set_sources("images")  # exports join alike
        assert actual.feature_set("images").source_root == expected.feature_set("images").source_root


def test_ray_job_ends_with_the_local_jobs_feature_set(ray_job, local_store, image_folder, capsys, tmp_path):
    store_path, shards_dir, args = ray_job
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["images"], summary["computed"], summary["reused"]) == (210, 210, 0)
    assert [s["source"] for s in summary["skipped"]] == [str(image_folder / CORRUPT)]
    assert_same_feature_set(store_path, local_store)

    manifest = Manifest.load(shards_dir / MANIFEST_NAME)
    assert manifest.complete and len(manifest.shards) == 4 and manifest.rows == 210
    assert all(paths.file_sha256(shards_dir / s.file) == s.sha256 for s in manifest.shards)
    with EmbeddingStore(local_store, readonly=True) as store:
        export_feature_set(store, "images", tmp_path / "export.parquet", "parquet")
    shard_schema = pq.read_schema(shards_dir / manifest.shards[0].file)
    assert shard_schema.remove_metadata() == pq.read_schema(tmp_path / "export.parquet").remove_metadata()


def test_imported_shards_are_cache_entries_for_the_local_engine(ray_job, local_store, image_folder, spec, tmp_path):
    _, shards_dir, _ = ray_job
    fresh = tmp_path / "fresh.sqlite"
    assert cli.main(["store", "import", "--store", str(fresh), str(shards_dir / MANIFEST_NAME)]) == 0
    assert_same_feature_set(fresh, local_store)
    with EmbeddingStore(fresh) as store:
        summary = run_embed_job(open_dataset(f"folder:{image_folder}"), Embedder(spec, store), "again")
    assert (summary.computed, summary.reused) == (0, 210)


def test_rerun_skips_finished_shards_and_a_killed_actor_is_replaced(ray_job, local_store, image_folder, spec,
                                                                      capsys, tmp_path):
    store_path, shards_dir, args = ray_job
    manifest = Manifest.load(shards_dir / MANIFEST_NAME)
    written = {s.file: os.stat(shards_dir / s.file).st_mtime_ns for s in manifest.shards}
    assert cli.main(args) == 0
    assert (json.loads(capsys.readouterr().out)["computed"]) == 0  # every shard finished: nothing to run

    lost = manifest.shards[2]
    (shards_dir / lost.file).unlink()
    marker = tmp_path / "crashed"

    class KilledOnceEmbedder(ShardEmbedder):
        """Kills its own actor process on the first shard, as an out-of-memory kill or a lost node would."""

        def __call__(self, shards):
            try:
                marker.open("x").close()
            except FileExistsError:
                return super().__call__(shards)
            os._exit(1)

    with EmbeddingStore(store_path) as store:
        summary = run_ray_embed_job(open_dataset(f"folder:{image_folder}"), spec, store, "images", shards_dir,
                                    RayOptions(num_workers=1, shard_size=SHARD_SIZE), mapper=KilledOnceEmbedder)
    assert marker.exists()
    assert (summary.computed, summary.reused, summary.images) == (lost.rows, 210 - lost.rows, 210)
    assert {f: os.stat(shards_dir / f).st_mtime_ns for f in written if f != lost.file} == \
           {f: t for f, t in written.items() if f != lost.file}
    assert_same_feature_set(store_path, local_store)
