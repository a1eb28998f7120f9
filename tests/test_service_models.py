"""Run-time model control: loading one model does not stall the others, unloading lets in-flight calls finish, a
failed load is UNAVAILABLE with its reason; over the own gRPC API too. Fake backbones: no TensorFlow."""

import threading
import time

import grpc
import numpy as np
import pytest

from conftest import renamed, start_server
from extractor.errors import NotReadyError, UnknownNameError
from extractor.serving.client import FeatureClient, RemoteError
from extractor.serving.loaded_models import Catalog, ModelLoadFailed, ModelState
from extractor.serving.requests import RawPixels
from extractor.serving.service import FeatureService
from extractor.store import EmbeddingStore
from protos import feature_service_pb2 as pb


class GatedBackbone:
    """A vector per image from its pixels; `gate` holds every call until it is set."""

    def __init__(self, dim: int):
        self.dim = self.output_dim = dim
        self.gate = threading.Event()
        self.gate.set()

    def embed(self, images):
        self.gate.wait(30)
        return np.stack([np.resize(image.astype(np.float32).ravel(), self.dim) for image in images])


def pixels(value: int) -> RawPixels:
    return RawPixels(np.full((8, 8, 3), value, np.uint8).tobytes(), (8, 8, 3), "uint8")


class Repository:
    """A catalog of `vgg16`, `slow` (its build waits for `release`) and `broken` (its build fails)."""

    def __init__(self, spec):
        self.specs = {name: renamed(spec, name) for name in ("vgg16", "slow", "broken")}
        self.backbones = {name: GatedBackbone(spec.output_dim) for name in self.specs}
        self.release = threading.Event()
        self.released: list[str] = []
        self.catalog = Catalog(names=lambda: list(self.specs), spec=self.specs.__getitem__,
                               release=lambda s: self.released.append(s.name))

    def load(self, spec):
        if spec.name == "broken":
            raise OSError("model file is not there")
        if spec.name == "slow":
            self.release.wait(30)
        return self.backbones[spec.name]


@pytest.fixture
def repository(spec):
    return Repository(spec)


@pytest.fixture
def service(repository, tmp_path):
    service = FeatureService([repository.specs["vgg16"]], EmbeddingStore(tmp_path / "store.sqlite"),
                             catalog=repository.catalog, backbone_loader=repository.load, max_wait=0.0)
    service.start()
    yield service
    repository.release.set()
    service.close()


def states(service) -> dict[str, tuple[ModelState, str]]:
    return {status.name: (status.state, status.reason) for status in service.list_models()}


def test_loading_one_model_does_not_stall_calls_to_another(service, repository):
    assert states(service) == {"vgg16": (ModelState.READY, ""), "slow": (ModelState.UNAVAILABLE, "not loaded"),
                               "broken": (ModelState.UNAVAILABLE, "not loaded")}
    loading = threading.Thread(target=service.load_model, args=("slow",))
    loading.start()
    while states(service)["slow"][0] != ModelState.LOADING:
        time.sleep(0.001)
    started = time.monotonic()
    for value in range(5):
        assert service.embed("vgg16", [pixels(value)]).ok.all()
    assert time.monotonic() - started < 5
    with pytest.raises(NotReadyError, match="backbone 'slow' is LOADING"):
        service.embed("slow", [pixels(1)])
    repository.release.set()
    loading.join(30)
    assert states(service)["slow"] == (ModelState.READY, "")
    assert service.embed("slow", [pixels(1)]).ok.all()


def test_unloading_lets_calls_in_flight_finish_and_refuses_new_ones(service, repository):
    backbone = repository.backbones["vgg16"]
    backbone.gate.clear()
    in_flight = service.begin_embed("vgg16", [pixels(7)])  # queued behind the closed gate
    unloading = threading.Thread(target=service.unload_model, args=("vgg16",))
    unloading.start()
    time.sleep(0.2)
    assert unloading.is_alive()  # waiting for the call in flight
    assert states(service)["vgg16"] == (ModelState.UNAVAILABLE, "unloaded")
    with pytest.raises(NotReadyError, match="unloaded"):
        service.embed("vgg16", [pixels(8)])
    backbone.gate.set()
    outcome = in_flight.result()
    assert outcome.ok.all() and outcome.vectors[0, 0] == 7
    unloading.join(30)
    assert not unloading.is_alive() and repository.released == ["vgg16"]
    service.load_model("vgg16")
    assert service.embed("vgg16", [pixels(8)]).ok.all()


def test_a_failed_load_is_unavailable_with_its_reason_and_the_rest_keep_serving(service):
    with pytest.raises(ModelLoadFailed, match="model 'broken' failed to load: model file is not there"):
        service.load_model("broken")
    assert states(service)["broken"] == (ModelState.UNAVAILABLE, "model file is not there")
    assert service.embed("vgg16", [pixels(3)]).ok.all()
    for name in ("../vgg16", "/etc/passwd", "vgg16.keras", ""):
        with pytest.raises(UnknownNameError, match="unknown model repository entry"):
            service.load_model(name)


def test_model_control_over_the_own_grpc_api(spec, repository, tmp_path):
    server = start_server(repository.specs["vgg16"], tmp_path / "store.sqlite", catalog=repository.catalog,
                          backbone_loader=repository.load)
    repository.release.set()
    try:
        with FeatureClient(f"127.0.0.1:{server.port}") as client:
            listed = {m.name: (m.state, m.reason) for m in client.models()}
            assert listed == {"vgg16": (pb.ModelStatus.READY, ""), "slow": (pb.ModelStatus.UNAVAILABLE, "not loaded"),
                              "broken": (pb.ModelStatus.UNAVAILABLE, "not loaded")}
            assert client.load_model("slow").state == pb.ModelStatus.READY
            assert client.embed("slow", [np.zeros((8, 8, 3), np.uint8)]).vectors.shape == (1, spec.output_dim)
            with pytest.raises(RemoteError) as caught:
                client.load_model("broken")
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE and "model file is not there" in caught.value.details
            with pytest.raises(RemoteError) as caught:
                client.load_model("../../etc/passwd")
            assert caught.value.code == grpc.StatusCode.NOT_FOUND
            status = client.unload_model("slow")
            assert (status.state, status.reason) == (pb.ModelStatus.UNAVAILABLE, "unloaded")
            with pytest.raises(RemoteError) as caught:
                client.embed("slow", [np.zeros((8, 8, 3), np.uint8)])
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
            assert {b.name for b in client.backbones()} == {"vgg16"}
    finally:
        server.stop(grace=1)


def test_the_serving_core_imports_nothing_from_classifiers_and_classifiers_not_the_extractor_cli():
    import subprocess
    import sys

    code = ("import sys, extractor.serving.service, extractor.serving.oip, classifiers.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('classifiers.') and m != 'classifiers.cli'), "
            "'extractor.cli' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")[0]
    assert out == "[] False"
