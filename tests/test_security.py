"""Security: the token on every RPC (health and reflection too), TLS, altered heads refused, names that cannot
leave their folder, loopback unless told otherwise."""

import pickle
import shutil
import ssl
import subprocess
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from classifiers.persistence import save_head
from conftest import CLASSES, fitted_head, random_images, start_server
from extractor import paths
from extractor.cli import build_parser
from extractor.serving.client import FeatureClient, RemoteError
from extractor.errors import ChecksumError
from extractor.store import EmbeddingStore
from extractor.serving.rest import HttpServer, rest_app
from protos import feature_service_pb2 as pb
from protos import grpc_service_pb2 as oip_pb

TOKEN = "s3cret-token"
SERVICES = [pb.DESCRIPTOR.services_by_name["FeatureService"], health_pb2.DESCRIPTOR.services_by_name["Health"],
            reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
            oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]]
EVERY_METHOD = [pytest.param(service, method, id=f"{service.name}.{method.name}")
                for service in SERVICES for method in service.methods]


@pytest.fixture(scope="module")
def guarded_server(spec, heads_dir, tmp_path_factory):
    server = start_server(spec, tmp_path_factory.mktemp("guarded") / "store.sqlite", heads_dir=heads_dir, token=TOKEN)
    yield server
    server.stop(grace=1)


