"""Admission by budget: declared sizes refused before decoding, the per-request and server-wide budgets of decoded
pixels, large requests decoded and embedded in slices, what each door answers (own gRPC, OIP gRPC, REST), and
compressed-image bombs against a served process, whose memory follows the budget rather than the requests."""

import functools
import json
import struct
import threading
import time
import zlib

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from conftest import png, random_images, reliability_sizes, start_server
from test_service_core import FakeBackbone, image, make_service, raw  # noqa: F401  (make_service: a fixture)
from test_service_load import ServedProcess
from extractor.embedder import Embedder
from extractor.errors import BudgetBusyError, LimitExceededError
from extractor.models import load_backbone
from extractor.serving import requests as serving_requests
from extractor.serving.client import FeatureClient
from extractor.serving.oip import join_bytes
from extractor.serving.requests import Call, Limits, RawPixels, StreamRequest
from extractor.serving.rest import HttpServer, rest_app
from extractor.store import EmbeddingStore
from protos import feature_service_pb2 as pb
from protos import feature_service_pb2_grpc as pb_grpc

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_rows(width: int, height: int, first_row: bytes, rows: bytes) -> bytes:
    """An 8-bit RGB PNG from its compressed scanlines (each: a filter byte, then the row)."""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(first_row + rows, 9)) + _chunk(b"IEND", b""))


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares `width` x `height` with a few bytes of data behind: a bomb before decoding."""
    return png_of_rows(width, height, b"\x00" + bytes(30), b"")


def bomb_png(side: int, seed: int) -> bytes:
    """A real `side` x `side` RGB PNG of a few KB to a few hundred: every row the same (filter "Up", so every
    row after the first is zeros), channels unequal so that it decodes to 3 bytes a pixel, `seed` in blue."""
    x = np.arange(side)
    pixels = np.stack([x % 256, (3 * x + seed) % 256, np.full(side, seed % 256)], -1).astype(np.uint8)
    first = b"\x00" + pixels.tobytes()
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    zeros, zeros_adler = _zero_rows(side)
    adler = zlib.adler32(first)  # the checksum of the whole, from the first row's and the zero rows' own ones
    adler = _adler_combine(adler, zeros_adler, (3 * side + 1) * (side - 1))
    data = b"\x78\xda" + head.compress(first) + head.flush(zlib.Z_FULL_FLUSH) + zeros + \
        zlib.compressobj(9, zlib.DEFLATED, -15).flush() + struct.pack(">I", adler)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))


@functools.lru_cache
def _zero_rows(side: int) -> tuple[bytes, int]:
    """The `side` - 1 all-zero "Up" rows of `bomb_png` as raw deflate blocks (not final, byte-aligned, so
    they follow any such blocks), and their adler32; made once per side."""
    row = b"\x02" + bytes(3 * side)
    compressor, out, adler = zlib.compressobj(9, zlib.DEFLATED, -15), [], 1
    for _ in range(side - 1):
        out.append(compressor.compress(row))
        adler = zlib.adler32(row, adler)
    return b"".join(out) + compressor.flush(zlib.Z_FULL_FLUSH), adler


def _adler_combine(first: int, second: int, second_length: int) -> int:
    """adler32 of two byte strings joined, from each one's adler32 (zlib's adler32_combine)."""
    base = 65521
    a1, b1, a2, b2 = first & 0xFFFF, first >> 16, second & 0xFFFF, second >> 16
    a = (a1 + a2 - 1) % base
    b = (b1 + b2 + (second_length % base) * a1 - (second_length % base)) % base
    return (b << 16) | a


@pytest.fixture
def decoded(monkeypatch) -> list[bytes]:
    """The encoded images the service decodes, in order."""
    seen = []
    real = serving_requests.decode_image

    def spy(data, max_pixels):
        seen.append(data)
        return real(data, max_pixels)
    monkeypatch.setattr(serving_requests, "decode_image", spy)
    return seen


# --- the core ---------------------------------------------------------------------------------------------------

def test_a_header_declaring_100k_by_100k_pixels_is_refused_before_any_pixel_is_decoded(make_service, decoded):
    service = make_service(FakeBackbone(512))
    bomb, small = png_declaring(100_000, 100_000), png(image(9))
    outcome = service.embed("vgg16", [raw(image(1)), bomb, small])
    assert [(index, str(error)) for index, error in outcome.errors] == [
        (1, "image 1: decoded pixels per image is 10000000000, over the limit of 16777216")]
    assert outcome.ok.tolist() == [True, False, True] and decoded == [small]
    with pytest.raises(LimitExceededError, match="image 0: decoded pixels per image is 10000000000"):
        service.embed("vgg16", [bomb, small], all_or_nothing=True)
    assert decoded == [small]


def test_a_request_over_its_pixel_budget_is_refused_before_decoding(make_service, decoded):
    service = make_service(FakeBackbone(512), limits=Limits(max_decoded_pixels=32 * 32, max_request_pixels=3 * 32 * 32))
    files = [png(image(i, 32)) for i in range(4)]
    with pytest.raises(LimitExceededError, match="decoded pixels per request is 4096, over the limit of 3072"):
        service.embed("vgg16", [raw(image(9, 32)), *files[:3]])
    assert decoded == []
    # An image refused on its own counts for nothing
    outcome = service.embed("vgg16", [*files[:3], png_declaring(1000, 1000)])
    assert outcome.ok.tolist() == [True, True, True, False] and decoded == files[:3]


def test_a_batch_of_no_pixels_is_counted_before_its_images_are_listed(make_service):
    service = make_service(FakeBackbone(512))
    with pytest.raises(LimitExceededError, match="images per request is 2147483648"):
        service.embed("vgg16", [], batch=RawPixels(b"", (2**31, 0, 3), "uint8"))


def test_the_server_budget_makes_a_request_wait_until_another_finishes(make_service):
    backbone = FakeBackbone(512)
    service = make_service(backbone, limits=Limits(max_decoded_pixels=64 * 64, max_pixels_in_flight=64 * 64))
    backbone.gate.clear()
    results = {}
    first = threading.Thread(target=lambda: results.update(first=service.embed("vgg16", [raw(image(1, 64))])))
    first.start()
    while service.budget.held == 0:
        time.sleep(0.01)
    second = threading.Thread(target=lambda: results.update(second=service.embed(
        "vgg16", [raw(image(2, 64))], call=Call(time.monotonic() + 30))))
    second.start()
    time.sleep(0.3)
    assert second.is_alive() and service.budget.held == 64 * 64 and backbone.calls == []
    backbone.gate.set()
    first.join(10)
    second.join(10)
    assert results["first"].vectors[0, 0] == 1 and results["second"].vectors[0, 0] == 2
    assert backbone.calls == [1, 1] and service.budget.held == 0


def test_a_request_that_cannot_get_its_share_in_time_fails_naming_the_server_budget(make_service):
    service = make_service(FakeBackbone(512), limits=Limits(max_pixel_wait_seconds=2.0))
    held = service.budget.reserve(service.budget.capacity, None)
    started = time.monotonic()
    with pytest.raises(BudgetBusyError, match=r"decoded pixels in flight \(server-wide budget\): this request's 64 "
                                              r"did not fit within the budget of 67108864 after waiting 2\.[0-4] s"):
        service.embed("vgg16", [raw(image(1))])  # no deadline: max_pixel_wait_seconds
    assert 2.0 <= time.monotonic() - started < 3
    started = time.monotonic()
    with pytest.raises(BudgetBusyError):  # a deadline sooner than that: it gives up a little before it
        service.embed("vgg16", [raw(image(1))], call=Call(time.monotonic() + 1.0))
    assert 0.85 <= time.monotonic() - started < 1.0
    held.release()
    assert service.embed("vgg16", [raw(image(1))]).ok.all() and service.budget.held == 0


def test_a_large_request_is_embedded_in_slices_with_the_vectors_of_one_call(make_service):
    sliced_backbone, whole_backbone = FakeBackbone(512), FakeBackbone(512)
    sliced = make_service(sliced_backbone, limits=Limits(max_decoded_pixels=2 * 16 * 16,
                                                         max_pixels_in_flight=2 * 16 * 16))
    whole = make_service(whole_backbone)
    pictures = random_images(8, seed=3, size=16)
    images = [raw(pictures[0]), png(pictures[1]), png(pictures[2]), b"junk", raw(pictures[3]),
              png_declaring(5000, 5000), *map(png, pictures[4:])]
    most_held = []
    reserve = sliced.budget.reserve
    sliced.budget.reserve = lambda *args: (most_held.append(sliced.budget.held + args[0]), reserve(*args))[1]
    expected = whole.embed("vgg16", images)
    outcome = sliced.embed("vgg16", images)
    np.testing.assert_array_equal(outcome.vectors, expected.vectors)
    assert outcome.keys == expected.keys and outcome.ok.tolist() == expected.ok.tolist()
    assert [(i, type(e)) for i, e in outcome.errors] == [(i, type(e)) for i, e in expected.errors] and \
        [i for i, _ in outcome.errors] == [3, 5]
    assert whole_backbone.calls == [8] and sliced_backbone.calls == [2, 2, 2, 2] and max(most_held) <= 2 * 16 * 16
    # A stream's requests are sliced the same way; error indices count from the stream's first image
    streamed = list(sliced.embed_stream([StreamRequest("vgg16", images[:5]), StreamRequest("", images[5:])]))
    np.testing.assert_array_equal(np.concatenate([o.vectors for o in streamed]), expected.vectors)
    assert [i for o in streamed for i, _ in o.errors] == [3, 5] and sliced.budget.held == 0


# --- the doors -------------------------------------------------------------------------------------------------

DOOR_LIMITS = Limits(max_images_per_request=64, max_decoded_pixels=64 * 64, max_request_pixels=4 * 64 * 64,
                     max_pixels_in_flight=4 * 64 * 64, max_pixel_wait_seconds=0.3)
# Each door's answer to a bomb, to a request over its own budget, and to the server's budget held by others.
CASES = {"per image": [png_declaring(100_000, 100_000)],
         "per request": [png(image(i, 64) + np.arange(3, dtype=np.uint8)) for i in range(5)],
         "server-wide": [png(image(1, 32) + np.arange(3, dtype=np.uint8))]}
MESSAGES = {"per image": "image 0: decoded pixels per image is 10000000000, over the limit of 4096",
            "per request": "decoded pixels per request is 20480, over the limit of 16384",
            "server-wide": "decoded pixels in flight (server-wide budget): this request's 1024 did not fit"}
HTTP_STATUS = {"per image": 413, "per request": 413, "server-wide": 429}


@pytest.fixture(scope="module")
def doors(spec, tmp_path_factory):
    server = start_server(spec, tmp_path_factory.mktemp("budgets") / "store.sqlite", limits=DOOR_LIMITS)
    http = HttpServer(rest_app(server.service, server.metrics), port=0)
    yield server, f"http://127.0.0.1:{http.port}"
    http.stop(1)
    server.stop(grace=1)


@pytest.fixture
def busy_when(doors):
    """`busy_when(case)`: the server-wide budget held by someone else for the "server-wide" case."""
    held = []

    def hold(case: str) -> None:
        if case == "server-wide":
            budget = doors[0].service.budget
            held.append(budget.reserve(budget.capacity, None))
    yield hold
    for reservation in held:
        reservation.release()


@pytest.mark.parametrize("case", CASES)
def test_own_grpc_answers_resource_exhausted_naming_the_budget(doors, busy_when, case):
    busy_when(case)
    with grpc.insecure_channel(f"127.0.0.1:{doors[0].port}") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.FeatureServiceStub(channel).Embed(pb.EmbedRequest(
                backbone="vgg16", images=[pb.Image(encoded=data) for data in CASES[case]], all_or_nothing=True),
                timeout=30)
    assert caught.value.code() == EXHAUSTED and MESSAGES[case] in caught.value.details()


@pytest.mark.parametrize("case", CASES)
def test_oip_grpc_answers_resource_exhausted_naming_the_budget(doors, busy_when, case):
    busy_when(case)
    client = triton_grpc.InferenceServerClient(f"127.0.0.1:{doors[0].port}")
    files = triton_grpc.InferInput("IMAGES", [len(CASES[case])], "BYTES")
    files.set_data_from_numpy(np.array(CASES[case], dtype=np.object_))
    try:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("vgg16", [files], client_timeout=30)
    finally:
        client.close()
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED" and MESSAGES[case] in caught.value.message()


@pytest.mark.parametrize("case", CASES)
def test_rest_answers_413_over_a_requests_own_budget_and_429_while_the_server_is_busy(doors, busy_when, case):
    busy_when(case)
    data = join_bytes(CASES[case])
    header = json.dumps({"inputs": [{"name": "IMAGES", "datatype": "BYTES", "shape": [len(CASES[case])],
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    response = httpx.post(f"{doors[1]}/v2/models/vgg16/infer", content=header + data, timeout=30,
                          headers={"Inference-Header-Content-Length": str(len(header))})
    assert response.status_code == HTTP_STATUS[case] and MESSAGES[case] in response.json()["error"]
    assert response.headers.get("retry-after") == ("1" if case == "server-wide" else None)


def test_get_backbone_shows_the_budgets_and_a_sliced_request_gives_the_vectors_of_one_call(doors, spec, tmp_path):
    pictures = random_images(10, seed=11)  # 32 x 32: 4 to a slice of 64 x 64 pixels
    reference = Embedder(spec, EmbeddingStore(tmp_path / "reference.sqlite"), load_backbone(spec)).embed(pictures)
    with grpc.insecure_channel(f"127.0.0.1:{doors[0].port}") as channel:
        stub = pb_grpc.FeatureServiceStub(channel)
        limits = stub.GetBackbone(pb.GetBackboneRequest(name="vgg16"), timeout=30).limits
        response = stub.Embed(pb.EmbedRequest(backbone="vgg16", images=[pb.Image(encoded=png(p)) for p in pictures]),
                              timeout=60)
    assert (limits.max_decoded_pixels, limits.max_request_pixels, limits.max_pixels_in_flight,
            limits.max_pixel_wait_seconds) == (4096, 16384, 16384, pytest.approx(0.3))
    vectors = np.frombuffer(response.vectors.data, "<f4").reshape(10, -1)
    np.testing.assert_array_equal(vectors, reference.vectors)
    assert response.keys == b"".join(reference.keys)


def test_the_client_splits_a_call_to_the_servers_pixel_budget_per_request(doors):
    pictures = random_images(9, seed=12, size=64)  # 4 to a request of at most 4 x 64 x 64 pixels
    with FeatureClient(f"127.0.0.1:{doors[0].port}", timeout=60) as client:
        as_files = client.embed("vgg16", [png(p) for p in pictures])
        as_arrays = client.embed("vgg16", pictures)
        stacked = client.embed("vgg16", np.stack(pictures))
    assert not as_files.errors and not as_arrays.errors and not stacked.errors
    np.testing.assert_array_equal(as_files.vectors, as_arrays.vectors)
    np.testing.assert_array_equal(stacked.vectors, as_arrays.vectors)


# --- bombs against a served process ----------------------------------------------------------------------------

BOMB_BUDGET_PIXELS = 32 * 2**20  # two 4096 x 4096 images at a time, 96 MiB as RGB


def bomb_figures(served: ServedProcess, http_url: str, sides: list[int], per_request: int, clients: int) -> dict:
    """`clients` at once, one per door in turn, each sending a request of `per_request` bombs of every side
    (those over the per-image limit refused by their header); the server's resident memory sampled meanwhile."""
    before, peak_before = served.status()["rss"], served.status()["peak_rss"]
    most = [before]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.02):
            most.append(served.status()["rss"])
    answers: list[tuple[str, int, object]] = []
    wire = [0]

    def client(number: int) -> None:
        door = ("own gRPC", "OIP gRPC", "REST")[number % 3]
        for side in sides:
            files = [bomb_png(side, number * 1000 + side % 997 + i) for i in range(per_request)]
            wire[0] += sum(map(len, files))
            answers.append((door, side, send(door, served.target, http_url, files)))
    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - started
    sampling.set()
    sampler.join()
    peak = served.status()["peak_rss"]  # the kernel's high-water mark catches a peak between samples
    growth = max(max(most), peak if peak > peak_before else 0) - before
    return {"answers": answers, "growth": growth, "seconds": seconds, "wire": wire[0]}


