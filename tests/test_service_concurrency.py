"""Caps on calls and streams in every door, idle streams closed, and health and metadata that answer however many
calls and streams are open; on a fake backbone whose calls can be held, so nothing waits on TensorFlow."""

import json
import threading
import time
from collections import Counter

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import random_images, reliability_sizes, start_server
from extractor.serving.client import FeatureClient
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
    assert response.status_code == 429 and response.headers["Retry-After"] == "1" and seconds < QUICK
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


# --- shutting down -----------------------------------------------------------------------------------------------

def test_stopping_lets_calls_in_flight_finish_and_refuses_new_ones_unavailable_at_once(held):
    """Stopping: health says NOT_SERVING, a new call is refused UNAVAILABLE at once (clients retry elsewhere), the
    calls in flight are answered in full, and the server stops as soon as they are, well within its grace."""
    server = held(max_calls=2)
    outcomes = server.hold_calls(2)
    stopping = threading.Thread(target=server.server.stop, args=(30,), daemon=True)
    started = time.monotonic()
    stopping.start()
    health = health_pb2_grpc.HealthStub(server.channel)
    wait_until(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=QUICK).status
               == health_pb2.HealthCheckResponse.NOT_SERVING)
    caught = refused_at_once(lambda: server.own.Embed(embed_request(9), timeout=30))
    assert caught.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in caught.details()
    assert stopping.is_alive()  # held by the two calls in flight
    server.backbone.gate.set()
    stopping.join(10)
    assert not stopping.is_alive() and time.monotonic() - started < 10
    assert len(outcomes) == 2 and all(outcome.vectors.rows == 1 for outcome in outcomes), outcomes


class BusyBackbone(FakeBackbone):
    """Holds the interpreter for a while per batch, as Python code around a model does."""

    def embed(self, images):
        sum(range(300_000))
        return super().embed(images)


def test_calls_arriving_while_the_server_stops_are_refused_unavailable_never_cancelled(spec, tmp_path):
    """grpc answers CANCELLED (which clients do not retry) to the calls it has received but not yet handed over
    when its server stops, and it hands them over late while the calls in flight keep the interpreter busy. Eight
    clients calling in a loop, five times: every call after the stop began is refused UNAVAILABLE."""
    late: list[grpc.StatusCode] = []
    for attempt in range(5):
        server = start_server(spec, tmp_path / f"store{attempt}.sqlite", backbone_loader=lambda _: BusyBackbone(512),
                              max_wait=0.0)

        def keep_calling(seed: int) -> None:
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                embed = pb_grpc.FeatureServiceStub(channel).Embed
                while True:  # until refused: calls answered before the refusal began are fine
                    try:
                        embed(embed_request(seed), timeout=30)
                    except grpc.RpcError as exc:
                        late.append(exc.code())
                        return

        clients = [threading.Thread(target=keep_calling, args=(seed,), daemon=True) for seed in range(8)]
        for client in clients:
            client.start()
        time.sleep(0.3)
        server.stop(grace=10)
        for client in clients:
            client.join(10)
    assert Counter(late) == {grpc.StatusCode.UNAVAILABLE: 40}, Counter(late)


# --- reliability: a real served process -------------------------------------------------------------------------

TOKEN = "hostile-test-token"
IDLE_SECONDS = 4.0
# What grpc's own transport answers, before the server sees the call, to metadata it cannot parse: INTERNAL,
# with a message naming the header. The server's own INTERNAL says "internal error; the server logged ...".
GRPC_CORE_REFUSALS = ("Error parsing", "Illegal header key", "Decompression failed", "Compression bit set")


@pytest.fixture(scope="module")
def served_process(tmp_path_factory, data_dir):
    """`extractor serve` in its own process with a token, REST, the default caps, and an idle timeout of 4 s."""
    from test_service_load import ServedProcess

    server = ServedProcess(tmp_path_factory.mktemp("hostile"), data_dir, "--http-port", "0", "--stream-idle-seconds",
                           str(IDLE_SECONDS), token=TOKEN)
    line = server.process.stdout.readline()
    assert line.startswith("http on 127.0.0.1:"), line
    server.http_port = int(line.split(":")[-1])
    server.grpc_port = int(server.target.split(":")[-1])
    yield server
    assert server.stop()[0] == 0


def percentile_ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(seconds) * 1000, q)), 2)


