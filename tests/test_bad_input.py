"""Bad input, generated: every RPC and every reader answers with its documented error, never INTERNAL or a crash.

All the generated calls go to one server in this process (port 0). Readers and decoders are called
directly. Each test has a short size (`make test`) and a full one (`make test-reliability`), whose case
counts add up to the `cases_tried` of benchmarks/results/reliability.json.
"""

import contextlib
import io
import json
import math
import os
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path
from urllib.parse import quote

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from conftest import CLASSES, LIMITS, MAX_MESSAGE_BYTES, process_status, random_images, reliability_sizes, start_server
from extractor.serving.client import tensor
from extractor.datasets import IMAGE_SUFFIXES, Dataset, open_dataset
from extractor.errors import ExtractorError, InvalidInputError, LimitExceededError
from extractor.images import DEFAULT_MAX_PIXELS, canonical_pixels, decode_image
from extractor.serving.oip import join_bytes
from extractor.serving.rest import HttpServer, rest_app
from protos import feature_service_pb2 as pb
from protos import grpc_service_pb2 as oip_pb

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DOCUMENTED = {INVALID, NOT_FOUND, EXHAUSTED}  # what bad input may get; never INTERNAL
IMAGE_ERROR_CODES = {INVALID.value[0], EXHAUSTED.value[0]}
BACKBONE, HEAD, DIM = "vgg16", "lr", 512
MAX_PIXELS = LIMITS.max_decoded_pixels
# Peak memory a test may add. The server decodes at most MAX_PIXELS an image; local readers up to
# DEFAULT_MAX_PIXELS (64M), two at a time, a few bytes a pixel. A decoded 60000x60000 bomb needs 10 GB.
SERVER_PEAK_GROWTH = 512 * 2**20
READER_PEAK_GROWTH = 3 * 2**30
SERVICE = pb.DESCRIPTOR.services_by_name["FeatureService"]
OIP_SERVICE = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # damaged files: Pillow warns, then refuses


def run_cases(target: str, cases: int, strategy, check, figures) -> None:
    """`check` every one of `cases` examples drawn from `strategy` (derandomized); count them for the report."""
    tried = 0

    @settings(max_examples=cases, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(example):
        nonlocal tried
        tried += 1
        check(example)

    try:
        run()
    finally:
        figures.cases(target, tried)


@contextlib.contextmanager
def peak_memory_bounded(figures, bound: int = SERVER_PEAK_GROWTH):
    """Inside: the process's peak resident memory grows by less than `bound` bytes."""
    before = process_status()["peak_rss"]
    yield
    growth = process_status()["peak_rss"] - before
    figures.set(peak_memory_growth_mb=max(figures.values.get("peak_memory_growth_mb", 0), growth >> 20))
    assert growth < bound, f"peak memory grew by {growth >> 20} MiB"


@contextlib.contextmanager
def reader_contract(figures):
    """Inside: a reader either returns or raises a documented `ExtractorError`; anything else is a crash."""
    try:
        yield
    except ExtractorError:
        pass
    except AssertionError:
        raise
    except Exception:
        figures.add(crashes=1)
        raise


# --- what bad input looks like -------------------------------------------------------------------------------

FORMATS_AND_MODES = [("PNG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P"), ("PNG", "I;16"), ("PNG", "1"),
                     ("PNG", "LA"), ("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"), ("GIF", "P"), ("BMP", "RGB"),
                     ("TIFF", "RGB"), ("TIFF", "F"), ("TIFF", "CMYK"), ("WEBP", "RGB"), ("PPM", "RGB"), ("PPM", "L"),
                     # formats the readers refuse
                     ("ICO", "RGBA"), ("TGA", "RGB"), ("DDS", "RGBA"), ("EPS", "RGB"), ("PCX", "RGB")]


def encode(pixels: np.ndarray, fmt: str, mode: str) -> bytes:
    if mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    elif mode == "F":
        image = Image.fromarray(pixels[..., 0].astype(np.float32) / 255)
    else:
        image = Image.fromarray(pixels).convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@st.composite
def image_files(draw) -> bytes:
    """Small real image files, one pixel and up, in every format and mode (some that readers refuse)."""
    fmt, mode = draw(st.sampled_from(FORMATS_AND_MODES))
    height, width, seed = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(0, 2**16))
    return encode(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), fmt, mode)


