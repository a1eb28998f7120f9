"""The service core without gRPC or TensorFlow: image checks, limits, and what the micro-batcher drops."""

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from extractor.errors import InvalidInputError, LimitExceededError, NotReadyError, StoreError, UnknownNameError
from extractor.serving.hot_cache import HotVectors
from extractor.serving.requests import Call, Limits, RawPixels, to_pixels
from extractor.serving.service import FeatureService
from extractor.store import EmbeddingStore


class FakeBackbone:
    """Stands in for a built backbone: a vector that is a function of the pixels, and a record of calls.

    `gate` holds every call until set; `poison` makes any batch holding that pixel value fail.
    """

    def __init__(self, dim: int, poison: int | None = None):
        self.dim, self.poison = dim, poison
        self.output_dim = dim
        self.calls: list[int] = []
        self.seen: list[int] = []  # first pixel of every image computed
        self.gate = threading.Event()
        self.gate.set()

    def embed(self, images):
        self.gate.wait()
        firsts = [int(image.flat[0]) for image in images]
        if self.poison in firsts:
            raise RuntimeError("poisoned batch")
        self.calls.append(len(images))
        self.seen.extend(firsts)
        return np.stack([np.resize(image.astype(np.float32).ravel(), self.dim) for image in images])


def image(value: int, size: int = 8) -> np.ndarray:
    return np.full((size, size, 3), value, dtype=np.uint8)


def raw(array: np.ndarray) -> RawPixels:
    return RawPixels(array.tobytes(), array.shape, str(array.dtype))


@pytest.fixture
def make_service(spec, tmp_path):
    services = []

    def make(backbone: FakeBackbone, **options) -> FeatureService:
        service = FeatureService([spec], EmbeddingStore(tmp_path / f"store{len(services)}.sqlite"),
                                 backbone_loader=lambda _: backbone, **options)
        service.start()
        backbone.calls.clear()  # forget the warm-up
        backbone.seen.clear()
        services.append(service)
        return service

    yield make
    for service in services:
        service.close()


def test_raw_pixels_are_checked():
    assert to_pixels(raw(image(5) + np.arange(3, dtype=np.uint8)), 100).shape == (8, 8, 3)
    assert to_pixels(raw(image(5)), 100).shape == (8, 8, 1)  # three equal channels are gray (see extractor.images)
    assert to_pixels(raw(np.zeros((4, 6), np.uint8)), 100).shape == (4, 6, 1)
    with pytest.raises(InvalidInputError, match="dtype must be uint8"):
        to_pixels(raw(np.zeros((4, 4), np.float32)), 100)
    with pytest.raises(InvalidInputError, match="do not fill shape"):
        to_pixels(RawPixels(b"\0" * 10, (4, 4), "uint8"), 100)
    with pytest.raises(InvalidInputError, match="shape"):
        to_pixels(RawPixels(b"\0" * 8, (2, 2, 2), "uint8"), 100)
    with pytest.raises(LimitExceededError, match="decoded pixels"):
        to_pixels(raw(np.zeros((20, 20), np.uint8)), 100)


def test_a_batch_follows_the_images_and_counts_against_the_limit(make_service):
    service = make_service(FakeBackbone(512), limits=Limits(max_images_per_request=4))
    stacked = np.stack([image(3), image(4), image(5)])
    outcome = service.embed("vgg16", [raw(image(1))], batch=raw(stacked))
    np.testing.assert_array_equal(outcome.vectors[:, 0], [1, 3, 4, 5])
    with pytest.raises(LimitExceededError, match="images per request is 5"):
        service.embed("vgg16", [raw(image(1)), raw(image(2))], batch=raw(stacked))
    with pytest.raises(InvalidInputError, match="batch shape must be"):
        service.embed("vgg16", [], batch=raw(np.zeros((4, 4), np.uint8)))


def test_bad_images_are_reported_by_index_and_do_not_fail_the_others(make_service):
    backbone = FakeBackbone(512)
    service = make_service(backbone, limits=Limits(max_decoded_pixels=32 * 32))
    png = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(png, format="PNG")
    outcome = service.embed("vgg16", [raw(image(1)), b"not an image", png.getvalue(), raw(image(2))])
    assert [(i, type(e)) for i, e in outcome.errors] == [(1, InvalidInputError), (2, LimitExceededError)]
    assert "image 1" in str(outcome.errors[0][1]) and "image 2: decoded pixels" in str(outcome.errors[1][1])
    assert outcome.ok.tolist() == [True, False, False, True]
    assert np.isnan(outcome.vectors[1:3]).all() and not np.isnan(outcome.vectors[[0, 3]]).any()
    assert outcome.keys[32:96] == bytes(64)
    with pytest.raises(InvalidInputError, match="image 1: cannot decode"):
        service.embed("vgg16", [raw(image(1)), b"junk"], all_or_nothing=True)


def test_limits_unknown_names_and_readiness(make_service, spec, tmp_path):
    service = make_service(FakeBackbone(512), limits=Limits(max_images_per_request=2))
    with pytest.raises(LimitExceededError, match="images per request is 3"):
        service.embed("vgg16", [raw(image(i)) for i in range(3)])
    with pytest.raises(UnknownNameError, match="unknown backbone 'resnet'; known: vgg16"):
        service.embed("resnet", [raw(image(1))])
    with pytest.raises(InvalidInputError, match="32 bytes each"):
        service.get_embeddings("vgg16", b"\0" * 33)
    idle = FeatureService([spec], EmbeddingStore(tmp_path / "idle.sqlite"))
    with pytest.raises(NotReadyError):
        idle.embed("vgg16", [raw(image(1))])
    idle.store.close()