@pytest.mark.parametrize("probes", reliability_sizes(10, 100))
def test_idle_streams_twice_the_cap_leave_health_and_calls_served(probes, served_process, figures):
    """2x the default stream cap held open and silent against a real server: the streams over the cap are
    refused at once, health and metadata answer within a second on every door while other calls are served, and
    the silent streams are closed after the idle timeout, which frees the cap for new streams."""
    cap = ConcurrencyLimits().max_streams
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    channel = grpc.insecure_channel(served_process.target)
    own, oip = pb_grpc.FeatureServiceStub(channel), oip_grpc.GRPCInferenceServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    release = threading.Event()

    def nothing():
        release.wait(60)
        return
        yield

    opened = time.monotonic()
    streams = [(own.EmbedStream if i % 2 else oip.ModelStreamInfer)(nothing(), timeout=60, metadata=metadata)
               for i in range(2 * cap)]
    latencies: dict[str, list[float]] = {"health": [], "rest_ready": [], "metadata": []}
    served, stop_calls = [], threading.Event()

    def other_calls():
        with FeatureClient(served_process.target, token=TOKEN, timeout=30, retries=0) as client:
            seed = 1000
            while not stop_calls.is_set():
                seed += 1
                served.append(client.embed("vgg16", random_images(4, seed=seed)).vectors.shape == (4, 512))

    caller = threading.Thread(target=other_calls)
    caller.start()
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5) as rest:
            probe_until = opened + IDLE_SECONDS * 0.75
            for i in range(probes):
                _, seconds = timed(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5, metadata=metadata))
                latencies["health"].append(seconds)
                response, seconds = timed(lambda: rest.get(f"http://127.0.0.1:{served_process.http_port}"
                                                           "/v2/health/ready"))
                assert response.status_code == 200
                latencies["rest_ready"].append(seconds)
                call = [lambda: oip.ServerLive(oip_pb.ServerLiveRequest(), timeout=5, metadata=metadata),
                        lambda: own.GetBackbone(pb.GetBackboneRequest(name="vgg16"), timeout=5, metadata=metadata),
                        lambda: oip.ModelMetadata(oip_pb.ModelMetadataRequest(name="vgg16"), timeout=5,
                                                  metadata=metadata)][i % 3]
                latencies["metadata"].append(timed(call)[1])
                time.sleep(max(probe_until - time.monotonic(), 0) / max(probes - i, 1))
        refused = sum(1 for stream in streams if stream.done()
                      and stream.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
        stop_calls.set()
        caller.join(60)
        closed_after = []
        for stream in streams:
            if stream.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # waits for each admitted one to be closed
                closed_after.append(time.monotonic() - opened)
        after = list(own.EmbedStream(iter([pb.EmbedRequest(backbone="vgg16", images=[pb.Image(pixels=pb.Tensor(
            data=bytes(12), shape=[2, 2, 3], dtype="uint8"))])]), timeout=30, metadata=metadata))
    finally:
        release.set()
        stop_calls.set()
        caller.join(60)
        channel.close()
    slowest = {name: max(values) for name, values in latencies.items()}
    figures.set(idle_streams_held=2 * cap, idle_streams_refused=refused, idle_streams_stream_cap=cap,
                idle_streams_health_p50_ms=percentile_ms(latencies["health"], 50),
                idle_streams_health_max_ms=round(slowest["health"] * 1000, 2),
                idle_streams_rest_ready_p50_ms=percentile_ms(latencies["rest_ready"], 50),
                idle_streams_rest_ready_max_ms=round(slowest["rest_ready"] * 1000, 2),
                idle_streams_metadata_p50_ms=percentile_ms(latencies["metadata"], 50),
                idle_streams_metadata_max_ms=round(slowest["metadata"] * 1000, 2),
                idle_streams_probes=3 * probes, idle_streams_other_calls_served=sum(served),
                idle_streams_idle_seconds=IDLE_SECONDS,
                idle_streams_closed_after_s=round(max(closed_after), 2) if closed_after else None)
    assert refused == cap and len(closed_after) == cap
    assert all(seconds < QUICK for seconds in slowest.values()), slowest
    assert served and all(served)
    assert IDLE_SECONDS <= max(closed_after) < IDLE_SECONDS + 3
    assert len(after) == 1  # the cap is free again


def raw_grpc_call(port: int, path: str, headers: list[tuple[str, str]], message: bytes = b"", *, flag: int = 0,
                  content_type: str | None = "application/grpc", timeout: float = 10.0) -> dict:
    """One gRPC call over a bare HTTP/2 connection carrying exactly `headers`, which grpc's own clients refuse to
    send: what came back (":status", "grpc-status", "grpc-message"), or how the connection ended."""
    import socket

    import h2.config
    import h2.connection
    import h2.events
    import h2.exceptions

    connection = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding="utf-8", validate_outbound_headers=False, normalize_outbound_headers=False))
    encode = connection.encoder.encode
    connection.encoder.encode = lambda fields, huffman=False: encode(fields, huffman=huffman)  # Python Huffman: slow
    got: dict = {}
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            connection.initiate_connection()
            stream = connection.get_next_available_stream_id()
            connection.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                             (":authority", f"127.0.0.1:{port}"), ("te", "trailers"),
                                             *([("content-type", content_type)] if content_type else []), *headers])
            connection.send_data(stream, bytes([flag]) + len(message).to_bytes(4, "big") + message, end_stream=True)
            sock.sendall(connection.data_to_send())
            while not {"grpc-status", "reset", "goaway", "ended"} & set(got):
                data = sock.recv(65536)
                if not data:
                    got["ended"] = "closed"
                for event in connection.receive_data(data) if data else ():
                    if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                        got.update(dict(event.headers))
                    elif isinstance(event, h2.events.StreamEnded):
                        got.setdefault("ended", "stream ended")
                    elif isinstance(event, h2.events.StreamReset):
                        got["reset"] = int(event.error_code)
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        got["goaway"] = int(event.error_code)
                sock.sendall(connection.data_to_send())
        except (OSError, h2.exceptions.ProtocolError) as exc:
            got["ended"] = type(exc).__name__
    return got


