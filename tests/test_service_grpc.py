"""The feature service over a real channel: a server in this process on port 0, VGG16 at 32x32."""

import queue
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sklearn.linear_model import LogisticRegression

from classifiers import persistence
from classifiers.persistence import load_head, save_head
from conftest import CLASSES, fitted_head, png, random_images, start_server
from extractor.models import load_backbone
from extractor.cli import main
from extractor.datasets import open_dataset
from extractor.embedder import Embedder
from extractor.jobs import run_embed_job
from extractor.serving.client import FeatureClient, RemoteError
from extractor.serving.grpc_server import SERVICE_NAME
from extractor.store import EmbeddingStore
from extractor.wire import vectors_response_bytes
from protos import feature_service_pb2 as pb
from protos import feature_service_pb2_grpc as pb_grpc

class RaisingModel(LogisticRegression):
    def predict_proba(self, X):
        raise RuntimeError("secret detail from deep inside the head")


@pytest.fixture(scope="module")
def reference(spec, tmp_path_factory):
    """The in-process Embedder on its own store: what the server must return, bit for bit."""
    with EmbeddingStore(tmp_path_factory.mktemp("reference") / "store.sqlite") as store:
        embedder = Embedder(spec, store)
        yield lambda images: embedder.resolve(images).vectors


