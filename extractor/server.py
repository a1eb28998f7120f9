"""The gRPC door onto the feature service: protobuf <-> numpy, status codes, health, reflection, auth, TLS."""

from __future__ import annotations

import hmac
import logging
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import CancelledError
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from extractor.errors import (AuthenticationError, InvalidInputError, LimitExceededError, NotReadyError,
                              UnknownNameError)
from extractor.models import PRESETS
from extractor.service import Call, FeatureService, RawPixels, StreamRequest
from protos import feature_service_pb2 as pb
from protos import feature_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureService"].full_name
HEALTH_METHODS = "/grpc.health.v1.Health/"
RPC_THREADS = 64  # blocked calls (waiting for a batch, open streams) each hold one
NO_DEADLINE = 1e8  # grpc reports "no deadline" as a remaining time of centuries
# Status details travel percent-encoded in trailing metadata, which grpc caps at 8-16 KiB: an error quoting
# a client's 20 kB name would otherwise reach the client as a transport error instead of its own status.
MAX_DETAILS_CHARS = 500

STATUS_BY_ERROR = (
    (UnknownNameError, grpc.StatusCode.NOT_FOUND),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotReadyError, grpc.StatusCode.UNAVAILABLE),
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (CancelledError, grpc.StatusCode.CANCELLED),
)


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one mapping from errors to status codes and the message the client sees.

    Anything not listed is INTERNAL with a fixed message: its details stay in the server's log.
    """
    for kind, code in STATUS_BY_ERROR:
        if isinstance(error, kind):
            message = str(error) or code.name.lower().replace("_", " ")
            if len(message) > MAX_DETAILS_CHARS:
                message = message[:MAX_DETAILS_CHARS - 3] + "..."
            return code, message
    return grpc.StatusCode.INTERNAL, "internal error; the server logged the details"


# --- protobuf <-> numpy ---------------------------------------------------------------------------------

def raw_pixels(tensor: pb.Tensor) -> RawPixels:
    return RawPixels(tensor.data, tuple(tensor.shape), tensor.dtype)


def images_from(messages) -> list[bytes | RawPixels]:
    return [raw_pixels(m.pixels) if m.WhichOneof("content") == "pixels" else m.encoded for m in messages]


def batch_from(request) -> RawPixels | None:
    return raw_pixels(request.batch) if request.HasField("batch") else None


def matrix(array: np.ndarray) -> pb.Matrix:
    """(rows, dim) float32 -> one packed little-endian bytes field."""
    return pb.Matrix(data=array.astype("<f4", copy=False).tobytes(), rows=array.shape[0], dim=array.shape[1])


def image_errors(errors) -> list[pb.ImageError]:
    return [pb.ImageError(index=index, code=status_for(error)[0].value[0], message=str(error))
            for index, error in errors]


def embed_response(outcome) -> pb.EmbedResponse:
    return pb.EmbedResponse(fingerprint=outcome.fingerprint, vectors=matrix(outcome.vectors),
                            cached=outcome.cached.tolist(), keys=outcome.keys,
                            errors=image_errors(outcome.errors), offset=outcome.offset)


def call_from(context: grpc.ServicerContext) -> Call:
    remaining = context.time_remaining()
    deadline = time.monotonic() + remaining if remaining is not None and remaining < NO_DEADLINE else None
    return Call(deadline, context.is_active)


class FeatureServicer(pb_grpc.FeatureServiceServicer):
    """Translates each RPC into a call on the `FeatureService` core and its result back."""

    def __init__(self, service: FeatureService):
        self.service = service

    def _backbone(self, spec) -> pb.Backbone:
        limits = self.service.limits
        return pb.Backbone(
            name=spec.name, summary=spec.summary, input_size=spec.input_size, channels=spec.channels,
            recipe=spec.preprocessing.name, recipes=sorted(PRESETS), pooling=spec.pooling,
            output_dim=self.service.output_dim(spec.name), fingerprint=spec.fingerprint, weights_sha256=spec.sha256 or "",
            limits=pb.Limits(max_images_per_request=limits.max_images_per_request,
                             max_message_bytes=limits.max_message_bytes,
                             max_decoded_pixels=limits.max_decoded_pixels))

    def ListBackbones(self, request, context):
        return pb.ListBackbonesResponse(backbones=[self._backbone(spec) for spec in self.service.backbones()])

    def GetBackbone(self, request, context):
        return self._backbone(self.service.backbone(request.name))

    def Embed(self, request, context):
        outcome = self.service.embed(request.backbone, images_from(request.images), batch=batch_from(request),
                                     all_or_nothing=request.all_or_nothing, call=call_from(context))
        return embed_response(outcome)

    def EmbedStream(self, request_iterator, context):
        requests = (StreamRequest(r.backbone, images_from(r.images), r.all_or_nothing, batch_from(r))
                    for r in request_iterator)
        for outcome in self.service.embed_stream(requests, call_from(context)):
            yield embed_response(outcome)

    def GetEmbeddings(self, request, context):
        vectors, found = self.service.get_embeddings(request.backbone, request.keys)
        return pb.GetEmbeddingsResponse(vectors=matrix(vectors), found=found.tolist())

    def ListHeads(self, request, context):
        return pb.ListHeadsResponse(heads=[
            pb.Head(name=head.name, backbone=self.service.head_backbone(head) or "",
                    backbone_fingerprint=head.backbone_fingerprint, class_names=head.class_names)
            for head in self.service.list_heads()])

    def Classify(self, request, context):
        outcome = self.service.classify(request.head, images_from(request.images), batch=batch_from(request),
                                        all_or_nothing=request.all_or_nothing, call=call_from(context))
        return pb.ClassifyResponse(class_names=outcome.class_names, probabilities=matrix(outcome.probabilities),
                                   labels=outcome.labels, cached=outcome.cached.tolist(),
                                   errors=image_errors(outcome.errors))


# --- every call: authentication, then errors to status codes ------------------------------------------

class CallGuard(grpc.ServerInterceptor):
    """Wraps every method, health's included: checks the bearer token when the server has one, refuses
    request messages that do not parse (INVALID_ARGUMENT rather than grpc's INTERNAL), and turns whatever
    the method raises into a status via `status_for`."""

    def __init__(self, token: str | None = None):
        self._expected = f"Bearer {token}".encode() if token else None

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        authorized = self._expected is None or hmac.compare_digest(
            dict(handler_call_details.invocation_metadata).get("authorization", "").encode(), self._expected)
        if authorized and method.startswith(HEALTH_METHODS):
            return handler  # health as grpc ships it, with its own non-blocking Watch
        return _guarded(handler, method, authorized)


class _Malformed:
    """Stands in for a request message that did not parse, until the guarded method refuses it."""

    def __init__(self, error: DecodeError):
        self.error = error


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes):
        try:
            return deserialize(data)
        except DecodeError as exc:
            return _Malformed(exc)
    return parse


def _parsed(request):
    if isinstance(request, _Malformed):
        raise InvalidInputError(f"malformed request: {request.error}")
    return request


def _guarded(handler: grpc.RpcMethodHandler, method: str, authorized: bool) -> grpc.RpcMethodHandler:
    kind = ("stream" if handler.request_streaming else "unary") + "_" + \
           ("stream" if handler.response_streaming else "unary")
    behavior = getattr(handler, kind)

    def checked(request):
        if not authorized:
            raise AuthenticationError("missing or wrong token: send metadata 'authorization: Bearer <token>'")
        return (_parsed(r) for r in request) if handler.request_streaming else _parsed(request)

    if handler.response_streaming:
        def guarded(request, context):
            try:
                yield from behavior(checked(request), context)
            except Exception as exc:
                _abort(context, method, exc)
    else:
        def guarded(request, context):
            try:
                return behavior(checked(request), context)
            except Exception as exc:
                _abort(context, method, exc)

    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(guarded, request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)


def _abort(context: grpc.ServicerContext, method: str, error: Exception) -> None:
    if context.code() not in (None, grpc.StatusCode.OK):
        raise error  # the method already set its status (context.abort), keep it
    if not context.is_active():
        log.debug("%s: the client went away (%s)", method, error)
        return
    code, message = status_for(error)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=error)
    else:
        log.debug("%s: %s %s", method, code.name, message)
    context.abort(code, message)


# --- the server --------------------------------------------------------------------------------------------

class FeatureServer:
    """A gRPC server around a `FeatureService`, with health, reflection, the call guard and optional TLS.

    It listens as soon as it is built (health NOT_SERVING, calls UNAVAILABLE); `start` loads and warms up
    the backbones and then reports SERVING; `stop` drains in-flight calls and closes the store.
    """

    def __init__(self, service: FeatureService, *, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, tls: tuple[bytes, bytes] | None = None):
        self.service = service
        options = [("grpc.max_receive_message_length", service.limits.max_message_bytes),
                   ("grpc.max_send_message_length", service.limits.max_message_bytes),
                   ("grpc.so_reuseport", 0)]  # a port already taken is an error, not a shared port
        self.server = grpc.server(futures.ThreadPoolExecutor(RPC_THREADS, thread_name_prefix="rpc"),
                                  interceptors=[CallGuard(token)], options=options)
        pb_grpc.add_FeatureServiceServicer_to_server(FeatureServicer(service), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.server)
        address = f"{host}:{port}"
        if tls:
            cert, key = tls
            self.port = self.server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            self.port = self.server.add_insecure_port(address)
        self.host = host
        self.server.start()

    def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> None:
        """Load and warm up the backbones and heads (blocking), then report SERVING."""
        self.service.start()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight ones finish within `grace` s, close the store."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.service.close()


def serve(service: FeatureService, *, host: str, port: int, token: str | None, tls: tuple[bytes, bytes] | None,
          grace: float) -> int:
    """Run the server until SIGTERM or SIGINT, then drain and exit; prints the bound address."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server = FeatureServer(service, host=host, port=port, token=token, tls=tls)
    print(f"listening on {host}:{server.port}", flush=True)
    log.info("listening on %s:%d (%s%s); loading backbones", host, server.port, "TLS" if tls else "plaintext",
             ", token required" if token else "")
    try:
        server.start()
    except BaseException:
        server.server.stop(0)  # nothing was served; close the port rather than linger half-started
        raise
    log.info("serving %s; limits: %s", ", ".join(service.served), service.limits)
    stop.wait()
    log.info("stopping: draining in-flight calls (grace %.0f s)", grace)
    server.stop(grace)
    log.info("stopped")
    return 0
