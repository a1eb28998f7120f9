"""Caps on calls and streams in every door, idle streams closed, and health and metadata that answer however many
calls and streams are open; on a fake backbone whose calls can be held, so nothing waits on TensorFlow."""

import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import random_images, start_server
from extractor.serving.concurrency import ConcurrencyLimits, ServerSlots
from extractor.serving.rest import HttpServer, rest_app
from protos import feature_service_pb2 as pb
from protos import feature_service_pb2_grpc as pb_grpc
from protos import grpc_service_pb2 as oip_pb
from protos import grpc_service_pb2_grpc as oip_grpc
from test_service_core import FakeBackbone

QUICK = 1.0  # seconds: what "at once" means for a refusal or a health check


class Held:
    """A server (gRPC and REST on one core) with small caps, and a backbone whose calls wait on `gate`."""

    def __init__(self, spec, folder, limits: ConcurrencyLimits):
        self.backbone = FakeBackbone(512)
        self.server = start_server(spec, folder / "store.sqlite", backbone_loader=lambda _: self.backbone,
                                   max_wait=0.0, slots=ServerSlots(limits))
        self.http = HttpServer(rest_app(self.server.service, self.server.metrics, slots=self.server.slots), port=0)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.own = pb_grpc.FeatureServiceStub(self.channel)
        self.oip = oip_grpc.GRPCInferenceServiceStub(self.channel)
        self.url = f"http://127.0.0.1:{self.http.port}"
        self._release = threading.Event()
        self._threads: list[threading.Thread] = []

    def hold_calls(self, count: int) -> list:
        """`count` Embed calls held in the backbone; their outcomes (response or RpcError) land in the list
        returned once the gate opens."""
        self.backbone.gate.clear()
        outcomes = []

        def call(seed):
            try:
                outcomes.append(self.own.Embed(embed_request(seed), timeout=30))
            except grpc.RpcError as exc:
                outcomes.append(exc)
        for seed in range(count):
            self._start(call, seed)
        wait_until(lambda: self.server.slots.calls.held == count)
        return outcomes

    def idle_stream(self, method):
        """A stream that sends nothing until the test ends; the call object gives its status once it ends."""
        def nothing():
            self._release.wait(60)
            return
            yield
        return method(nothing(), timeout=60)

    def _start(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        self._release.set()
        self.backbone.gate.set()
        for thread in self._threads:
            thread.join(10)
        self.channel.close()
        self.http.stop(1)
        self.server.stop(grace=1)


@pytest.fixture
def held(spec, tmp_path):
    made = []

    def make(max_streams=2, max_calls=2, stream_idle_seconds=30.0) -> Held:
        made.append(Held(spec, tmp_path, ConcurrencyLimits(max_streams, max_calls, stream_idle_seconds)))
        return made[-1]

    yield make
    for server in made:
        server.close()


def embed_request(seed: int) -> pb.EmbedRequest:
    image = random_images(1, seed=seed, size=8)[0]
    return pb.EmbedRequest(backbone="vgg16", images=[pb.Image(pixels=pb.Tensor(
        data=image.tobytes(), shape=list(image.shape), dtype="uint8"))])


def infer_request(seed: int) -> oip_pb.ModelInferRequest:
    image = random_images(1, seed=seed, size=8)[0][None]
    return oip_pb.ModelInferRequest(
        model_name="vgg16", inputs=[oip_pb.ModelInferRequest.InferInputTensor(name="PIXELS", datatype="UINT8",
                                                                              shape=list(image.shape))],
        raw_input_contents=[image.tobytes()])


def rest_infer_body(seed: int) -> dict:
    image = random_images(1, seed=seed, size=8)[0]
    return {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, *image.shape],
                        "data": image.ravel().tolist()}]}


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def refused_at_once(call) -> grpc.RpcError:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert time.monotonic() - started < QUICK
    return caught.value


# --- caps ------------------------------------------------------------------------------------------------------

def test_calls_over_the_cap_are_refused_at_once_on_every_door(held):
    server = held(max_calls=2)
    outcomes = server.hold_calls(2)
    error = refused_at_once(lambda: server.own.Embed(embed_request(7), timeout=30))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "cap of 2 calls in flight (--max-concurrent-calls)" in error.details()
    assert refused_at_once(lambda: server.oip.ModelInfer(infer_request(8), timeout=30)).code() == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    response, seconds = timed(lambda: httpx.post(f"{server.url}/v2/models/vgg16/infer", json=rest_infer_body(9),
                                                 timeout=30))
    assert response.status_code == 503 and response.headers["Retry-After"] == "1" and seconds < QUICK
    assert "--max-concurrent-calls" in response.json()["error"]
    server.backbone.gate.set()
    wait_until(lambda: len(outcomes) == 2)
    assert all(isinstance(outcome, pb.EmbedResponse) for outcome in outcomes)  # the held calls were answered
    wait_until(lambda: server.server.slots.calls.held == 0)
    assert server.own.Embed(embed_request(7), timeout=30).vectors.rows == 1  # and the cap is free again
    assert httpx.post(f"{server.url}/v2/models/vgg16/infer", json=rest_infer_body(9), timeout=30).status_code == 200


