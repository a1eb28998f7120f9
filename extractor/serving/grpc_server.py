"""The gRPC server that carries both gRPC doors (the own `extractor.v1` API and the Open Inference Protocol):
the status table, the call guard (token, malformed messages, errors, metrics), health, reflection, TLS."""

from __future__ import annotations

import contextlib
import hmac
import logging
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from extractor.errors import AuthenticationError, InvalidInputError
from extractor.models.quiet import native_stderr_silenced
from extractor.serving.grpc_status import status_for
from extractor.serving.metrics import ServingMetrics
from extractor.serving.oip_grpc import InferenceServicer
from extractor.serving.own_grpc import FeatureServicer
from extractor.serving.service import FeatureService
from protos import feature_service_pb2 as pb
from protos import feature_service_pb2_grpc as pb_grpc
from protos import grpc_service_pb2 as oip_pb
from protos import grpc_service_pb2_grpc as oip_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatureService"].full_name
OIP_SERVICE_NAME = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PROTOCOL_OF_SERVICE = {SERVICE_NAME: "grpc", OIP_SERVICE_NAME: "oip-grpc"}  # the `protocol` label of metrics
HEALTH_METHODS = "/grpc.health.v1.Health/"
RPC_THREADS = 64  # blocked calls (waiting for a batch, open streams) each hold one
def model_of(request) -> str:
    """The model a request message names, for the metrics' `model` label ("" when it names none)."""
    for field in ("backbone", "head", "model_name", "name"):
        value = getattr(request, field, None)
        if isinstance(value, str):
            return value[:100]
    return ""


# --- every call: authentication, then errors to status codes ------------------------------------------

class CallGuard(grpc.ServerInterceptor):
    """Wraps every method, health's included: checks the bearer token when the server has one, refuses
    request messages that do not parse (INVALID_ARGUMENT rather than grpc's INTERNAL), turns whatever
    the method raises into a status via `status_for`, and counts the calls of the two doors."""

    def __init__(self, token: str | None = None, metrics: ServingMetrics | None = None):
        self._expected = f"Bearer {token}".encode() if token else None
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        # Exactly one authorization header: with two, which one a proxy or a server reads is anyone's guess.
        tokens = [value for key, value in handler_call_details.invocation_metadata if key == "authorization"]
        authorized = self._expected is None or (
            len(tokens) == 1 and hmac.compare_digest(str(tokens[0]).encode(), self._expected))
        if authorized and method.startswith(HEALTH_METHODS):
            return handler  # health as grpc ships it, with its own non-blocking Watch
        protocol = PROTOCOL_OF_SERVICE.get(method.split("/")[1]) if self.metrics else None
        return _guarded(handler, method, authorized, self.metrics if protocol else None, protocol)


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


def _guarded(handler: grpc.RpcMethodHandler, method: str, authorized: bool, metrics: ServingMetrics | None,
             protocol: str | None) -> grpc.RpcMethodHandler:
    kind = ("stream" if handler.request_streaming else "unary") + "_" + \
           ("stream" if handler.response_streaming else "unary")
    behavior = getattr(handler, kind)

    def checked(request):
        if not authorized:
            raise AuthenticationError("missing or wrong token: send metadata 'authorization: Bearer <token>'")
        return (_parsed(r) for r in request) if handler.request_streaming else _parsed(request)

    def record(request, context, started: float) -> None:
        if metrics is not None:
            code = context.code() or grpc.StatusCode.OK
            model = "" if handler.request_streaming else model_of(request)
            metrics.request_finished(model, protocol, code.name, time.perf_counter() - started)

    if handler.response_streaming:
        def guarded(request, context):
            started = time.perf_counter()
            with metrics.in_flight(protocol) if metrics else contextlib.nullcontext():
                try:
                    yield from behavior(checked(request), context)
                except Exception as exc:
                    _abort(context, method, exc)
                finally:
                    record(request, context, started)
    else:
        def guarded(request, context):
            started = time.perf_counter()
            with metrics.in_flight(protocol) if metrics else contextlib.nullcontext():
                try:
                    return behavior(checked(request), context)
                except Exception as exc:
                    _abort(context, method, exc)
                finally:
                    record(request, context, started)

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
    context.set_code(code)  # so the guard's record sees it before abort raises
    context.abort(code, message)


# --- the server --------------------------------------------------------------------------------------------

class FeatureServer:
    """A gRPC server around a `FeatureService`: the own API and the Open Inference Protocol, with health,
    reflection, the call guard and optional TLS.

    It listens as soon as it is built (health NOT_SERVING, calls UNAVAILABLE); `start` loads and warms up
    the backbones and then reports SERVING; `stop` drains in-flight calls and closes the store.
    """

    def __init__(self, service: FeatureService, *, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, tls: tuple[bytes, bytes] | None = None,
                 max_message_bytes: int = 64 * 2**20, metrics: ServingMetrics | None = None):
        self.service = service
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.so_reuseport", 0)]  # a port already taken is an error, not a shared port
        self.server = grpc.server(futures.ThreadPoolExecutor(RPC_THREADS, thread_name_prefix="rpc"),
                                  interceptors=[CallGuard(token, metrics)], options=options)
        pb_grpc.add_FeatureServiceServicer_to_server(FeatureServicer(service, max_message_bytes), self.server)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        service.on_health_change(lambda serving: self._set_health(
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING))
        reflection.enable_server_reflection(
            (SERVICE_NAME, OIP_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        address = f"{host}:{port}"
        try:
            with native_stderr_silenced():  # grpc's C core prints its own bind failure there
                if tls:
                    cert, key = tls
                    self.port = self.server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
                else:
                    self.port = self.server.add_insecure_port(address)
        except RuntimeError:  # grpc says only "Failed to bind"
            raise InvalidInputError(f"cannot listen on {address}: the port is in use, or the address is not "
                                    "one of this machine's") from None
        self.host = host
        self.server.start()

    def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME, OIP_SERVICE_NAME):
            self.health.set(name, status)

    def start(self) -> None:
        """Load and warm up the backbones and heads (blocking), then report SERVING."""
        self.service.start()
        self._set_health(health_pb2.HealthCheckResponse.SERVING if self.service.serving
                         else health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self, grace: float) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight ones finish within `grace` s, close the store."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.service.close()
