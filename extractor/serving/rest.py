"""The Open Inference Protocol's REST door (FastAPI on uvicorn, in the server's process, on the same core), its
binary tensor extension (`Inference-Header-Content-Length`), `/metrics`, the token, and the HTTP error table."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from extractor.errors import (AuthenticationError, BusyError, InvalidInputError, LimitExceededError, NotReadyError,
                              StoreError, StoreFullError, UnknownNameError)
from extractor.serving.concurrency import ServerSlots
from extractor.serving.metrics import ServingMetrics
from extractor.serving.oip import (EXTENSIONS, SERVER_NAME, VERSION, InferenceModels, Tensor, from_raw, from_values,
                                   raw_of, server_version)
from extractor.serving.service import FeatureService

log = logging.getLogger(__name__)


class SlowBodyError(Exception):
    """A request body that stopped arriving: the REST door's counterpart of a silent stream."""


PROTOCOL = "oip-http"
HEADER_LENGTH = "inference-header-content-length"
STATUS_BY_ERROR = (  # the REST door's one table; the body is always {"error": "..."}
    (InvalidInputError, 400),
    (AuthenticationError, 401),
    (UnknownNameError, 404),
    (BusyError, 429),  # at a cap of calls or streams, or the pixel budget stayed full: Retry-After says when
    (LimitExceededError, 413),  # over the request's own limits: the same request will never fit
    (NotReadyError, 503),
    (StoreFullError, 507),   # Insufficient Storage
    (StoreError, 503),       # read-only, I/O error, damaged: the store, not the request
    (SlowBodyError, 408),    # Request Timeout
    (TimeoutError, 504),
    (CancelledError, 499),
)
MAX_ERROR_CHARS = 2000


def error_response(error: BaseException) -> JSONResponse:
    for kind, status in STATUS_BY_ERROR:
        if isinstance(error, kind):
            headers = {"Retry-After": str(math.ceil(error.retry_after))} if isinstance(error, BusyError) else None
            return JSONResponse({"error": (str(error) or kind.__name__)[:MAX_ERROR_CHARS]}, status_code=status,
                                headers=headers)
    log.error("REST call failed", exc_info=error)
    return JSONResponse({"error": "internal error; the server logged the details"}, status_code=500)