@st.composite
def damaged_files(draw) -> bytes:
    """Real image files truncated, with bytes flipped or inserted, or with a random tail after their header."""
    data = bytearray(draw(image_files()))
    how = draw(st.sampled_from(["truncate", "flip", "insert", "tail"]))
    at = draw(st.integers(0, len(data) - 1))
    if how == "truncate":
        return bytes(data[:at])
    if how == "flip":
        data[at] ^= draw(st.integers(1, 255))
        return bytes(data)
    if how == "insert":
        return bytes(data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:])
    return bytes(data[:min(at, 40)]) + draw(st.binary(max_size=200))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _patched(fmt: str, mode: str, patch) -> bytes:
    data = bytearray(encode(random_images(1, 0, size=8)[0], fmt, mode))
    patch(data)
    return bytes(data)


def _tiff(width: int, height: int, offsets_type: int = 4) -> bytes:
    """A grayscale TIFF declaring `width` x `height`, its strip offsets tagged as LONG (4) or `offsets_type`."""
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, offsets_type, 1, 8 + 2 + 12 * 8 + 4), (278, 4, 1, height), (279, 4, 1, 16)]
    directory = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + bytes(4)
    return b"II*\x00" + struct.pack("<I", 8) + directory + bytes(16)


def _webp(width: int, height: int) -> bytes:
    chunk = b"VP8X" + struct.pack("<I", 10) + bytes(4) + (width - 1).to_bytes(3, "little") + \
        (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def _gif_sides(data: bytearray, width: int, height: int) -> None:
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen, then the first image
    at = data.index(b"\x2c", 13)
    data[at + 5:at + 9] = struct.pack("<HH", width, height)


def _bmp_sides(data: bytearray, width: int, height: int) -> None:
    data[18:26] = struct.pack("<ii", width, height)


def _jpeg_sides(data: bytearray, width: int, height: int) -> None:
    at = data.index(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", height, width)


# How each format's header declares its size: (largest side it can declare, file declaring width x height).
DECLARED = {
    "PNG": (2**31 - 1, lambda w, h: b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(bytes(64))) + _png_chunk(b"IEND", b"")),
    "JPEG": (65535, lambda w, h: _patched("JPEG", "RGB", lambda d: _jpeg_sides(d, w, h))),
    "GIF": (65535, lambda w, h: _patched("GIF", "P", lambda d: _gif_sides(d, w, h))),
    "BMP": (2**31 - 1, lambda w, h: _patched("BMP", "RGB", lambda d: _bmp_sides(d, w, h))),
    "PPM": (10**10 - 1, lambda w, h: f"P6\n{w} {h}\n255\n".encode() + bytes(30)),
    "TIFF": (2**32 - 1, _tiff),
    "WEBP": (2**24, _webp),
}


@st.composite
def declared_sizes(draw) -> tuple[str, int, int, bytes]:
    """(format, width, height, file): headers declaring any size, decompression bombs (60000 x 60000 and beyond)
    among them, zero-size and one-pixel ones too, with a few bytes of data behind."""
    fmt = draw(st.sampled_from(sorted(DECLARED)))
    largest, make = DECLARED[fmt]
    side = st.one_of(st.just(60000), st.integers(0 if fmt in ("PNG", "PPM", "TIFF") else 1, largest))
    width, height = draw(side), draw(side)
    return fmt, width, height, make(width, height)


encoded_images = st.one_of(image_files(), damaged_files(), declared_sizes().map(lambda d: d[3]),
                           st.binary(max_size=512), st.just(b""))

SIDES = st.one_of(st.integers(0, 40), st.sampled_from([2**16, 2**31, 2**32 - 1]))
DTYPES = ["uint8", "", "float32", "float64", "float16", "int16", "int64", "bool", "complex64", "object", "<U8",
          "uint8 ", "<u1", "x" * 300]


@st.composite
def tensors(draw, batch: bool = False) -> pb.Tensor:
    """Pixel tensors of every shape and dtype; their data fits the shape, falls short, overflows, or holds
    floats with NaN and infinities."""
    ndim = draw(st.sampled_from([3, 4, 3, 4, 0, 1, 2, 5] if batch else [2, 3, 3, 0, 1, 4, 5]))
    shape = draw(st.lists(SIDES, min_size=ndim, max_size=ndim))
    if batch and ndim >= 3 and draw(st.booleans()):
        shape = [draw(st.integers(0, 70)), *(min(side, 12) for side in shape[1:])]
    size = math.prod(shape)
    fill = draw(st.sampled_from(["fits", "fits", "short", "long", "floats"]))
    if fill == "fits" and size <= 600_000:
        data = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 256, size, np.uint8).tobytes()
    elif fill == "floats":
        floats = draw(hnp.arrays(np.float32, draw(st.integers(0, 64)),
                                 elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
        return pb.Tensor(data=floats.tobytes(), shape=shape, dtype=draw(st.sampled_from(["float32", "uint8"])))
    else:
        data = draw(st.binary(max_size=300))
    return pb.Tensor(data=data, shape=shape, dtype=draw(st.sampled_from(DTYPES)))


image_messages = st.one_of(encoded_images.map(lambda data: pb.Image(encoded=data)),
                           tensors().map(lambda tensor: pb.Image(pixels=tensor)), st.just(pb.Image()))

ODD_NAMES = st.one_of(
    st.sampled_from(["", "../../x", "..", ".", "/etc/passwd", "vgg16/../vgg16", "VGG16", " vgg16", "vgg16\x00",
                     "vgg16\n", "%2e%2e%2f", "\u202evgg16", "vgg\uff11\uff16", "\U0001f642", "lr.joblib", "../lr",
                     "C:\\heads\\lr", "lr;rm -rf /"]),
    st.text(max_size=30), st.integers(1000, 40000).map(lambda n: "\u00e9" * n))


@st.composite
def image_requests(draw, names) -> dict:
    """The fields of an Embed or Classify request: a name, images, maybe a batch, maybe over the size limit."""
    fields = {"images": draw(st.lists(image_messages, max_size=6)), "all_or_nothing": draw(st.booleans()),
              "name": draw(names)}
    if draw(st.booleans()):
        fields["batch"] = draw(tensors(batch=True))
    if draw(st.integers(0, 19)) == 0:
        fields["images"].append(pb.Image(encoded=bytes(MAX_MESSAGE_BYTES)))
    return fields


def allowed_codes(request, name_ok: bool) -> set:
    """The statuses the documentation allows for an Embed or Classify request."""
    if request.ByteSize() > MAX_MESSAGE_BYTES:
        return {EXHAUSTED}
    if not name_ok:
        return {NOT_FOUND}
    count = len(request.images)
    if request.HasField("batch"):
        batch = request.batch
        if batch.dtype not in ("uint8", "") or len(batch.shape) not in (3, 4) or \
                math.prod(batch.shape) != len(batch.data):
            return {INVALID}
        if not batch.data:  # no pixels: sides too large for an array are refused as such
            return {INVALID, EXHAUSTED, OK}
        count += batch.shape[0]
    if count > LIMITS.max_images_per_request:
        return {EXHAUSTED}
    return {OK, INVALID, EXHAUSTED} if request.all_or_nothing else {OK}


def request_count(request) -> int:
    return len(request.images) + (request.batch.shape[0] if request.HasField("batch") else 0)


def checked_rows(matrix: pb.Matrix, errors, count: int, dim: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The (count, dim) rows of a response, checked against its per-image errors, and which failed. Error indices
    count from the call's first image: `offset` is where this response's first image is (streams)."""
    assert (matrix.rows, matrix.dim) == (count, dim)
    rows = np.frombuffer(matrix.data, "<f4").reshape(count, dim)
    failed = [error.index for error in errors]
    assert failed == sorted(set(failed)) and all(offset <= index < offset + count for index in failed)
    assert all(e.code in IMAGE_ERROR_CODES and e.message.startswith(f"image {e.index}: ") for e in errors), errors
    bad = np.zeros(count, dtype=bool)
    bad[[index - offset for index in failed]] = True
    assert np.isnan(rows[bad]).all() and np.isfinite(rows[~bad]).all()
    return rows, bad


def checked_embedding(response: pb.EmbedResponse, count: int) -> None:
    _, bad = checked_rows(response.vectors, response.errors, count, DIM, response.offset)
    keys = np.frombuffer(response.keys, np.uint8).reshape(count, 32)
    assert len(response.cached) == count and not keys[bad].any()


# --- the server under fire -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(spec, heads_dir, tmp_path_factory):
    server = start_server(spec, tmp_path_factory.mktemp("fuzzed") / "store.sqlite", heads_dir=heads_dir,
                          max_wait=0.002)
    yield server
    server.stop(grace=1)


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel


@pytest.fixture(scope="module")
def stored(channel) -> dict[bytes, np.ndarray]:
    """Vectors the server holds, by content key."""
    images = [pb.Image(pixels=tensor(image)) for image in random_images(3, seed=42)]
    response = rpc(channel, "Embed")(pb.EmbedRequest(backbone=BACKBONE, images=images), timeout=60)
    vectors = np.frombuffer(response.vectors.data, "<f4").reshape(3, DIM)
    return {response.keys[i * 32:(i + 1) * 32]: vectors[i] for i in range(3)}


def rpc(channel, method: str, service=SERVICE, messages=pb):
    """A callable for one method of the service (or of the Open Inference Protocol's), taking and returning
    messages."""
    descriptor = service.methods_by_name[method]
    request, response = (getattr(messages, d.name) for d in (descriptor.input_type, descriptor.output_type))
    make = channel.stream_stream if descriptor.client_streaming else channel.unary_unary
    return make(f"/{service.full_name}/{method}", request.SerializeToString, response.FromString)


def outcome(call, figures):
    """(result, status code) of `call()`; INTERNAL and undocumented statuses are counted before failing."""
    try:
        return call(), OK
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.INTERNAL:
            figures.add(internal_errors=1)
        elif code not in DOCUMENTED:
            figures.add(crashes=1)
        assert code in DOCUMENTED, f"{code.name}: {exc.details()}"
        assert "Traceback" not in exc.details()
        return None, code


@pytest.fixture
def still_serving(channel, figures):
    """After the test: health says SERVING and a good image is embedded."""
    yield
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    response = rpc(channel, "Embed")(pb.EmbedRequest(backbone=BACKBONE, images=[
        pb.Image(pixels=tensor(random_images(1, seed=7)[0]))]), timeout=60)
    if health.status != health_pb2.HealthCheckResponse.SERVING or response.errors:
        figures.add(crashes=1)
    assert health.status == health_pb2.HealthCheckResponse.SERVING and not response.errors


@pytest.mark.parametrize("cases", reliability_sizes(40, 2000))
def test_embed(cases, channel, figures, still_serving):
    embed = rpc(channel, "Embed")

    def check(fields):
        name = fields.pop("name")
        request = pb.EmbedRequest(backbone=name, **fields)
        response, code = outcome(lambda: embed(request, timeout=120), figures)
        assert code in allowed_codes(request, name == BACKBONE)
        if code == OK:
            checked_embedding(response, request_count(request))

    with peak_memory_bounded(figures):
        run_cases("Embed", cases, image_requests(st.one_of(st.just(BACKBONE), ODD_NAMES)), check, figures)


@pytest.mark.parametrize("cases", reliability_sizes(30, 1000))
def test_classify(cases, channel, figures, still_serving):
    classify = rpc(channel, "Classify")

    def check(fields):
        name = fields.pop("name")
        request = pb.ClassifyRequest(head=name, **fields)
        response, code = outcome(lambda: classify(request, timeout=120), figures)
        assert code in allowed_codes(request, name == HEAD)
        if code == OK:
            probabilities, bad = checked_rows(response.probabilities, response.errors, request_count(request),
                                              len(CLASSES))
            np.testing.assert_allclose(probabilities[~bad].sum(axis=1), 1, atol=1e-4)
            assert [label in CLASSES for label in response.labels] == list(~bad)

    with peak_memory_bounded(figures):
        run_cases("Classify", cases, image_requests(st.one_of(st.sampled_from([HEAD, "orphan"]), ODD_NAMES)),
                  check, figures)


@pytest.mark.parametrize("cases", reliability_sizes(15, 400))
def test_embed_stream(cases, channel, figures, still_serving):
    stream = rpc(channel, "EmbedStream")
    names = st.one_of(st.just(BACKBONE), st.just(""), ODD_NAMES)

    def check(all_fields):
        requests, allowed, backbone = [], [], ""
        for fields in all_fields:
            name = fields.pop("name")
            backbone = name or backbone
            requests.append(pb.EmbedRequest(backbone=name, **fields))
            allowed.append(allowed_codes(requests[-1], backbone == BACKBONE))
        responses = []
        _, code = outcome(lambda: responses.extend(stream(iter(requests), timeout=120)), figures)
        assert len(responses) <= len(requests)
        offset = 0
        for request, response in zip(requests, responses):
            assert response.offset == offset
            checked_embedding(response, request_count(request))
            offset += request_count(request)
        if code == OK:
            assert len(responses) == len(requests)
        else:  # a later request failed it; one refused by the transport may drop answers before it
            assert code in set().union(*allowed[len(responses):])

    with peak_memory_bounded(figures):
        run_cases("EmbedStream", cases, st.lists(image_requests(names), max_size=4), check, figures)


@pytest.mark.parametrize("cases", reliability_sizes(40, 1500))
def test_get_embeddings(cases, channel, stored, figures, still_serving):
    get = rpc(channel, "GetEmbeddings")
    known = sorted(stored)
    key_parts = st.lists(st.one_of(st.sampled_from(known), st.binary(min_size=32, max_size=32),
                                   st.binary(max_size=40)), max_size=70)

    def check(example):
        name, parts = example
        keys = b"".join(parts)
        response, code = outcome(lambda: get(pb.GetEmbeddingsRequest(backbone=name, keys=keys), timeout=60), figures)
        count = len(keys) // 32
        expected = NOT_FOUND if name != BACKBONE else INVALID if len(keys) % 32 else \
            EXHAUSTED if count > LIMITS.max_images_per_request else OK
        assert code == expected
        if code == OK:
            wanted = [keys[i * 32:(i + 1) * 32] for i in range(count)]
            assert list(response.found) == [key in stored for key in wanted]
            vectors = np.frombuffer(response.vectors.data, "<f4").reshape(count, DIM)
            for key, vector in zip(wanted, vectors):
                assert np.array_equal(vector, stored[key]) if key in stored else np.isnan(vector).all()

    run_cases("GetEmbeddings", cases, st.tuples(st.one_of(st.just(BACKBONE), ODD_NAMES), key_parts), check, figures)


@pytest.mark.parametrize("cases", reliability_sizes(30, 1000))
def test_get_backbone(cases, channel, figures, still_serving):
    get = rpc(channel, "GetBackbone")
    huge = st.just("x" * MAX_MESSAGE_BYTES)

    def check(name):
        response, code = outcome(lambda: get(pb.GetBackboneRequest(name=name), timeout=30), figures)
        assert code == (EXHAUSTED if len(name) >= MAX_MESSAGE_BYTES else OK if name == BACKBONE else NOT_FOUND)
        if code == OK:
            assert response.output_dim == DIM and response.limits.max_decoded_pixels == MAX_PIXELS

    run_cases("GetBackbone", cases, st.one_of(st.just(BACKBONE), ODD_NAMES, huge), check, figures)


@pytest.mark.parametrize("cases", reliability_sizes(60, 2000))
def test_random_bytes_to_every_method(cases, channel, figures, still_serving):
    """Request messages that are random bytes: refused as INVALID_ARGUMENT when they do not parse."""
    def check(example):
        method, messages = example
        descriptor = SERVICE.methods_by_name[method]
        path = f"/{SERVICE.full_name}/{method}"
        if descriptor.client_streaming:
            call = lambda: list(channel.stream_stream(path)(iter(messages), timeout=60))  # noqa: E731
        else:
            call = lambda: channel.unary_unary(path)(messages[0], timeout=60)  # noqa: E731
        _, code = outcome(call, figures)
        request_type = getattr(pb, descriptor.input_type.name)
        parses = True
        for message in messages if descriptor.client_streaming else messages[:1]:
            try:
                request_type.FromString(message)
            except DecodeError:
                parses = False
                break
        if not parses:
            assert code in ({INVALID, NOT_FOUND, EXHAUSTED} if descriptor.client_streaming else {INVALID})

    methods = st.sampled_from([method.name for method in SERVICE.methods])
    run_cases("every method, random bytes", cases,
              st.tuples(methods, st.lists(st.binary(max_size=300), min_size=1, max_size=3)), check, figures)


# --- the Open Inference Protocol's doors: the same generated images over OIP gRPC and REST ------------------

OIP_DATATYPES = ["UINT8", "BYTES", "FP32", "INT64", "UINT16", "BOOL", "?"]
OIP_ERRORS = {INVALID, NOT_FOUND, EXHAUSTED}
HTTP_ERRORS = {400, 404, 413}  # what a client's mistake may get over REST; never 500


@pytest.fixture(scope="module")
def http_url(server):
    """The REST door on the fuzzed server's core."""
    http = HttpServer(rest_app(server.service, server.metrics), port=0)
    yield f"http://127.0.0.1:{http.port}"
    http.stop(1)


@st.composite
def oip_inputs(draw) -> tuple[str, str, list[int], bytes]:
    """(name, datatype, shape, raw contents) of one input: IMAGES of generated files, PIXELS of generated tensors
    of any shape, either one mislabelled, or anything at all."""
    kind = draw(st.sampled_from(["IMAGES", "IMAGES", "PIXELS", "PIXELS", "anything"]))
    if kind == "IMAGES":
        files = draw(st.lists(encoded_images, max_size=6))
        shape = draw(st.one_of(st.just([len(files)]), st.lists(st.integers(-1, 7), max_size=3)))
        datatype = draw(st.sampled_from(["BYTES", "BYTES", *OIP_DATATYPES]))
        return "IMAGES", datatype, shape, join_bytes(files)
    if kind == "PIXELS":
        tensor = draw(tensors(batch=True))
        return "PIXELS", draw(st.sampled_from(["UINT8", "UINT8", *OIP_DATATYPES])), list(tensor.shape), tensor.data
    return (draw(st.sampled_from(["PIXELS", "IMAGES", "EMBEDDING", ""])), draw(st.sampled_from(OIP_DATATYPES)),
            draw(st.lists(st.one_of(st.integers(-2, 40), st.sampled_from([2**31, 2**62])), max_size=4)),
            draw(st.binary(max_size=300)))


def oip_requests(names) -> st.SearchStrategy:
    """(model name, inputs, outputs asked for) of an inference request."""
    return st.tuples(st.one_of(st.sampled_from([BACKBONE, HEAD]), names),
                     st.lists(oip_inputs(), min_size=1, max_size=2),
                     st.lists(st.sampled_from(["EMBEDDING", "PROBABILITIES", "LABEL", "X"]), max_size=2))


def checked_outputs(model: str, outputs: dict[str, np.ndarray]) -> None:
    """A successful inference's outputs: finite vectors or probabilities, one row per image."""
    for name, array in outputs.items():
        if name in ("EMBEDDING", "PROBABILITIES"):
            assert array.shape[1] == (DIM if name == "EMBEDDING" else len(CLASSES)) and np.isfinite(array).all()


@pytest.mark.parametrize("cases", reliability_sizes(25, 300))
def test_oip_grpc_infer(cases, channel, figures, still_serving):
    """ModelInfer with generated inputs: the protocol's documented codes (a bad image fails the call), never
    INTERNAL."""
    import tritonclient.grpc as triton_grpc

    infer = rpc(channel, "ModelInfer", OIP_SERVICE, oip_pb)

    def check(example):
        model, inputs, wanted = example
        request = oip_pb.ModelInferRequest(
            model_name=model, inputs=[oip_pb.ModelInferRequest.InferInputTensor(name=n, datatype=d, shape=shape)
                                      for n, d, shape, _ in inputs],
            raw_input_contents=[raw for *_, raw in inputs],
            outputs=[oip_pb.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in wanted])
        response, code = outcome(lambda: infer(request, timeout=120), figures)
        assert code in OIP_ERRORS | {OK}
        if code == OK:
            result = triton_grpc.InferResult(response)
            checked_outputs(model, {output.name: result.as_numpy(output.name) for output in response.outputs})

    run_cases("ModelInfer (OIP gRPC)", cases, oip_requests(ODD_NAMES), check, figures)


@pytest.mark.parametrize("cases", reliability_sizes(25, 300))
def test_rest_infer(cases, http_url, figures, still_serving):
    """/v2/models/{name}/infer with generated inputs as binary tensors, or JSON values when small: 200 or a
    client error with a JSON message, never 500; the door keeps serving."""
    def check(example):
        model, inputs, wanted = example
        entries, data = [], b""
        for name, datatype, shape, raw in inputs:
            entry = {"name": name, "datatype": datatype, "shape": shape}
            if datatype == "UINT8" and len(raw) <= 64:
                entry["data"] = list(raw)
            else:
                entry["parameters"] = {"binary_data_size": len(raw)}
                data += raw
            entries.append(entry)
        body = {"inputs": entries, **({"outputs": [{"name": name} for name in wanted]} if wanted else {})}
        header = json.dumps(body).encode()
        response = httpx.post(f"{http_url}/v2/models/{quote(model, safe='')}/infer", content=header + data,
                              headers={"Inference-Header-Content-Length": str(len(header))}, timeout=120)
        if response.status_code >= 500:
            figures.add(internal_errors=1)
        assert response.status_code in HTTP_ERRORS | {200}, response.text
        if response.status_code != 200:  # a path that names no model ("", "a/b") is the router's own 404
            assert response.json().get("error") or response.status_code == 404, response.text
            assert "Traceback" not in response.text
        else:
            length = int(response.headers.get("inference-header-content-length", len(response.content)))
            result = json.loads(response.content[:length])
            checked_outputs(model, {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"])
                                    for o in result["outputs"] if "data" in o and o["datatype"] == "FP32"})

    try:
        # Names short enough for a URL's path: a 40,000-character one is the HTTP server's to refuse, not the door's
        run_cases("REST infer", cases, oip_requests(ODD_NAMES.filter(lambda name: len(name) < 1000)), check, figures)
    finally:
        assert httpx.get(f"{http_url}/v2/health/ready", timeout=30).status_code == 200


# --- readers and decoders ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cases", reliability_sizes(60, 2500))
def test_decode_image(cases, figures):
    def check(data):
        with reader_contract(figures):
            pixels = decode_image(data, MAX_PIXELS)
            assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] in (1, 3)
            assert 0 < pixels.shape[0] * pixels.shape[1] <= MAX_PIXELS

    with peak_memory_bounded(figures):
        run_cases("decode_image", cases, encoded_images, check, figures)


@pytest.mark.parametrize("cases", reliability_sizes(25, 500))
def test_declared_sizes_over_the_limit_are_refused_before_decoding(cases, figures):
    def check(example):
        fmt, width, height, data = example
        with reader_contract(figures):
            try:
                pixels = decode_image(data, MAX_PIXELS)
            except LimitExceededError:
                assert width * height > MAX_PIXELS
                return
            except InvalidInputError:  # libwebp refuses a header with no image behind it before Pillow sees its size
                assert width * height <= MAX_PIXELS or fmt == "WEBP"
                return
            assert pixels.shape[:2] == (height, width)

    with peak_memory_bounded(figures):
        run_cases("decode_image, declared sizes", cases, declared_sizes(), check, figures)


def test_a_60000_square_bomb_is_refused_at_the_default_limit():
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "PPM", "TIFF", "WEBP"):
        with pytest.raises(LimitExceededError):
            decode_image(DECLARED[fmt][1](60000, 60000), DEFAULT_MAX_PIXELS)


def test_a_tiff_whose_strip_offsets_are_text_is_invalid_input():
    """Found by the full run: Pillow raised TypeError loading it, which reached clients as INTERNAL."""
    with pytest.raises(InvalidInputError, match="cannot decode image"):
        decode_image(_tiff(2, 2, offsets_type=2), MAX_PIXELS)


ARRAY_DTYPES = st.sampled_from([np.uint8, np.uint8, np.float32, np.float64, np.int16, np.uint16, np.int8, np.bool_])


@pytest.mark.parametrize("cases", reliability_sizes(30, 1500))
def test_canonical_pixels(cases, figures):
    arrays = st.one_of(
        hnp.arrays(ARRAY_DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)),
        st.one_of(st.none(), st.binary(max_size=8), st.lists(st.integers(0, 255), max_size=4)))

    def check(array):
        with reader_contract(figures):
            pixels = canonical_pixels(array)
            assert isinstance(array, np.ndarray) and array.dtype in (np.uint8, np.uint16)
            assert pixels.flags.c_contiguous and pixels.dtype == np.uint8 and pixels.shape[2] in (1, 3)
            channels = array.reshape(*array.shape[:2], -1)[..., :3]
            if array.dtype == np.uint16:
                channels = (channels >> 8).astype(np.uint8)
            assert np.array_equal(np.broadcast_to(pixels, channels.shape), channels)  # gray RGB stays one channel

    run_cases("canonical_pixels", cases, arrays, check, figures)


def checked_reading(dataset: Dataset, limit: int | None = None) -> None:
    """Every item of `dataset` (its first `limit`) is read as canonical pixels or skipped with its reason."""
    assert isinstance(dataset, Dataset)
    read = 0
    for batch in dataset.batches(4, limit):
        read += len(batch.images)
        assert all(image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] in (1, 3) for image in batch.images)
        assert all(0 <= label < len(dataset.class_names) for label in batch.labels)
    total = len(dataset) if limit is None else min(limit, len(dataset))
    assert read + len(dataset.skipped) == total and all(s.reason for s in dataset.skipped)