def send(door: str, target: str, http_url: str, files: list[bytes]):
    """The door's answer to one request of encoded images: "ok", or the status/code and message."""
    if door == "own gRPC":
        with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 2**30)]) as channel:
            try:
                response = pb_grpc.FeatureServiceStub(channel).Embed(pb.EmbedRequest(
                    backbone="vgg16", images=[pb.Image(encoded=data) for data in files]), timeout=600)
            except grpc.RpcError as exc:
                return exc.code().name, exc.details()
            if not response.errors:
                return "ok", ""
            first = response.errors[0]  # a per-image error: its code and message
            return next(c.name for c in grpc.StatusCode if c.value[0] == first.code), first.message
    if door == "OIP gRPC":
        client = triton_grpc.InferenceServerClient(target)
        tensor = triton_grpc.InferInput("IMAGES", [len(files)], "BYTES")
        tensor.set_data_from_numpy(np.array(files, dtype=np.object_))
        try:
            client.infer("vgg16", [tensor], client_timeout=600)
        except InferenceServerException as exc:
            return exc.status().removeprefix("StatusCode."), exc.message()
        finally:
            client.close()
        return "ok", ""
    data = join_bytes(files)
    header = json.dumps({"inputs": [{"name": "IMAGES", "datatype": "BYTES", "shape": [len(files)],
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    response = httpx.post(f"{http_url}/v2/models/vgg16/infer", content=header + data, timeout=600,
                          headers={"Inference-Header-Content-Length": str(len(header))})
    return ("ok", "") if response.status_code == 200 else (str(response.status_code), response.json()["error"])


@pytest.mark.parametrize("size", reliability_sizes(
    {"sides": [1024, 2048, 8192], "per_request": 4, "clients": 3},
    {"sides": [1024, 2048, 3072, 4096, 8192], "per_request": 24, "clients": 3}))
def test_compressed_image_bombs_grow_the_server_by_its_budget_not_by_the_requests(size, tmp_path, data_dir, figures):
    served = ServedProcess(tmp_path, data_dir, "--http-port", "0", "--max-pixels-in-flight", str(BOMB_BUDGET_PIXELS),
                           "--max-request-pixels", str(2**31), "--max-pixel-wait-s", "600")
    try:
        http_url = "http://" + served.process.stdout.readline().split()[-1]
        # Warm up every door and the decoder, so that what grows afterwards is the bombs' pixels
        for door in ("own gRPC", "OIP gRPC", "REST"):
            assert send(door, served.target, http_url, [bomb_png(512, 1), png(random_images(1, 2)[0])])[0] == "ok"
        measured = bomb_figures(served, http_url, **size)
        assert served.process.poll() is None
    finally:
        served.process.kill()
        served.process.wait()
    budget_mb = BOMB_BUDGET_PIXELS * 3 / 2**20
    growth_mb = measured["growth"] / 2**20
    refused = [(door, side, answer) for door, side, answer in measured["answers"] if answer[0] != "ok"]
    # Sides over the per-image limit (4096 x 4096) are refused by their header, at every door
    assert {(door, side) for door, side, _ in refused} == {(door, side) for door, side, _ in measured["answers"]
                                                           if side * side > 16 * 2**20}
    assert all(code in ("RESOURCE_EXHAUSTED", "413") and "decoded pixels per image" in message
               for _, _, (code, message) in refused), refused
    decoded_mb = sum(side * side * 3 * size["per_request"] for _, side, (code, _) in measured["answers"]
                     if code == "ok") / 2**20
    figures.set(bomb_budget_mb=round(budget_mb), bomb_rss_growth_mb=round(growth_mb),
                bomb_growth_over_budget=round(growth_mb / budget_mb, 2), bomb_requests=len(measured["answers"]),
                bomb_images=len(measured["answers"]) * size["per_request"], bomb_sides=size["sides"],
                bomb_clients=size["clients"], bomb_refused_by_header=len(refused),
                bomb_wire_mb=round(measured["wire"] / 2**20, 1), bomb_decoded_mb=round(decoded_mb),
                bomb_seconds=round(measured["seconds"], 1))
    # A pixel in flight is 3 bytes held, Pillow's own copy (4 bytes a pixel) is beside it while an image is
    # decoded or resized, and the allocator keeps some of what was freed: a few times the budget, where the
    # full size's decoded pixels are 60 times it.
    assert growth_mb < 5 * budget_mb + 64, measured