def raw_http(port: int, request: bytes, timeout: float = IDLE_SECONDS + 5) -> int | str:
    """The status code the REST door answers to exactly these bytes, or how the connection ended."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
            head = sock.recv(65536)
        except OSError as exc:
            return type(exc).__name__
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else "closed"


def hostile_grpc_cases(cases: int) -> list[tuple[str, list, dict]]:
    """(what, headers, options of the call) for `cases` calls with hostile metadata, a valid token unless the
    token is what is hostile."""
    rng = np.random.default_rng(cases)
    token = ("authorization", f"Bearer {TOKEN}")
    fixed = [
        ("no authorization", [], {}),
        ("two authorization headers, both right", [token, token], {}),
        ("wrong token", [("authorization", "Bearer nope")], {}),
        ("lower-case scheme", [("authorization", f"bearer {TOKEN}")], {}),
        ("token and a space", [("authorization", f"Bearer {TOKEN} ")], {}),
        ("Basic scheme", [("authorization", "Basic dXNlcjpwYXNz")], {}),
        ("grpc-timeout garbage", [token, ("grpc-timeout", "garbage")], {}),
        ("grpc-timeout negative", [token, ("grpc-timeout", "-1S")], {}),
        ("grpc-timeout without unit", [token, ("grpc-timeout", "1")], {}),
        ("grpc-timeout of centuries", [token, ("grpc-timeout", "99999999H")], {}),
        ("grpc-timeout zero", [token, ("grpc-timeout", "0n")], {}),
        ("binary header not base64", [token, ("x-data-bin", "!!!")], {}),
        ("upper-case header name", [token, ("X-Upper", "v")], {}),
        ("unknown grpc-encoding on a compressed message", [token, ("grpc-encoding", "nope")], {"flag": 1}),
        ("gzip that is not gzip", [token, ("grpc-encoding", "gzip")], {"flag": 1}),
        ("compressed flag, no encoding", [token], {"flag": 1}),
        ("grpc-accept-encoding garbage", [token, ("grpc-accept-encoding", ",,;;junk")], {}),
        ("content-type text/plain", [token], {"content_type": "text/plain"}),
        ("no content-type", [token], {"content_type": None}),
        ("huge header, 1 MB", [token, ("x-big", "a" * 2**20)], {}),
        ("huge header, 8 MB", [token, ("x-big", "a" * 2**23)], {}),
        ("10,000 headers", [token, *[(f"x-h{i}", "v") for i in range(10_000)]], {}),
    ]
    generated = []
    for i in range(max(cases - len(fixed), 0)):
        count, size = int(rng.integers(1, 200)), int(rng.integers(1, 4096))
        headers = [(f"x-{int(rng.integers(1e6))}", "".join(map(chr, rng.integers(32, 127, size))))
                   for _ in range(count)]
        if rng.random() < 0.3:
            headers.append(("authorization", "".join(map(chr, rng.integers(32, 127, int(rng.integers(0, 300)))))))
        else:
            headers.insert(int(rng.integers(len(headers) + 1)), token)
        if rng.random() < 0.3:
            headers.append(("grpc-timeout", "".join(map(chr, rng.integers(32, 127, int(rng.integers(1, 12)))))))
        generated.append((f"generated {i}", headers, {}))
    return (fixed + generated)[:max(cases, len(fixed))]


@pytest.mark.parametrize("cases", reliability_sizes(40, 600))
def test_hostile_headers_get_a_clear_status_and_the_server_keeps_serving(cases, served_process, figures):
    """Hostile metadata on both gRPC doors and hostile headers on REST: every call gets a status that says what
    was wrong (never the server's INTERNAL or a 500), and the server answers normal calls after each."""
    own_path = f"/{pb.DESCRIPTOR.services_by_name['FeatureService'].full_name}/GetBackbone"
    oip_path = f"/{oip_pb.DESCRIPTOR.services_by_name['GRPCInferenceService'].full_name}/ServerLive"
    messages = {own_path: pb.GetBackboneRequest(name="vgg16").SerializeToString(),
                oip_path: oip_pb.ServerLiveRequest().SerializeToString()}
    statuses: dict[str, int] = {}
    server_internal, core_refusals, unanswered = [], 0, []
    for i, (what, headers, options) in enumerate(hostile_grpc_cases(cases)):
        path = (own_path, oip_path)[i % 2]
        got = raw_grpc_call(served_process.grpc_port, path, headers, messages[path], **options)
        code = grpc.StatusCode.__members__.get(next((c.name for c in grpc.StatusCode
                                                     if str(c.value[0]) == got.get("grpc-status")), ""), None)
        if code is None:
            unanswered.append((what, got))
            continue
        statuses[code.name] = statuses.get(code.name, 0) + 1
        if code == grpc.StatusCode.INTERNAL:
            message = got.get("grpc-message", "")
            if message.startswith(GRPC_CORE_REFUSALS):
                core_refusals += 1
            else:
                server_internal.append((what, message))
        if what.startswith(("no authorization", "two authorization", "wrong token", "lower-case", "token and",
                            "Basic")):
            assert code == grpc.StatusCode.UNAUTHENTICATED, (what, got)
    figures.cases("hostile headers, gRPC doors", cases)

    base = f"127.0.0.1:{served_process.http_port}"
    body = json.dumps({"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 2, 2, 3],
                                   "data": list(range(12))}]}).encode()

    def post(*headers: str, payload: bytes = body, path: str = "/v2/models/vgg16/infer") -> bytes:
        lines = [f"POST {path} HTTP/1.1", f"Host: {base}", *headers]
        if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
            lines.append(f"Content-Length: {len(payload)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload

    auth = f"Authorization: Bearer {TOKEN}"
    rest_cases = {
        "no authorization": (post(), 401),
        "two authorization headers": (post(auth, auth), 401),
        "wrong token": (post("Authorization: Bearer nope"), 401),
        "token in latin-1 bytes": (post("Authorization: Bearer \xe9\xe8"), 401),
        "content-type text/plain": (post(auth, "Content-Type: text/plain"), 200),
        "content-type garbage": (post(auth, "Content-Type: ;;;/\x01"), None),
        "gzip body that is not gzip": (post(auth, "Content-Encoding: gzip"), 400),
        "content-encoding garbage": (post(auth, "Content-Encoding: \x7f\x7f"), None),
        "content-length not a number": (post(auth, "Content-Length: abc"), 400),
        # both framings: the body is read as chunked, and never completes: refused once it stops arriving
        "content-length and chunked": (post(auth, f"Content-Length: {len(body)}", "Transfer-Encoding: chunked"), 408),
        "a body that never comes": (post(auth, "Content-Length: 100", payload=b"{"), 408),
        "chunk size garbage": (post(auth, "Transfer-Encoding: chunked", payload=b"zz\r\n" + body + b"\r\n0\r\n\r\n"),
                               None),
        "inference header length garbage": (post(auth, "Inference-Header-Content-Length: -5"), 400),
        "huge header, 1 MB": (post(auth, "X-Big: " + "a" * 2**20), None),
        "2,000 headers": (post(auth, *[f"X-H{i}: v" for i in range(2000)]), None),
        "header without a colon": (post(auth, "garbage header line"), 400),
        "binary in a header value": (post(auth, "X-Bin: \x00\x01\x02"), None),
    }
    rest_statuses: dict[str, int | str] = {}
    for what, (request, expected) in rest_cases.items():
        status = raw_http(served_process.http_port, request)
        rest_statuses[what] = status
        if status == 500:
            server_internal.append((f"REST {what}", status))
        if expected is not None:
            assert status == expected, (what, status)
        else:
            assert isinstance(status, str) or 400 <= status < 500 or status == 200, (what, status)
    figures.cases("hostile headers, REST", len(rest_cases))

    with FeatureClient(served_process.target, token=TOKEN, timeout=30) as client:
        assert client.embed("vgg16", random_images(2, seed=99)).vectors.shape == (2, 512)  # still serving
    assert httpx.get(f"http://{base}/v2/health/ready", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    figures.add(internal_errors=len(server_internal))
    figures.set(hostile_headers_grpc_statuses=dict(sorted(statuses.items())),
                hostile_headers_refused_by_grpc_transport=core_refusals,
                hostile_headers_unanswered=len(unanswered),
                hostile_headers_rest_statuses=rest_statuses)
    assert not server_internal, server_internal
    assert not unanswered, unanswered[:5]