def test_duplicates_and_cached_images_are_not_computed_again(make_service):
    backbone = FakeBackbone(512)
    service = make_service(backbone)
    first = service.embed("vgg16", [raw(image(1)), raw(image(2)), raw(image(1))])
    assert backbone.seen == [1, 2] and not first.cached.any()
    again = service.embed("vgg16", [raw(image(2)), raw(image(1))])
    assert backbone.seen == [1, 2] and again.cached.all()
    np.testing.assert_array_equal(again.vectors, first.vectors[[1, 0]])
    vectors, found = service.get_embeddings("vgg16", again.keys + bytes(32))
    assert found.tolist() == [True, True, False]
    np.testing.assert_array_equal(vectors[:2], again.vectors)


def test_hot_vectors_keep_the_most_recently_used_within_their_bytes():
    hot = HotVectors(max_bytes=3 * 512 * 4)
    vectors = {bytes([i]) * 32: np.full(512, i, np.float32) for i in range(3)}
    hot.put_many(vectors)
    assert set(hot.get_many([bytes([0]) * 32])) == {bytes([0]) * 32}  # 0 is now the most recent
    hot.put_many({bytes([9]) * 32: np.zeros(512, np.float32)})
    assert set(hot.get_many(list(vectors))) == {bytes([0]) * 32, bytes([2]) * 32}  # 1 went first


def test_expired_and_abandoned_work_is_dropped_before_compute(make_service):
    backbone = FakeBackbone(512)
    service = make_service(backbone, max_wait=0.0)
    backbone.gate.clear()  # the batcher is busy with the first call until the gate opens
    busy = service.begin_embed("vgg16", [raw(image(1))])
    time.sleep(0.05)
    expiring = service.begin_embed("vgg16", [raw(image(2))], call=Call(deadline=time.monotonic() + 0.05))
    wanted = threading.Event()
    wanted.set()
    abandoned = service.begin_embed("vgg16", [raw(image(3))], call=Call(is_active=wanted.is_set))
    wanted.clear()  # the client went away while its work was queued
    time.sleep(0.1)
    backbone.gate.set()
    assert busy.result().ok.all()
    with pytest.raises(TimeoutError):
        expiring.result()
    with pytest.raises(Exception) as caught:
        abandoned.result()
    assert type(caught.value).__name__ == "CancelledError"
    assert backbone.seen == [1]


def test_concurrent_calls_share_a_batch_and_a_failing_one_does_not_fail_the_others(make_service):
    backbone = FakeBackbone(512, poison=99)
    service = make_service(backbone, max_wait=0.0)
    backbone.gate.clear()
    blocker = service.begin_embed("vgg16", [raw(image(1))])
    time.sleep(0.05)
    pending = [service.begin_embed("vgg16", [raw(image(value)), raw(image(value + 1))]) for value in (10, 20, 30)]
    poisoned = service.begin_embed("vgg16", [raw(image(99))])
    backbone.gate.set()
    blocker.result()
    for value, p in zip((10, 20, 30), pending):
        outcome = p.result()
        np.testing.assert_array_equal(outcome.vectors[:, 0], [value, value + 1])
    with pytest.raises(RuntimeError, match="poisoned"):
        poisoned.result()
    # one batch of all four calls failed; then each call ran alone
    assert backbone.calls == [1, 2, 2, 2]


class FillingStore(EmbeddingStore):
    """A store whose writes fail with a full disk while `full` is set, as SQLite's would."""

    full = False

    def put_many(self, keys, vectors, **options):
        from extractor.errors import StoreFullError

        if self.full:
            raise StoreFullError(f"cannot write to store {self.path}: disk full", "disk full")
        return super().put_many(keys, vectors, **options)


def test_a_full_disk_is_a_health_state_and_loses_no_vector(spec, tmp_path):
    backbone = FakeBackbone(16)
    store = FillingStore(tmp_path / "store.sqlite")
    service = FeatureService([spec], store, backbone_loader=lambda _: backbone)
    health = []
    service.on_health_change(health.append)
    service.start()
    try:
        assert service.serving
        store.full = True
        first = service.embed("vgg16", [image(1)])
        assert first.ok.all() and not first.cached.any()  # computed and answered, though not stored
        assert not service.serving and "disk full" in service.storage.problem and health == [False]
        again = service.embed("vgg16", [image(1)])
        assert again.cached.all() and np.array_equal(again.vectors, first.vectors)  # kept in memory
        assert backbone.seen.count(1) == 1  # image 1 computed once
        store.full = False
        service.embed("vgg16", [image(2)])
        assert service.serving and service.storage.problem is None and health == [False, True]
    finally:
        service.close()


def test_storage_faults_map_to_their_status_in_each_door():
    import grpc

    from extractor.errors import StoreDamagedError, StoreFullError, StoreIOError
    from extractor.serving.grpc_status import status_for
    from extractor.serving.rest import STATUS_BY_ERROR

    rest = dict(STATUS_BY_ERROR)
    full, read_only = StoreFullError("disk full", "disk full"), StoreIOError("read-only", "read-only")
    assert status_for(full) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "disk full")
    assert status_for(read_only)[0] == status_for(StoreDamagedError("damaged"))[0] == grpc.StatusCode.UNAVAILABLE
    assert next(code for kind, code in STATUS_BY_ERROR if isinstance(full, kind)) == 507
    assert next(code for kind, code in STATUS_BY_ERROR if isinstance(read_only, kind)) == 503 == rest[StoreError]