class DoorRoute(APIRoute):
    """Every route of the door: errors to statuses through the table, and the call counted in the metrics."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            metrics: ServingMetrics | None = request.app.state.metrics
            counted = metrics is not None and self.path != "/metrics"
            started = time.perf_counter()
            with metrics.in_flight(PROTOCOL) if counted else contextlib.nullcontext():
                try:
                    response = await handler(request)
                except Exception as exc:  # noqa: BLE001  every failure becomes a status through the table
                    response = error_response(exc)
            if counted:
                metrics.request_finished(request.path_params.get("name", "")[:100], PROTOCOL,
                                         str(response.status_code), time.perf_counter() - started)
            return response
        return guarded


async def read_body(request: Request, max_body_bytes: int, idle_seconds: float) -> bytes:
    """The request's body, refused over `max_body_bytes` as soon as it is, and when no part of it arrives for
    `idle_seconds` (a client that declares a body and sends none holds no slot for ever)."""
    parts, size = [], 0
    chunks = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), idle_seconds)
        except StopAsyncIteration:
            return b"".join(parts)
        except asyncio.TimeoutError:
            raise SlowBodyError(f"no part of the request body arrived for {idle_seconds:g} s (the server's "
                                "--stream-idle-seconds); send it whole") from None
        size += len(chunk)
        if size > max_body_bytes:
            raise LimitExceededError("request bytes", size, max_body_bytes)
        parts.append(chunk)


# --- JSON and binary tensors ----------------------------------------------------------------------------

def flat(values) -> list:
    """The protocol allows nested lists in `data`; row-major flat values either way."""
    if not isinstance(values, list):
        return [values]
    out = []
    for value in values:
        out.extend(flat(value) if isinstance(value, list) else [value])
    return out


def request_parts(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """The JSON header and the binary data after it."""
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidInputError(f"Inference-Header-Content-Length {header_length[:30]!r} is not a length "
                                    f"within the body of {len(body)} bytes")
        json_part, binary = body[:int(header_length)], body[int(header_length):]
    header = json_object(json_part)
    if not isinstance(header.get("inputs"), list):
        raise InvalidInputError("an inference request is a JSON object with a list of \"inputs\"")
    return header, binary


def json_object(data: bytes) -> dict:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidInputError(f"malformed JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"expected a JSON object, got {type(value).__name__}")
    return value


def parameters_of(entry: dict) -> dict:
    """An object's "parameters" (the protocol's extension point): a JSON object, or none."""
    parameters = entry.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise InvalidInputError(f"\"parameters\" must be a JSON object, got {type(parameters).__name__}")
    return parameters


def input_tensors(header: dict, binary: bytes) -> list[Tensor]:
    tensors, at = [], 0
    for entry in header["inputs"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) \
                or not isinstance(entry.get("datatype"), str) or not isinstance(entry.get("shape"), list) \
                or not all(isinstance(side, int) and not isinstance(side, bool) for side in entry["shape"]):
            raise InvalidInputError("each input needs a \"name\", a \"datatype\" and a \"shape\" of integers")
        name, datatype, shape = entry["name"], entry["datatype"], entry["shape"]
        size = parameters_of(entry).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or at + size > len(binary):
                raise InvalidInputError(f"input {name!r}: binary_data_size {size} runs past the {len(binary)} "
                                        "bytes of binary data")
            tensors.append(from_raw(name, datatype, shape, binary[at:at + size]))
            at += size
        elif "data" in entry:
            tensors.append(from_values(name, datatype, shape, flat(entry["data"])))
        else:
            raise InvalidInputError(f"input {name!r} has neither \"data\" nor binary_data_size")
    if at != len(binary):
        raise InvalidInputError(f"{len(binary) - at} bytes of binary data belong to no input")
    return tensors


def requested_outputs(header: dict) -> tuple[list[str] | None, dict[str, bool]]:
    """The output names asked for (None: all) and which of them go back as binary data."""
    default_binary = bool(parameters_of(header).get("binary_data_output", False))
    outputs = header.get("outputs")
    if outputs is None:
        return None, {}
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                for o in outputs):
        raise InvalidInputError("\"outputs\" must be a list of objects with a \"name\"")
    binary = {o["name"]: bool(parameters_of(o).get("binary_data", default_binary)) for o in outputs}
    return [o["name"] for o in outputs], binary


def infer_response(name: str, request_id, outputs: list[Tensor], binary: Callable[[str], bool]) -> Response:
    entries, chunks = [], []
    for tensor in outputs:
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary(tensor.name):
            chunks.append(raw_of(tensor))
            entry["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            entry["data"] = [item.decode(errors="replace") for item in tensor.data] if tensor.datatype == "BYTES" \
                else tensor.data.ravel().tolist()
        entries.append(entry)
    body = {"model_name": name, "model_version": VERSION, "outputs": entries}
    if request_id is not None:
        body["id"] = request_id
    header = json.dumps(body).encode()
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


def statistics_body(models: InferenceModels, name: str = "", version: str = "") -> dict:
    stats = []
    for model, usage in models.statistics(name, version):
        durations = {key: {"count": d.count, "ns": d.ns} for key, d in (
            ("success", usage.success), ("fail", usage.fail), ("queue", usage.queue),
            ("compute_infer", usage.compute))}
        stats.append({"name": model, "version": VERSION, "last_inference": usage.last_inference_ms,
                      "inference_count": usage.inference_count, "execution_count": usage.execution_count,
                      "inference_stats": durations})
    return {"model_stats": stats}


# --- the apps --------------------------------------------------------------------------------------------

def _guard_token(app: FastAPI, token: str | None) -> None:
    if not token:
        return
    expected = f"Bearer {token}".encode()

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        tokens = request.headers.getlist("authorization")  # two headers: refused, not the last one believed
        if len(tokens) != 1 or not hmac.compare_digest(tokens[0].encode(), expected):
            return error_response(AuthenticationError(
                "missing or wrong token: send the header 'Authorization: Bearer <token>'"))
        return await call_next(request)


def _add_metrics(app: FastAPI, metrics: ServingMetrics) -> None:
    @app.get("/metrics", include_in_schema=False)
    def scrape() -> Response:
        return Response(metrics.scrape(), media_type=CONTENT_TYPE_LATEST)


def metrics_app(metrics: ServingMetrics, *, token: str | None = None) -> FastAPI:
    """/metrics alone, for a port of its own."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.state.metrics = None
    _guard_token(app, token)
    _add_metrics(app, metrics)
    return app


