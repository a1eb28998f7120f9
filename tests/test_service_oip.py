"""The Open Inference Protocol (KServe v2) with the real clients: tritonclient.grpc and tritonclient.http, and plain
JSON over httpx, against one server in this process (VGG16 at 32x32, a saved head); /metrics counts the calls."""

import json
import re
import threading

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from classifiers.persistence import load_head
from conftest import CLASSES, png, random_images, renamed, start_server
from extractor.models import load_backbone
from extractor.serving.client import FeatureClient
from extractor.serving.loaded_models import Catalog
from extractor.serving.rest import HttpServer, metrics_app, rest_app
from protos import grpc_service_pb2 as oip_pb
from protos import grpc_service_pb2_grpc as oip_grpc


class Served:
    """A gRPC server and the REST door on the same core."""

    def __init__(self, grpc_server):
        self.grpc = grpc_server
        self.http = HttpServer(rest_app(grpc_server.service, grpc_server.metrics), port=0)
        self.grpc_target = f"127.0.0.1:{grpc_server.port}"
        self.http_url = f"127.0.0.1:{self.http.port}"

    def stop(self):
        self.http.stop(1)
        self.grpc.stop(grace=1)


@pytest.fixture(scope="module")
def served(spec, heads_dir, tmp_path_factory):
    served = Served(start_server(spec, tmp_path_factory.mktemp("oip") / "store.sqlite", heads_dir=heads_dir))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def own(served):
    with FeatureClient(served.grpc_target, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(served):
    client = triton_grpc.InferenceServerClient(served.grpc_target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http_client(served):
    client = triton_http.InferenceServerClient(served.http_url)
    yield client
    client.close()


def pixels_input(module, images: np.ndarray):
    tensor = module.InferInput("PIXELS", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)
    return tensor


def images_input(module, files: list[bytes]):
    tensor = module.InferInput("IMAGES", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=np.object_))
    return tensor


# --- gRPC ----------------------------------------------------------------------------------------------------

def test_health_and_metadata_over_grpc(grpc_client):
    assert grpc_client.is_server_live() and grpc_client.is_server_ready()
    assert grpc_client.is_model_ready("vgg16") and grpc_client.is_model_ready("lr")
    assert not grpc_client.is_model_ready("orphan")  # its backbone is not served
    assert not grpc_client.is_model_ready("nope") and not grpc_client.is_model_ready("vgg16", "2")
    server = grpc_client.get_server_metadata(as_json=True)
    assert server["name"] == "frozen-features" and "model_repository" in server["extensions"]
    backbone = grpc_client.get_model_metadata("vgg16", as_json=True)
    assert backbone["versions"] == ["1"] and backbone["platform"] == "frozen_features_backbone"
    assert {(t["name"], t["datatype"]) for t in backbone["inputs"]} == {("PIXELS", "UINT8"), ("IMAGES", "BYTES")}
    assert backbone["outputs"] == [{"name": "EMBEDDING", "datatype": "FP32", "shape": ["-1", "512"]}]
    head = grpc_client.get_model_metadata("lr", as_json=True)
    assert [(t["name"], t["datatype"], t["shape"]) for t in head["outputs"]] == [
        ("PROBABILITIES", "FP32", ["-1", "3"]), ("LABEL", "BYTES", ["-1"])]


def test_grpc_embeddings_equal_the_own_api_for_pixels_and_encoded_images(grpc_client, own):
    images = np.stack(random_images(3, seed=21))
    expected = own.embed("vgg16", images).vectors
    result = grpc_client.infer("vgg16", [pixels_input(triton_grpc, images)])
    assert np.array_equal(result.as_numpy("EMBEDDING"), expected)
    files = [png(image) for image in images]
    requested = [triton_grpc.InferRequestedOutput("EMBEDDING")]
    result = grpc_client.infer("vgg16", [images_input(triton_grpc, files)], outputs=requested)
    assert np.array_equal(result.as_numpy("EMBEDDING"), expected)


def test_typed_contents_are_read_as_well_as_raw_ones(served, own):
    image = random_images(1, seed=22)[0]
    expected = own.embed("vgg16", [image]).vectors
    tensor = oip_pb.ModelInferRequest.InferInputTensor(
        name="PIXELS", datatype="UINT8", shape=[1, *image.shape],
        contents=oip_pb.InferTensorContents(uint_contents=image.ravel().tolist()))
    with grpc.insecure_channel(served.grpc_target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(oip_pb.ModelInferRequest(model_name="vgg16", inputs=[tensor]), timeout=30)
        typed_png = oip_pb.ModelInferRequest.InferInputTensor(
            name="IMAGES", datatype="BYTES", shape=[1], contents=oip_pb.InferTensorContents(bytes_contents=[png(image)]))
        again = stub.ModelInfer(oip_pb.ModelInferRequest(model_name="vgg16", inputs=[typed_png]), timeout=30)
    for answer in (response, again):
        assert list(answer.outputs[0].shape) == [1, 512]
        assert np.array_equal(np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(1, 512), expected)


def test_a_heads_probabilities_equal_classify(grpc_client, own, heads_dir):
    images = np.stack(random_images(4, seed=23))
    classified = own.classify("lr", images)
    result = grpc_client.infer("lr", [pixels_input(triton_grpc, images)])
    assert np.array_equal(result.as_numpy("PROBABILITIES"), classified.probabilities)
    assert [label.decode() for label in result.as_numpy("LABEL")] == classified.labels
    assert set(classified.labels) <= set(CLASSES)
    expected = load_head(heads_dir / "lr.skops").predict_proba(own.embed("vgg16", images).vectors)
    assert np.allclose(classified.probabilities, expected, atol=1e-6)


@pytest.mark.parametrize("model, inputs, code, message", [
    ("nope", lambda: [pixels_input(triton_grpc, np.zeros((1, 8, 8, 3), np.uint8))], "StatusCode.NOT_FOUND",
     "unknown model 'nope'"),
    ("vgg16", lambda: [images_input(triton_grpc, [png(np.zeros((8, 8, 3), np.uint8)), b"junk"])],
     "StatusCode.INVALID_ARGUMENT", "image 1: cannot decode"),
    ("vgg16", lambda: [triton_grpc.InferInput("PIXELS", [1, 4, 4, 3], "FP32").set_data_from_numpy(
        np.zeros((1, 4, 4, 3), np.float32))], "StatusCode.INVALID_ARGUMENT", "input 'PIXELS' must be UINT8, got FP32"),
    ("vgg16", lambda: [triton_grpc.InferInput("SOUND", [1], "BYTES").set_data_from_numpy(
        np.array([b"x"], dtype=np.object_))], "StatusCode.INVALID_ARGUMENT", "unknown input 'SOUND'"),
    ("vgg16", lambda: [pixels_input(triton_grpc, np.zeros((65, 4, 4, 3), np.uint8))],
     "StatusCode.RESOURCE_EXHAUSTED", "images per request is 65"),
])
def test_grpc_errors_name_what_was_wrong(grpc_client, model, inputs, code, message):
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.infer(model, inputs())
    assert caught.value.status() == code and message in caught.value.message()
    assert grpc_client.is_model_ready("vgg16")


def test_stream_infer_answers_each_request_and_survives_a_bad_one(grpc_client, own):
    images = np.stack(random_images(2, seed=24))
    answers, done = [], threading.Event()

    def callback(result, error):
        answers.append((result, error))
        if len(answers) == 3:
            done.set()

    grpc_client.start_stream(callback=callback)
    try:
        grpc_client.async_stream_infer("vgg16", [pixels_input(triton_grpc, images[:1])], request_id="a")
        grpc_client.async_stream_infer("nope", [pixels_input(triton_grpc, images[:1])], request_id="b")
        grpc_client.async_stream_infer("vgg16", [pixels_input(triton_grpc, images[1:])], request_id="c")
        assert done.wait(60)
    finally:
        grpc_client.stop_stream()
    expected = own.embed("vgg16", images).vectors
    assert np.array_equal(answers[0][0].as_numpy("EMBEDDING"), expected[:1]) and answers[0][1] is None
    assert answers[1][0] is None and "unknown model 'nope'" in answers[1][1].message()
    assert np.array_equal(answers[2][0].as_numpy("EMBEDDING"), expected[1:])


def test_statistics_count_calls_and_images(grpc_client):
    before = grpc_client.get_inference_statistics("vgg16", as_json=True)["model_stats"][0]
    grpc_client.infer("vgg16", [pixels_input(triton_grpc, np.stack(random_images(3, seed=25)))])
    after = grpc_client.get_inference_statistics("vgg16", as_json=True)["model_stats"][0]
    success = lambda stats: int(stats["inference_stats"]["success"].get("count", 0))  # noqa: E731
    assert success(after) == success(before) + 1
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 3
    names = {s["name"] for s in grpc_client.get_inference_statistics(as_json=True)["model_stats"]}
    assert {"vgg16", "lr"} <= names


# --- REST ----------------------------------------------------------------------------------------------------

def test_rest_with_tritonclient_http_gives_the_same_embedding(http_client, own):
    assert http_client.is_server_live() and http_client.is_server_ready() and http_client.is_model_ready("vgg16")
    assert http_client.get_model_metadata("vgg16")["outputs"][0]["shape"] == [-1, 512]
    images = np.stack(random_images(2, seed=26))
    expected = own.embed("vgg16", images).vectors
    result = http_client.infer("vgg16", [pixels_input(triton_http, images)])  # binary tensors both ways
    assert np.array_equal(result.as_numpy("EMBEDDING"), expected)
    requested = [triton_http.InferRequestedOutput("EMBEDDING", binary_data=False)]  # JSON numbers back
    result = http_client.infer("vgg16", [images_input(triton_http, [png(image) for image in images])],
                               outputs=requested)
    assert np.array_equal(result.as_numpy("EMBEDDING"), expected)
    result = http_client.infer("lr", [pixels_input(triton_http, images)])
    assert np.array_equal(result.as_numpy("PROBABILITIES"), own.classify("lr", images).probabilities)
    stats = http_client.get_inference_statistics("lr")["model_stats"][0]
    assert stats["name"] == "lr" and stats["inference_stats"]["success"]["count"] >= 1


def test_rest_json_as_curl_sends_it(served, own):
    image = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    body = {"inputs": [{"name": "PIXELS", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": image.ravel().tolist()}]}
    response = httpx.post(f"http://{served.http_url}/v2/models/vgg16/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert output["name"] == "EMBEDDING" and output["shape"] == [1, 512]
    assert np.array_equal(np.array(output["data"], np.float32), own.embed("vgg16", [image]).vectors[0])
    assert httpx.get(f"http://{served.http_url}/v2/health/ready").status_code == 200
    index = httpx.post(f"http://{served.http_url}/v2/repository/index", timeout=10).json()
    assert {"name": "vgg16", "version": "1", "state": "READY", "reason": ""} in index


@pytest.mark.parametrize("case, status, message", [
    ("malformed JSON", 400, "malformed JSON"),
    ("wrong datatype", 400, "must be UINT8"),
    ("data does not fill the shape", 400, "11 values do not fill shape [1, 2, 2, 3]"),
    ("binary header length lies", 400, "Inference-Header-Content-Length"),
    ("binary size lies", 400, "runs past"),
    ("unknown model", 404, "unknown model 'nope'"),
    ("unknown version", 404, "unknown version of model 'vgg16'"),
    ("too many images", 413, "images per request is 65"),
    ("no elements, sides too large", 400, "cannot be an array"),
])
def test_rest_errors_have_their_status_and_a_json_error(served, case, status, message):
    url = f"http://{served.http_url}/v2/models/vgg16/infer"
    pixels = {"name": "PIXELS", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": list(range(12))}
    header = json.dumps({"inputs": [{**pixels, "data": None, "parameters": {"binary_data_size": 12}}]}).encode()
    requests = {
        "malformed JSON": dict(content=b"{not json"),
        "wrong datatype": dict(json={"inputs": [{**pixels, "datatype": "FP32"}]}),
        "data does not fill the shape": dict(json={"inputs": [{**pixels, "data": list(range(11))}]}),
        "binary header length lies": dict(content=header + bytes(12),
                                          headers={"Inference-Header-Content-Length": str(len(header) + 100)}),
        "binary size lies": dict(content=header + bytes(5),
                                 headers={"Inference-Header-Content-Length": str(len(header))}),
        "unknown model": dict(json={"inputs": [pixels]}),
        "unknown version": dict(json={"inputs": [pixels]}),
        "too many images": dict(json={"inputs": [{**pixels, "shape": [65, 1, 1, 1], "data": [0] * 65}]}),
        "no elements, sides too large": dict(json={"inputs": [{**pixels, "shape": [0, 2, 2**62], "data": []}]}),
    }
    if case == "unknown model":
        url = url.replace("vgg16", "nope")
    if case == "unknown version":
        url = f"http://{served.http_url}/v2/models/vgg16/versions/7/infer"
    response = httpx.post(url, timeout=30, **requests[case])
    assert response.status_code == status and message in response.json()["error"], response.text


# --- model control and metrics -----------------------------------------------------------------------------

def scrape(served) -> dict[tuple[str, str], float]:
    """{(metric name, labels text): value} of /metrics."""
    text = httpx.get(f"http://{served.http_url}/metrics", timeout=10).text
    samples = {}
    for line in text.splitlines():
        match = re.match(r"^(\w+)(\{[^}]*\})? (\S+)$", line)
        if match:
            samples[(match.group(1), match.group(2) or "")] = float(match.group(3))
    return samples


def requests_counted(samples, model: str, protocol: str, status: str) -> float:
    return samples.get(("extractor_requests_total", f'{{model="{model}",protocol="{protocol}",status="{status}"}}'), 0)


def test_metrics_count_exactly_the_calls_made(served, grpc_client, http_client, own):
    before = scrape(served)
    images = np.stack(random_images(2, seed=27))
    for _ in range(3):
        grpc_client.infer("vgg16", [pixels_input(triton_grpc, images)])
    for _ in range(2):
        http_client.infer("vgg16", [pixels_input(triton_http, images)])
    own.embed("vgg16", images)
    with pytest.raises(InferenceServerException):
        grpc_client.infer("nope", [pixels_input(triton_grpc, images)])
    after = scrape(served)
    moved = lambda *labels: requests_counted(after, *labels) - requests_counted(before, *labels)  # noqa: E731
    assert moved("vgg16", "oip-grpc", "OK") == 3
    assert moved("vgg16", "oip-http", "200") == 2
    assert moved("vgg16", "grpc", "OK") == 1
    assert moved("nope", "oip-grpc", "NOT_FOUND") == 1
    hits = ("extractor_cache_hits_total", '{model="vgg16"}')
    misses = ("extractor_cache_misses_total", '{model="vgg16"}')
    assert after[misses] - before.get(misses, 0) == 2 and after[hits] - before.get(hits, 0) == 10
    assert after[("extractor_models_loaded", "")] == 1 and after[("extractor_store_bytes", "")] > 0
    for protocol in ("grpc", "oip-grpc", "oip-http"):  # every call counted in flight has left
        assert after[("extractor_requests_in_flight", f'{{protocol="{protocol}"}}')] == 0
    for name in ("extractor_batch_size_count", "extractor_queue_seconds_count", "extractor_compute_seconds_count"):
        assert after[(name, '{model="vgg16"}')] >= 1


def test_metrics_on_a_port_of_their_own(served):
    alone = HttpServer(metrics_app(served.grpc.metrics))
    try:
        text = httpx.get(f"http://127.0.0.1:{alone.port}/metrics", timeout=10).text
        assert "extractor_models_loaded 1.0" in text
        assert httpx.get(f"http://127.0.0.1:{alone.port}/v2/health/ready", timeout=10).status_code == 404
    finally:
        alone.stop(1)


def test_load_and_unload_with_tritonclient(spec, tmp_path, heads_dir):
    """A model is unloaded and loaded again over both doors; a model that fails to load is UNAVAILABLE with its
    reason and the others keep serving."""
    def loader(s):
        if s.name == "broken":
            raise OSError("weights file missing")
        return load_backbone(s)

    catalog = Catalog(names=lambda: ["vgg16", "broken"], spec=lambda name: spec if name == "vgg16" else
                      renamed(spec, "broken"))
    served = Served(start_server(spec, tmp_path / "store.sqlite", heads_dir=heads_dir, catalog=catalog,
                                 backbone_loader=loader))
    grpc_client = triton_grpc.InferenceServerClient(served.grpc_target)
    http_client = triton_http.InferenceServerClient(served.http_url)
    images = np.stack(random_images(1, seed=28))
    try:
        index = {m["name"]: m for m in grpc_client.get_model_repository_index(as_json=True)["models"]}
        assert index["vgg16"]["state"] == "READY" and index["broken"]["state"] == "UNAVAILABLE"
        with pytest.raises(InferenceServerException) as caught:
            grpc_client.load_model("broken")
        assert "weights file missing" in caught.value.message()
        assert grpc_client.infer("vgg16", [pixels_input(triton_grpc, images)]).as_numpy("EMBEDDING").shape == (1, 512)
        index = {m["name"]: m for m in http_client.get_model_repository_index()}
        assert index["broken"] == {"name": "broken", "version": "1", "state": "UNAVAILABLE",
                                   "reason": "weights file missing"}

        grpc_client.unload_model("vgg16")
        assert not grpc_client.is_model_ready("vgg16") and not http_client.is_model_ready("lr")
        with pytest.raises(InferenceServerException) as caught:
            grpc_client.infer("vgg16", [pixels_input(triton_grpc, images)])
        assert caught.value.status() == "StatusCode.UNAVAILABLE" and "unloaded" in caught.value.message()
        with pytest.raises(InferenceServerException) as caught:
            http_client.infer("vgg16", [pixels_input(triton_http, images)])
        assert caught.value.status() == "503"
        http_client.load_model("vgg16")
        assert grpc_client.is_model_ready("vgg16") and http_client.is_model_ready("lr")
        assert http_client.infer("vgg16", [pixels_input(triton_http, images)]).as_numpy("EMBEDDING").shape == (1, 512)
        with pytest.raises(InferenceServerException) as caught:
            http_client.load_model("../../etc/passwd")
        assert caught.value.status() == "404"
    finally:
        grpc_client.close()
        http_client.close()
        served.stop()


JSON = st.recursive(st.none() | st.booleans() | st.integers(-300, 2**33) | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
                    max_leaves=20)
TENSOR = st.fixed_dictionaries({"name": st.sampled_from(["PIXELS", "IMAGES", "X"]),
                                "datatype": st.sampled_from(["UINT8", "BYTES", "FP32", "NOPE"]),
                                "shape": st.lists(st.integers(-2, 5), max_size=5)},
                               optional={"data": JSON, "parameters": st.fixed_dictionaries(
                                   {"binary_data_size": st.integers(-1, 20) | JSON})})


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(JSON, st.fixed_dictionaries({"inputs": st.lists(TENSOR, max_size=3)}, optional={
    "outputs": JSON, "parameters": JSON, "id": JSON})), tail=st.binary(max_size=24), header=st.booleans())
def test_rest_never_answers_500_to_a_clients_mistake(served, body, tail, header):
    content = json.dumps(body).encode()
    headers = {"Inference-Header-Content-Length": str(len(content))} if header else {}
    for path in ("/v2/models/vgg16/infer", "/v2/models/lr/infer", "/v2/repository/index"):
        response = httpx.post(f"http://{served.http_url}{path}", content=content + (tail if header else b""),
                              headers=headers, timeout=30)
        assert response.status_code in (200, 400, 404, 413), response.text
        assert "error" in response.json() or response.status_code == 200


GRPC_TENSOR = st.builds(
    lambda name, datatype, shape, values: oip_pb.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=shape,
        contents=oip_pb.InferTensorContents(**({"bytes_contents": values} if datatype == "BYTES" else
                                               {"uint_contents": [v % 2**32 for v in map(len, values)]}))),
    st.sampled_from(["PIXELS", "IMAGES", ""]), st.sampled_from(["UINT8", "BYTES", "FP32", "INT64", "?"]),
    st.lists(st.integers(-3, 4), max_size=5), st.lists(st.binary(max_size=6), max_size=8))


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=st.sampled_from(["vgg16", "lr", "nope"]), inputs=st.lists(GRPC_TENSOR, max_size=2),
       raw=st.none() | st.lists(st.binary(max_size=40), max_size=3), outputs=st.lists(st.sampled_from(
           ["EMBEDDING", "LABEL", "X"]), max_size=2))
def test_grpc_infer_never_answers_internal_to_a_clients_mistake(served, model, inputs, raw, outputs):
    request = oip_pb.ModelInferRequest(
        model_name=model, inputs=inputs, raw_input_contents=raw or [],
        outputs=[oip_pb.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in outputs])
    with grpc.insecure_channel(served.grpc_target) as channel:
        try:
            oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                  grpc.StatusCode.RESOURCE_EXHAUSTED), exc.details()