@pytest.fixture(scope="module")
def served_heads(spec, heads_dir, tmp_path_factory):
    """The shared heads plus one that fails when asked (its type trusted while the module's server runs)."""
    folder = tmp_path_factory.mktemp("served-heads")
    shutil.copytree(heads_dir, folder, dirs_exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(persistence, "TRUSTED_TYPES",
                      persistence.TRUSTED_TYPES | {f"{RaisingModel.__module__}.{RaisingModel.__qualname__}"})
        save_head(fitted_head(spec, RaisingModel()), folder / "broken", backbone_fingerprint=spec.fingerprint,
                  class_names=CLASSES)
        yield folder


@pytest.fixture(scope="module")
def server(spec, served_heads, tmp_path_factory):
    server = start_server(spec, tmp_path_factory.mktemp("served") / "store.sqlite", heads_dir=served_heads)
    yield server
    server.stop(grace=1)


@pytest.fixture
def client(server):
    with FeatureClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        yield client


def assert_still_serving(client, seed: int = 999):
    result = client.embed("vgg16", random_images(1, seed))
    assert result.vectors.shape == (1, 512) and not result.errors


def test_vectors_are_bit_identical_to_the_in_process_embedder(client, reference):
    images = random_images(5, seed=1) + [np.zeros((28, 28, 1), np.uint8)]
    result = client.embed("vgg16", images)
    assert result.vectors.dtype == np.float32 and result.vectors.shape == (6, 512)
    assert np.array_equal(result.vectors, reference(images))
    assert not result.cached.any()
    # the same pixels as PNG files: the same content keys, now cache hits
    again = client.embed("vgg16", [png(image) for image in images])
    assert again.keys == result.keys and again.cached.all()
    assert np.array_equal(again.vectors, result.vectors)


def test_batch_job_vectors_are_hits_over_grpc_and_back(client, server, spec, tmp_path):
    x = np.stack(random_images(5, seed=2, size=28, channels=1))[..., 0]
    np.savez(tmp_path / "tiny.npz", x=x, y=np.arange(5) % 2)
    with EmbeddingStore(server.service.store.path) as batch_store:  # the batch job's own connection
        run_embed_job(open_dataset(f"npz:{tmp_path / 'tiny.npz'}"), Embedder(spec, batch_store), "tiny")
        X, _, _ = batch_store.load_feature_set("tiny")
    result = client.embed("vgg16", list(x))
    assert result.cached.all()
    assert np.array_equal(result.vectors, X)

    fresh = random_images(3, seed=3)
    assert not client.embed("vgg16", fresh).cached.any()
    with EmbeddingStore(server.service.store.path) as batch_store:
        assert Embedder(spec, batch_store).resolve(fresh).cached.all()


def test_health_and_reflection(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(responses).list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def refused(server, model="vgg16") -> float:
    """Calls on `model` the server answered UNAVAILABLE, by its metrics."""
    labels = {"model": model, "protocol": "grpc", "status": "UNAVAILABLE"}
    return server.metrics.registry.get_sample_value("extractor_requests_total", labels) or 0.0


def test_not_serving_until_warm_and_clients_retry_meanwhile(spec, tmp_path):
    """Refused UNAVAILABLE while warming up; a client's calls are retried by gRPC's retry policy, and the call
    that was refused first succeeds once the server is ready."""
    built = load_backbone(spec)
    built.embed([np.zeros(spec.input_shape, np.uint8)])  # traced here: the server's own warm-up is quick
    release = threading.Event()

    def slow_loader(s):
        release.wait(30)
        return built

    server = start_server(spec, tmp_path / "store.sqlite", backbone_loader=slow_loader, start=False)
    warming = threading.Thread(target=server.start)
    warming.start()
    target = f"127.0.0.1:{server.port}"
    try:
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            assert health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with FeatureClient(target, retries=0) as impatient, pytest.raises(RemoteError) as caught:
                impatient.embed("vgg16", random_images(1, seed=4))
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE and refused(server) == 1

            def release_after_a_refusal():
                while refused(server) < 2:
                    time.sleep(0.001)
                release.set()

            threading.Thread(target=release_after_a_refusal, daemon=True).start()
            with FeatureClient(target, timeout=60, retries=4, backoff=0.5) as patient:
                assert patient.embed("vgg16", random_images(1, seed=4)).vectors.shape == (1, 512)
                patient.wait_until_serving(timeout=10)
            assert refused(server) >= 2  # the patient client was refused, then its retry was answered
            assert health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        release.set()
        warming.join()
        server.stop(grace=1)


def bad_request_cases():
    def embed(**fields):
        return lambda stub: stub.Embed(pb.EmbedRequest(backbone="vgg16", **fields), timeout=10)

    good = pb.Image(pixels=pb.Tensor(data=bytes(32 * 32 * 3), shape=[32, 32, 3], dtype="uint8"))
    return {
        "unknown backbone": (lambda stub: stub.Embed(pb.EmbedRequest(backbone="resnet", images=[good])),
                             grpc.StatusCode.NOT_FOUND, "unknown backbone 'resnet'"),
        "unknown head": (lambda stub: stub.Classify(pb.ClassifyRequest(head="nope", images=[good])),
                         grpc.StatusCode.NOT_FOUND, "unknown head 'nope'"),
        "head of a backbone not served": (
            lambda stub: stub.Classify(pb.ClassifyRequest(head="orphan", images=[good])),
            grpc.StatusCode.NOT_FOUND, "served backbone for head 'orphan'"),
        "all or nothing": (embed(images=[good, good, pb.Image(encoded=b"GIF89a junk")], all_or_nothing=True),
                           grpc.StatusCode.INVALID_ARGUMENT, "image 2: cannot decode"),
        "wrong shape, all or nothing": (
            embed(images=[pb.Image(pixels=pb.Tensor(data=bytes(10), shape=[32, 32], dtype="uint8"))],
                  all_or_nothing=True),
            grpc.StatusCode.INVALID_ARGUMENT, "image 0: 10 bytes of pixel data do not fill shape (32, 32)"),
        "too many images": (embed(images=[good] * 65), grpc.StatusCode.RESOURCE_EXHAUSTED,
                            "images per request is 65, over the limit of 64"),
        "message too large": (embed(images=[pb.Image(encoded=bytes(3 * 2**20))]),
                              grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than max"),
        "bad keys": (lambda stub: stub.GetEmbeddings(pb.GetEmbeddingsRequest(backbone="vgg16", keys=bytes(33))),
                     grpc.StatusCode.INVALID_ARGUMENT, "32 bytes each"),
        "deadline": (lambda stub: stub.Embed(pb.EmbedRequest(backbone="vgg16", images=[
            pb.Image(pixels=pb.Tensor(data=np.full(3072, 7, np.uint8).tobytes(), shape=[32, 32, 3], dtype="uint8"))
        ]), timeout=0.001), grpc.StatusCode.DEADLINE_EXCEEDED, ""),
        "failing head": (lambda stub: stub.Classify(pb.ClassifyRequest(head="broken", images=[good])),
                         grpc.StatusCode.INTERNAL, "internal error; the server logged the details"),
    }


@pytest.mark.parametrize("case", list(bad_request_cases()))
def test_each_error_has_its_status_and_the_server_keeps_serving(case, server, client, caplog):
    call, code, message = bad_request_cases()[case]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            call(pb_grpc.FeatureServiceStub(channel))
    assert caught.value.code() == code
    assert message in caught.value.details()
    assert "secret" not in caught.value.details() and "Traceback" not in caught.value.details()
    if code == grpc.StatusCode.INTERNAL:
        assert "secret detail" in caplog.text  # logged on the server's side, with its traceback
    assert_still_serving(client)


def test_per_image_errors_leave_the_other_images_intact(client, reference):
    good = random_images(2, seed=5)
    big = png(np.zeros((128, 128), np.uint8))  # 16384 decoded pixels, over the limit of 10000
    result = client.embed("vgg16", [good[0], b"junk", np.zeros((32, 32, 3), np.float32), big, good[1]])
    assert [(f.index, f.code) for f in result.errors] == [
        (1, grpc.StatusCode.INVALID_ARGUMENT), (2, grpc.StatusCode.INVALID_ARGUMENT),
        (3, grpc.StatusCode.RESOURCE_EXHAUSTED)]
    assert "image 2: pixel dtype must be uint8" in result.errors[1].message
    assert "image 3: decoded pixels per image is 16384" in result.errors[2].message
    assert np.array_equal(result.vectors[[0, 4]], reference(good))
    assert np.isnan(result.vectors[1:4]).all()


def test_concurrent_good_and_malformed_calls_in_one_micro_batch_each_get_their_own(server, reference):
    batcher = server.service.served["vgg16"].batcher
    calls = {f"good{i}": random_images(3, seed=100 + i) for i in range(5)}
    calls["mixed"] = [b"junk", *random_images(2, seed=200), np.zeros((4, 4), np.int16)]
    calls["all bad"] = [b"junk", b"", np.zeros((2, 3, 5), np.uint8)]
    results, barrier = {}, threading.Barrier(len(calls))
    batches_before = batcher.batches

    def send(name):
        with FeatureClient(f"127.0.0.1:{server.port}") as client:
            barrier.wait()
            results[name] = client.embed("vgg16", calls[name])

    threads = [threading.Thread(target=send, args=(name,)) for name in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    calls_with_misses = 6
    assert batcher.batches - batches_before < calls_with_misses  # some calls shared a backbone call
    for i in range(5):
        assert np.array_equal(results[f"good{i}"].vectors, reference(calls[f"good{i}"]))
        assert not results[f"good{i}"].errors
    mixed = results["mixed"]
    assert [f.index for f in mixed.errors] == [0, 3]
    assert np.array_equal(mixed.vectors[1:3], reference(calls["mixed"][1:3]))
    assert [f.index for f in results["all bad"].errors] == [0, 1, 2]
    assert np.isnan(results["all bad"].vectors).all()


def test_stream_gives_the_unary_vectors_and_stream_wide_error_indices(client, reference):
    images = random_images(7, seed=6)
    stream_input = images[:4] + [b"junk"] + images[4:]
    parts = list(client.embed_stream("vgg16", stream_input, chunk_size=3))
    assert [p.offset for p in parts] == [0, 3, 6]
    assert [f.index for p in parts for f in p.errors] == [4]
    vectors = np.concatenate([p.vectors for p in parts])
    assert np.array_equal(np.delete(vectors, 4, axis=0), reference(images))
    with pytest.raises(RemoteError) as caught:
        list(client.embed_stream("resnet", images))
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert_still_serving(client)


def test_a_stacked_array_travels_as_batch_tensors(client, reference):
    stacked = np.stack(random_images(70, seed=14))  # over the limit of 64 per request: two requests
    result = client.embed("vgg16", stacked)
    assert np.array_equal(result.vectors, reference(list(stacked)))
    parts = list(client.embed_stream("vgg16", stacked, chunk_size=32))
    assert [p.offset for p in parts] == [0, 32, 64] and all(p.cached.all() for p in parts)
    assert np.array_equal(np.concatenate([p.vectors for p in parts]), result.vectors)
    with pytest.raises(RemoteError) as caught:
        client.embed("vgg16", stacked.astype(np.float32))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "batch dtype must be uint8" in str(caught.value)


def test_stream_serves_a_client_that_waits_for_each_answer(server, reference):
    images = random_images(4, seed=13)
    requests = queue.Queue()

    def request(chunk, backbone="vgg16"):
        return pb.EmbedRequest(backbone=backbone, images=[
            pb.Image(pixels=pb.Tensor(data=image.tobytes(), shape=image.shape, dtype="uint8")) for image in chunk])

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        responses = pb_grpc.FeatureServiceStub(channel).EmbedStream(iter(requests.get, None), timeout=30)
        requests.put(request(images[:2]))
        first = next(responses)
        requests.put(request(images[2:], backbone=""))  # the backbone carries over
        second = next(responses)
        requests.put(None)
        assert list(responses) == []
    assert (first.offset, second.offset) == (0, 2)
    vectors = np.concatenate([np.frombuffer(r.vectors.data, "<f4").reshape(2, 512) for r in (first, second)])
    assert np.array_equal(vectors, reference(images))


def test_get_embeddings_returns_stored_vectors_only(client):
    images = random_images(3, seed=7)
    embedded = client.embed("vgg16", images)
    vectors, found = client.get_embeddings("vgg16", embedded.keys + [bytes(32)])
    assert found.tolist() == [True, True, True, False]
    assert np.array_equal(vectors[:3], embedded.vectors) and np.isnan(vectors[3]).all()


def test_clients_split_calls_whose_vectors_would_not_fit_one_response(spec, tmp_path, reference, heads_dir):
    """Small images with wide vectors: the response, not the request, is what must be split; Classify,
    which returns no vectors, is not."""
    server = start_server(spec, tmp_path / "store.sqlite", max_message_bytes=vectors_response_bytes(20, 512),
                          heads_dir=heads_dir)
    try:
        images = random_images(50, seed=15, size=16)
        with FeatureClient(f"127.0.0.1:{server.port}", timeout=30) as client:
            result = client.embed("vgg16", images)
            assert np.array_equal(result.vectors, reference(images)) and not result.errors
            vectors, found = client.get_embeddings("vgg16", result.keys)
            assert found.all() and np.array_equal(vectors, result.vectors)
            parts = list(client.embed_stream("vgg16", images))
            assert [p.offset for p in parts] == [0, 20, 40] and all(p.cached.all() for p in parts)
            classified = client.classify("lr", images)
            assert classified.probabilities.shape == (50, 3) and classified.cached.all()
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.FeatureServiceStub(channel).Embed(pb.EmbedRequest(backbone="vgg16", batch=pb.Tensor(
                    data=np.stack(images[:21]).tobytes(), shape=[21, 16, 16, 3], dtype="uint8")), timeout=10)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "response bytes (21 vectors of 512 floats; 20 fit)" in caught.value.details()
    finally:
        server.stop(grace=1)


def test_heads_are_listed_and_classify_matches_the_head(client, server, reference, heads_dir):
    heads = {h.name: h for h in client.heads()}
    assert set(heads) == {"lr", "orphan", "broken"}
    assert heads["lr"].backbone == "vgg16" and heads["orphan"].backbone == ""
    assert list(heads["lr"].class_names) == CLASSES
    images = random_images(4, seed=8)
    result = client.classify("lr", images + [b"junk"])
    model = load_head(heads_dir / "lr.skops")
    expected = model.predict_proba(reference(images)).astype(np.float32)
    assert np.array_equal(result.probabilities[:4], expected)
    assert result.labels[:4] == [CLASSES[i] for i in expected.argmax(axis=1)] and result.labels[4] == ""
    assert [f.index for f in result.errors] == [4]


def test_remote_embed_and_classify_commands(server, tmp_path, capsys, caplog, reference):
    x = np.stack(random_images(6, seed=11, size=28, channels=1))[..., 0]
    np.savez(tmp_path / "digits.npz", x=x, y=np.arange(6) % 3)
    address = f"127.0.0.1:{server.port}"
    local_store = tmp_path / "local.sqlite"
    assert main(["embed", "--remote", address, "--backbone", "vgg16", "--data", f"npz:{tmp_path / 'digits.npz'}",
                 "--feature-set", "digits", "--store", str(local_store), "--batch-size", "4"]) == 0
    assert "images        6  computed 6, reused 0" in capsys.readouterr().out
    with EmbeddingStore(local_store, readonly=True) as store:
        X, _, _ = store.load_feature_set("digits")
        keys, _ = store.feature_set_keys("digits")
    assert np.array_equal(X, reference([image[..., None] for image in x]))
    assert all(server.service.store.has(key) for key in keys)  # the vectors are in the server's store too

    assert main(["embed", "--remote", address, "--backbone", "vgg16", "--input-size", "64", "--data",
                 f"npz:{tmp_path / 'digits.npz'}", "--feature-set", "d64", "--store", str(local_store)]) == 2
    assert "the server runs vgg16 with input size 32" in caplog.text

    files = []
    for i, image in enumerate(random_images(2, seed=12)):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(png(image))
    (tmp_path / "bad.png").write_bytes(b"junk")
    assert main(["classify", "--remote", address, "--head", "lr", *map(str, files), str(tmp_path / "bad.png")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1] in CLASSES for line in lines[:2]] == [True, True]
    assert lines[2].startswith(f"{tmp_path / 'bad.png'}\terror INVALID_ARGUMENT: image 2: cannot decode")