def test_streams_over_the_cap_are_refused_at_once_in_both_grpc_doors(held):
    server = held(max_streams=2)
    streams = [server.idle_stream(server.own.EmbedStream), server.idle_stream(server.oip.ModelStreamInfer)]
    wait_until(lambda: server.server.slots.streams.held == 2)
    for method in (server.own.EmbedStream, server.oip.ModelStreamInfer):
        error = refused_at_once(lambda: next(method(iter([embed_request(1)] if method == server.own.EmbedStream
                                                         else [infer_request(1)]), timeout=30)))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "(--max-streams)" in error.details()
    assert server.own.Embed(embed_request(3), timeout=30).vectors.rows == 1  # streams do not take calls' slots
    for stream in streams:
        stream.cancel()
    wait_until(lambda: server.server.slots.streams.held == 0)
    answers = list(server.own.EmbedStream(iter([embed_request(1), embed_request(2)]), timeout=30))
    assert [answer.vectors.rows for answer in answers] == [1, 1]


def test_limits_are_shown_to_clients(held):
    server = held(max_streams=3, max_calls=5, stream_idle_seconds=12.5)
    limits = server.own.GetBackbone(pb.GetBackboneRequest(name="vgg16"), timeout=10).limits
    assert (limits.max_streams, limits.max_concurrent_calls, limits.stream_idle_seconds) == (3, 5, 12.5)


# --- idle streams ----------------------------------------------------------------------------------------------

def test_a_silent_stream_is_closed_after_the_idle_timeout_and_frees_its_slot(held):
    server = held(max_streams=1, stream_idle_seconds=0.5)
    stream = server.idle_stream(server.own.EmbedStream)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    assert 0.5 <= time.monotonic() - started < 0.5 + QUICK
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no request message arrived for 0.5 s" in caught.value.details()
    assert "--stream-idle-seconds" in caught.value.details()
    wait_until(lambda: server.server.slots.streams.held == 0)
    assert len(list(server.own.EmbedStream(iter([embed_request(1)]), timeout=30))) == 1

    # a stream that answered its last request and then falls silent is closed too
    sent = threading.Event()

    def one_then_nothing():
        yield embed_request(2)
        sent.wait(60)
    stream = server.own.EmbedStream(one_then_nothing(), timeout=60)
    assert next(stream).vectors.rows == 1
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    sent.set()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_stream_waiting_for_its_answer_is_not_idle(held):
    """The idle clock runs only while the server owes the client nothing: a slow backbone does not close it."""
    server = held(max_streams=1, stream_idle_seconds=0.3)
    server.backbone.gate.clear()
    answers = server.own.EmbedStream(iter([embed_request(5)]), timeout=30)
    threading.Timer(1.5, server.backbone.gate.set).start()  # five idle timeouts of computing
    assert [answer.vectors.rows for answer in answers] == [1]


# --- health and metadata however many calls and streams are open -------------------------------------------

def test_health_and_metadata_answer_within_a_second_with_twice_the_stream_cap_held_open(held):
    server = held(max_streams=4, max_calls=2)
    server.hold_calls(2)
    streams = [server.idle_stream(server.own.EmbedStream if i % 2 else server.oip.ModelStreamInfer)
               for i in range(8)]
    wait_until(lambda: server.server.slots.streams.held == 4)
    health = health_pb2_grpc.HealthStub(server.channel)
    reflection = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    checks = {
        "health Check": lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING,
        "reflection": lambda: len(next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), timeout=5)).list_services_response.service) >= 3,
        "ServerLive": lambda: server.oip.ServerLive(oip_pb.ServerLiveRequest(), timeout=5).live,
        "ServerReady": lambda: server.oip.ServerReady(oip_pb.ServerReadyRequest(), timeout=5).ready,
        "ModelMetadata": lambda: server.oip.ModelMetadata(oip_pb.ModelMetadataRequest(name="vgg16"),
                                                          timeout=5).name == "vgg16",
        "GetBackbone": lambda: server.own.GetBackbone(pb.GetBackboneRequest(name="vgg16"), timeout=5).output_dim == 512,
        "REST ready": lambda: httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200,
        "REST model metadata": lambda: httpx.get(f"{server.url}/v2/models/vgg16", timeout=5).status_code == 200,
    }
    for name, check in checks.items():
        for _ in range(5):
            answered, seconds = timed(check)
            assert answered and seconds < QUICK, f"{name}: {seconds:.2f} s"
    # the streams over the cap were refused rather than left to hang; those within it are still open
    ended = [stream.code() for stream in streams if stream.done()]
    assert ended == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4


def test_a_unary_call_whose_message_never_arrives_is_closed_too(held):
    """A client that opens Embed and never finishes its request message holds no thread past the idle timeout."""
    server = held(max_calls=1, stream_idle_seconds=0.5)
    never_sent = server.channel.stream_unary(f"/{pb.DESCRIPTOR.services_by_name['FeatureService'].full_name}/Embed")
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        server.idle_stream(never_sent)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 0.5 + QUICK
    wait_until(lambda: server.server.slots.calls.held == 0)
    assert server.own.Embed(embed_request(4), timeout=30).vectors.rows == 1