SPEC_KINDS = ["mnist", "cifar10", "folder", "npz", "", "MNIST", "http", "npz ", "file"]
SPEC_TARGETS = ["train", "test", "big", "big-test", "small", "small-test", "", "../../x", "/", "/dev", "/dev/null",
                "/dev/zero", "/proc/self/status", "/etc/passwd", "~", "\u00e9", "nul\x00l"]
SPEC_OPTIONS = ["n=5", "n=0", "n=-1", "n=abc", "n", "=3", "&", "seed=99999999999999999999", "per_class=100000",
                "per_class=2", "seed=-1", "source=http", "n=5&n=6", "n=5&seed=1&x=2", "n=1e3", "n=%35"]


@pytest.mark.parametrize("cases", reliability_sizes(20, 400))
def test_data_specs(cases, figures):
    specs = st.builds(lambda kind, sep, target, options: kind + sep + target + (f"?{options}" if options else ""),
                      st.sampled_from(SPEC_KINDS), st.sampled_from([":", ":", "", "::"]),
                      st.one_of(st.sampled_from(SPEC_TARGETS), st.text(max_size=12)),
                      st.one_of(st.none(), st.sampled_from(SPEC_OPTIONS), st.text(max_size=12)))

    def check(spec):
        with reader_contract(figures):
            checked_reading(open_dataset(spec), limit=4)

    run_cases("open_dataset specs", cases, specs, check, figures)