def rest_app(service: FeatureService, metrics: ServingMetrics | None = None, *, token: str | None = None,
             max_body_bytes: int = 64 * 2**20, slots: ServerSlots | None = None) -> FastAPI:
    """The protocol's REST paths on `service`, and /metrics when `metrics` is given.

    Calls that do work (infer, load, unload) each hold one of `slots.calls` (shared with the gRPC doors) while
    they run on a thread, and get 503 with Retry-After over the cap; health and metadata run on the event loop,
    so no number of calls in flight keeps them waiting for a thread. A body that stops arriving for the slots'
    stream idle time is refused 408."""
    models = InferenceModels(service)
    slots = slots or ServerSlots()
    calls, idle_seconds = slots.calls, slots.limits.stream_idle_seconds

    async def in_call_slot(work: Callable, *args):
        calls.take()
        try:
            return await run_in_threadpool(work, *args)
        finally:
            calls.release()
    app = FastAPI(title=SERVER_NAME, openapi_url=None, docs_url=None, redoc_url=None)
    app.router.route_class = DoorRoute
    app.state.metrics = metrics
    _guard_token(app, token)
    if metrics is not None:
        _add_metrics(app, metrics)

    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200 if service.serving else 503)

    @app.get("/v2")
    async def metadata() -> dict:
        return {"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS}

    @app.get("/v2/models/stats")
    async def all_statistics() -> dict:
        return statistics_body(models)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str = "") -> dict:
        return models.metadata(name, version)

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str = "") -> Response:
        return Response(status_code=200 if models.ready(name, version) else 400)

    @app.get("/v2/models/{name}/stats")
    @app.get("/v2/models/{name}/versions/{version}/stats")
    async def model_statistics(name: str, version: str = "") -> dict:
        return statistics_body(models, name, version)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str = "") -> Response:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise LimitExceededError("request bytes", int(declared), max_body_bytes)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":  # read as it is, a compressed body would only be "malformed JSON"
            raise InvalidInputError(f"Content-Encoding {encoding[:30]!r} is not accepted: send the body unencoded")
        body = await read_body(request, max_body_bytes, idle_seconds)
        header, binary = request_parts(body, request.headers.get(HEADER_LENGTH))
        inputs = input_tensors(header, binary)
        requested, binary_outputs = requested_outputs(header)
        default_binary = bool(parameters_of(header).get("binary_data_output", False))
        outputs = await in_call_slot(models.infer, name, version, inputs, requested)
        return infer_response(name, header.get("id"), outputs, lambda key: binary_outputs.get(key, default_binary))

    @app.post("/v2/repository/index")
    async def repository_index(request: Request) -> list:
        body = await read_body(request, max_body_bytes, idle_seconds)
        ready_only = bool(json_object(body).get("ready", False)) if body.strip() else False
        return [{"name": s.name, "version": VERSION, "state": s.state.value, "reason": s.reason}
                for s in models.repository_index(ready_only)]

    @app.post("/v2/repository/models/{name}/load")
    async def load(name: str) -> Response:
        await in_call_slot(service.load_model, name)
        return Response(status_code=200)

    @app.post("/v2/repository/models/{name}/unload")
    async def unload(name: str) -> Response:
        await in_call_slot(service.unload_model, name)
        return Response(status_code=200)

    return app


class HttpServer:
    """uvicorn serving `app` in a thread of this process, on a socket bound here (port 0 picks a free one)."""

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0,
                 tls: tuple[bytes, bytes] | None = None):
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.bind((host, port))
        except OSError as exc:
            self.socket.close()
            raise InvalidInputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.port = self.socket.getsockname()[1]
        options = {}
        folder = None
        if tls:
            # uvicorn reads the certificate and key from files: a private folder, removed once they are loaded
            folder = tempfile.mkdtemp(prefix="tls-")
            for name, content in zip(("cert.pem", "key.pem"), tls):
                path = os.path.join(folder, name)
                with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
                    f.write(content)
            options = {"ssl_certfile": os.path.join(folder, "cert.pem"), "ssl_keyfile": os.path.join(folder, "key.pem")}
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name=f"http-{self.port}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if folder is not None:
            for name in os.listdir(folder):
                os.remove(os.path.join(folder, name))
            os.rmdir(folder)
        if not self.server.started:
            raise RuntimeError(f"the HTTP server on {host}:{self.port} did not start")

    def stop(self, grace: float) -> None:
        """Stop accepting, let requests in flight finish within `grace` seconds."""
        self.server.config.timeout_graceful_shutdown = grace
        self.server.should_exit = True
        self.thread.join(grace + 5)
        self.socket.close()