def status_of_a_call(channel, service, method, metadata) -> grpc.StatusCode:
    """The status of `method` called with an empty request message (a stream's first message), or OK once
    a first response arrives."""
    path = f"/{service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            make = channel.stream_stream if method.client_streaming else channel.unary_stream
            responses = make(path)(iter([b""]) if method.client_streaming else b"", metadata=metadata, timeout=10)
            next(responses)
            responses.cancel()
        else:
            make = channel.stream_unary if method.client_streaming else channel.unary_unary
            make(path)(b"", metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("service, method", EVERY_METHOD)
def test_every_rpc_needs_the_token(guarded_server, service, method):
    with grpc.insecure_channel(f"127.0.0.1:{guarded_server.port}") as channel:
        for refused in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            assert status_of_a_call(channel, service, method, refused) == grpc.StatusCode.UNAUTHENTICATED
        accepted = status_of_a_call(channel, service, method, (("authorization", f"Bearer {TOKEN}"),))
    assert accepted != grpc.StatusCode.UNAUTHENTICATED


REST_CALLS = [("GET", "/v2/health/live"), ("GET", "/v2/health/ready"), ("GET", "/v2"), ("GET", "/v2/models/vgg16"),
              ("GET", "/v2/models/vgg16/ready"), ("GET", "/v2/models/stats"), ("POST", "/v2/models/vgg16/infer"),
              ("POST", "/v2/repository/index"), ("POST", "/v2/repository/models/vgg16/load"),
              ("POST", "/v2/repository/models/nope/unload"), ("GET", "/metrics")]


def test_every_rest_path_and_metrics_need_the_token(guarded_server):
    http = HttpServer(rest_app(guarded_server.service, guarded_server.metrics, token=TOKEN))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{http.port}", timeout=10) as client:
            for method, path in REST_CALLS:
                for refused in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                    response = client.request(method, path, headers=refused)
                    assert response.status_code == 401 and "token" in response.json()["error"], (method, path)
                accepted = client.request(method, path, headers={"Authorization": f"Bearer {TOKEN}"})
                assert accepted.status_code != 401, (method, path)
    finally:
        http.stop(1)


def test_the_client_sends_the_token_on_every_call(guarded_server):
    target = f"127.0.0.1:{guarded_server.port}"
    with FeatureClient(target, token=TOKEN) as client:
        client.wait_until_serving(timeout=10)
        images = random_images(2, seed=9)
        assert client.embed("vgg16", images).vectors.shape == (2, 512)
        assert sum(len(part.keys) for part in client.embed_stream("vgg16", images)) == 2
        assert client.classify("lr", images).labels[0] in CLASSES
    with FeatureClient(target) as client, pytest.raises(RemoteError) as caught:
        client.wait_until_serving(timeout=10)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def self_signed(folder: Path, name: str) -> tuple[bytes, bytes]:
    """A self-signed certificate for localhost and 127.0.0.1 and its key, made with the openssl command."""
    cert, key = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert.read_bytes(), key.read_bytes()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_with_a_self_signed_certificate_and_the_token(spec, tmp_path):
    cert, key = self_signed(tmp_path, "server")
    other, _ = self_signed(tmp_path, "other")
    server = start_server(spec, tmp_path / "store.sqlite", tls=(cert, key), token=TOKEN)
    target = f"localhost:{server.port}"
    try:
        with FeatureClient(target, root_cert=cert, token=TOKEN) as client:
            client.wait_until_serving(timeout=10)
            assert client.embed("vgg16", random_images(1, seed=10)).vectors.shape == (1, 512)
        for refused in (FeatureClient(target, retries=0, timeout=3, token=TOKEN),  # plaintext
                        FeatureClient(target, root_cert=other, retries=0, timeout=3, token=TOKEN)):  # not our server
            with refused, pytest.raises(RemoteError) as caught:
                refused.backbones()
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        http = HttpServer(rest_app(server.service, server.metrics, token=TOKEN), tls=(cert, key))
        try:
            (tmp_path / "ca.pem").write_bytes(cert)
            url = f"https://localhost:{http.port}/v2/health/ready"
            headers = {"Authorization": f"Bearer {TOKEN}"}
            trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
            assert httpx.get(url, headers=headers, verify=trusted).status_code == 200
            with pytest.raises(httpx.ConnectError):  # a certificate it does not trust
                httpx.get(url, headers=headers)
            with pytest.raises(httpx.HTTPError):  # plaintext
                httpx.get(url.replace("https", "http"), headers=headers)
        finally:
            http.stop(1)
    finally:
        server.stop(grace=1)


# --- saved heads: a model file altered after it was saved is never loaded --------------------------------------

class CreatesAFileWhenUnpickled:
    """What an attacker would put in a head file: unpickling it runs code (here: creates `marker`)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_saved_head_whose_file_was_altered_is_refused(spec, tmp_path):
    """A head saved by `classifiers.persistence` is served; once its file is altered, the server refuses
    to start (it never says SERVING, calls are UNAVAILABLE) and the file is never unpickled."""
    heads = tmp_path / "heads"
    saved = save_head(fitted_head(spec), heads / "lr", backbone_fingerprint=spec.fingerprint, class_names=CLASSES)
    server = start_server(spec, tmp_path / "store.sqlite", heads_dir=heads)
    try:
        with FeatureClient(f"127.0.0.1:{server.port}") as client:
            assert client.classify("lr", random_images(1, seed=3)).labels[0] in CLASSES
    finally:
        server.stop(grace=1)

    marker = tmp_path / "the altered file was unpickled"
    saved.write_bytes(pickle.dumps(CreatesAFileWhenUnpickled(marker)))
    server = start_server(spec, tmp_path / "store.sqlite", heads_dir=heads, start=False)
    try:
        with pytest.raises(ChecksumError, match="sha256 mismatch"):
            server.start()
        with FeatureClient(f"127.0.0.1:{server.port}", retries=0) as client, pytest.raises(RemoteError) as caught:
            client.classify("lr", random_images(1, seed=3))
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=0)
    assert not marker.exists()


# --- names that could be paths ---------------------------------------------------------------------------------

ESCAPING_NAMES = ["..", ".", "", "../../x", "/etc/passwd", "a/../../b", "..\\..\\x", "~", "x\x00y", "\u00e9t\u00e9",
                  "../" * 40 + "etc"]


def test_head_names_cannot_reach_files_outside_the_heads_folder(spec, heads_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(heads_dir, elsewhere)
    (elsewhere / "lr.skops").rename(elsewhere / "outside.skops")
    server = start_server(spec, tmp_path / "store.sqlite", heads_dir=heads_dir)
    try:
        with FeatureClient(f"127.0.0.1:{server.port}") as client:
            assert {head.name for head in client.heads()} == {"lr", "orphan"}
            for name in [*ESCAPING_NAMES, "../elsewhere/outside", str(elsewhere / "outside"),
                         str(elsewhere / "outside.skops"), "outside", f"../{heads_dir.name}/lr", "lr.skops"]:
                with pytest.raises(RemoteError) as caught:
                    client.classify(name, random_images(1, seed=4))
                assert caught.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        server.stop(grace=1)


def test_feature_set_names_stay_names(tmp_path):
    shards = paths.cache_dir() / "shards"
    for name in ESCAPING_NAMES:
        folder = paths.shards_dir(None, name)
        assert folder.parent == shards and folder.name not in ("", ".", "..")
    store_dir = tmp_path / "store"
    names = [name for name in ESCAPING_NAMES if name and "\x00" not in name]  # the store refuses the others
    with EmbeddingStore(store_dir / "store.sqlite") as store:
        for name in names:
            store.begin_feature_set(name, fingerprint="f", backbone={}, data_spec="npz:x", class_names=[])
        assert {info.name for info in store.feature_sets()} == set(names)
    assert {p.name for p in store_dir.iterdir()} <= {"store.sqlite", "store.sqlite-wal", "store.sqlite-shm"}
    assert [p.name for p in tmp_path.iterdir()] == ["store"]


# 127.0.0.1, the same mapped into IPv6, and ::1 as /proc/net writes them (not 0.0.0.0 or ::)
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def listening_addresses(port: int) -> set[str]:
    """The local addresses of this process's sockets listening on `port` (from /proc/self/net/tcp and tcp6)."""
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_the_server_binds_to_loopback_unless_told_otherwise(spec, tmp_path):
    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    server = start_server(spec, tmp_path / "store.sqlite", start=False)
    try:
        assert listening_addresses(server.port) <= LOOPBACK and listening_addresses(server.port)
    finally:
        server.stop(grace=0)


def test_two_authorization_headers_are_refused_even_with_the_right_token(guarded_server):
    good, bad = ("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer wrong")
    service, method = EVERY_METHOD[0].values
    with grpc.insecure_channel(f"127.0.0.1:{guarded_server.port}") as channel:
        for twice in ((good, good), (bad, good), (good, bad)):
            assert status_of_a_call(channel, service, method, twice) == grpc.StatusCode.UNAUTHENTICATED
    http = HttpServer(rest_app(guarded_server.service, guarded_server.metrics, token=TOKEN))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{http.port}", timeout=10) as client:
            twice = [("Authorization", f"Bearer {TOKEN}"), ("Authorization", "Bearer wrong")]
            assert client.get("/v2/health/ready", headers=twice).status_code == 401
            assert client.get("/v2/health/ready", headers={"Authorization": f"Bearer {TOKEN}"}).status_code != 401
    finally:
        http.stop(1)


@pytest.mark.parametrize("door", ["--port", "--http-port"])
def test_a_port_in_use_is_one_line_and_exit_2(tmp_path, data_dir, door):
    import socket
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = {"--port": "0", "--http-port": "0"} | {door: port}
        out = subprocess.run([sys.executable, "-m", "extractor", "--data-dir", str(data_dir), "serve",
                              "--store", str(tmp_path / "store.sqlite"), *[a for kv in ports.items() for a in kv]],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