def _npy_declaring(shape: tuple) -> bytes:
    """A .npy file whose header declares `shape` (uint8) with 64 bytes of data behind it."""
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': %r, }" % (shape,)
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(64)


@st.composite
def npz_files(draw) -> bytes:
    """npz files with x, y and class_names of every dtype and shape, some missing, some pickled, truncated,
    or declaring arrays far larger than they hold."""
    if draw(st.integers(0, 9)) == 0:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as archive:
            archive.writestr("x.npy", _npy_declaring(draw(st.sampled_from([(10**12, 1, 1), (10**6, 100, 100, 3)]))))
            archive.writestr("y.npy", _npy_declaring((3,)))
        return out.getvalue()
    arrays = {}
    if draw(st.integers(0, 7)):
        arrays["x"] = draw(hnp.arrays(ARRAY_DTYPES, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=5)))
    if draw(st.integers(0, 7)):
        arrays["y"] = draw(hnp.arrays(st.sampled_from([np.int64, np.int8, np.uint64, np.float64, np.bool_]),
                                      hnp.array_shapes(min_dims=0, max_dims=2, min_side=0, max_side=6)))
    names = draw(st.sampled_from(["none", "fitting", "few", "scalar", "matrix", "pickled"]))
    if names != "none":
        listed = {"fitting": ["a", "b", "c", "d", "e", "f"], "few": ["a"], "scalar": "a",
                  "matrix": [["a", "b"], ["c", "d"]], "pickled": [{"a": 1}]}[names]
        arrays["class_names"] = np.array(listed, dtype=object if names == "pickled" else None)
    out = io.BytesIO()
    np.savez(out, **arrays)
    data = out.getvalue()
    return data[:draw(st.integers(0, len(data)))] if draw(st.integers(0, 5)) == 0 else data


