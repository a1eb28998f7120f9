"""What a server computes belongs to its backbone's served feature set: `store gc` keeps it, says why, and lets it go
once the set is dropped."""

import numpy as np
import pytest

from conftest import random_images, start_server
from extractor.cli import main
from extractor.errors import UnknownNameError
from extractor.serving.client import FeatureClient
from extractor.store import SERVED_PREFIX, EmbeddingStore, ServedSet
from test_service_core import FakeBackbone

SERVED = ServedSet.of("vgg16", "f" * 64, {"name": "vgg16", "output_dim": 4})


def keys(n: int, salt: bytes) -> list[bytes]:
    return [salt + bytes([i]) * 31 for i in range(n)]


def test_stored_vectors_join_the_served_set_in_the_same_transaction(tmp_path):
    with EmbeddingStore(tmp_path / "store.sqlite") as store:
        store.put_many(keys(3, b"a"), np.ones((3, 4), np.float32), served=SERVED)
        store.put_many(keys(2, b"b"), np.ones((2, 4), np.float32), served=SERVED)
        info = store.feature_set(SERVED.name)
        assert SERVED.name == f"{SERVED_PREFIX}vgg16:ffffffffffff"
        assert (info.count, info.complete, info.class_names, info.fingerprint) == (5, True, ["unlabelled"], "f" * 64)
        assert store.feature_set_keys(SERVED.name)[0] == keys(3, b"a") + keys(2, b"b")
        X, y, _ = store.load_feature_set(SERVED.name)
        assert X.shape == (5, 4) and not y.any()


def test_gc_keeps_served_vectors_says_why_and_deletes_them_once_the_set_is_dropped(tmp_path):
    with EmbeddingStore(tmp_path / "store.sqlite") as store:
        store.put_many(keys(3, b"a"), np.ones((3, 4), np.float32), served=SERVED)
        store.put_many(keys(2, b"z"), np.ones((2, 4), np.float32))  # computed by no one's set: gc's to delete
        report = store.gc(dry_run=True)
        assert (report.vectors, report.kept, report.kept_by_served) == (2, 3, {SERVED.name: 3})
        assert any(f"3 of them only because a server computed them: {SERVED.name} (3)" in line
                   and "store drop NAME" in line for line in report.lines())
        assert store.gc().vectors == 2
        assert len(store.get_many(keys(3, b"a"))) == 3
        assert store.drop_feature_set(SERVED.name) == 3
        with pytest.raises(UnknownNameError):
            store.drop_feature_set(SERVED.name)
        assert store.gc().vectors == 3 and store.vector_count() == 0


def test_vectors_computed_by_served_calls_survive_store_gc_yes(spec, tmp_path, capsys):
    path = tmp_path / "store.sqlite"
    server = start_server(spec, path, backbone_loader=lambda _: FakeBackbone(512), max_wait=0.0)
    try:
        with FeatureClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            computed = client.embed("vgg16", random_images(6, seed=3, size=8))
            parts = list(client.embed_stream("vgg16", random_images(4, seed=4, size=8), chunk_size=2))
            streamed = np.concatenate([part.vectors for part in parts])
            served_keys = computed.keys + [key for part in parts for key in part.keys]
            assert main(["store", "gc", "--store", str(path)]) == 0
            dry_run = capsys.readouterr().out
            assert "would delete 0 vectors" in dry_run
            assert "only because a server computed them: served:vgg16:" in dry_run
            assert main(["store", "gc", "--yes", "--store", str(path)]) == 0
            vectors, found = client.get_embeddings("vgg16", served_keys)  # the server's store, after gc
            assert found.all() and np.array_equal(vectors, np.concatenate([computed.vectors, streamed]))
            assert main(["store", "info", "--store", str(path)]) == 0
            assert "served:vgg16:" in capsys.readouterr().out
    finally:
        server.stop(grace=1)
    with EmbeddingStore(path, readonly=True) as store:
        (served,) = [s for s in store.feature_sets() if s.name.startswith(SERVED_PREFIX)]
        assert served.count == 10 and served.fingerprint == spec.fingerprint  # the warm-up's zero image is not served