@pytest.mark.parametrize("cases", reliability_sizes(20, 500))
def test_npz_reader(cases, figures):
    def check(data):
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "data.npz"
            path.write_bytes(data)
            with reader_contract(figures), peak_memory_bounded(figures, READER_PEAK_GROWTH):
                checked_reading(open_dataset(f"npz:{path}"))

    run_cases("npz reader", cases, npz_files(), check, figures)


FILE_NAMES = st.builds(lambda stem, suffix: stem + suffix,
                       st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)), max_size=8),
                       st.sampled_from(sorted(IMAGE_SUFFIXES) + [".PNG", ".txt", ""]))
FILE_CONTENTS = st.one_of(encoded_images, st.sampled_from(["fifo", "/dev/zero", "directory", "dangling"]))


@pytest.mark.parametrize("cases", reliability_sizes(12, 300))
def test_folder_reader(cases, figures):
    """Class folders with odd names holding damaged files, bombs, FIFOs, links to /dev/zero, folders named x.png."""
    class_names = st.one_of(st.sampled_from(["cats", ".hidden", "x.png", " ", "\u00e9t\u00e9", "\U0001f642", "..."]),
                            st.text(st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
                                    min_size=1, max_size=8).filter(lambda name: name not in (".", "..")))
    trees = st.dictionaries(class_names, st.dictionaries(FILE_NAMES, FILE_CONTENTS, max_size=4), max_size=3)

    def check(tree):
        with tempfile.TemporaryDirectory() as folder:
            for class_name, files in tree.items():
                (Path(folder) / class_name).mkdir()
                for name, content in files.items():
                    path = Path(folder) / class_name / name
                    if name in ("", ".", ".."):
                        continue
                    if content == "fifo":
                        os.mkfifo(path)
                    elif content in ("/dev/zero", "dangling"):
                        path.symlink_to(content if content == "/dev/zero" else Path(folder) / "missing")
                    elif content == "directory":
                        path.mkdir()
                    else:
                        path.write_bytes(content)
            with reader_contract(figures), peak_memory_bounded(figures, READER_PEAK_GROWTH):
                checked_reading(open_dataset(f"folder:{folder}"))

    run_cases("folder reader", cases, trees, check, figures)
