"""The gRPC server that carries both gRPC doors (the own `extractor.v1` API and the Open Inference Protocol):
the call guard (token, caps on calls and streams, idle streams, malformed messages, errors, metrics), the thread
pools that keep health and metadata answering, health, reflection, TLS."""

from __future__ import annotations

import contextlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from extractor.errors import AuthenticationError, InvalidInputError, NotReadyError
from extractor.models.quiet import native_stderr_silenced
from extractor.serving.concurrency import CallSlots, ServerSlots
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
REFLECTION_METHODS = "/grpc.reflection."
# Calls that read the server's state and never wait for a backbone: they run on the reserve of threads that
# no call or stream can take, with health and the refusals of calls over a cap.
METADATA_METHODS = frozenset(
    [f"/{SERVICE_NAME}/{name}" for name in ("ListBackbones", "GetBackbone", "ListHeads", "ListModels")]
    + [f"/{OIP_SERVICE_NAME}/{name}" for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                                   "ModelMetadata", "ModelStatistics", "RepositoryIndex")])
RESERVE_THREADS = 8      # health, metadata, refusals
REFLECTION_STREAMS = 4   # reflection is a stream too, kept apart from the calls' and the streams' caps
QUEUED_METADATA_CALLS = 256  # beyond every thread: grpc itself refuses more calls than this waiting
# Shutting down, the port closes only once the calls in flight have ended and no call has reached the guard
# for SETTLE_SECONDS (at most SETTLE_MAX_SECONDS): grpc answers CANCELLED, which clients do not retry, to the
# calls it has received but not yet handed over when its server stops (grpc/grpc#41785), and a busy server
# hands them over late; settled, every late call has had its UNAVAILABLE.
SETTLE_SECONDS = 0.2
SETTLE_MAX_SECONDS = 2.0


def model_of(request) -> str:
    """The model a request message names, for the metrics' `model` label ("" when it names none)."""
    for field in ("backbone", "head", "model_name", "name"):
        value = getattr(request, field, None)
        if isinstance(value, str):
            return value[:100]
    return ""


# --- every call: authentication, admission, then errors to status codes ------------------------------

class CallGuard(grpc.ServerInterceptor):
    """Wraps every method, health's included: checks the bearer token when the server has one, admits the call
    to its lane (streams, calls, reflection, or the reserve) or refuses it at once over the lane's cap, closes
    streams that wait on their client too long, refuses request messages that do not parse (INVALID_ARGUMENT
    rather than grpc's INTERNAL), turns whatever the method raises into a status via `status_for`, and counts
    the calls of the two doors.

    It runs in grpc's polling thread, before the call gets a thread: a refused call (no token, over a cap) is
    answered from the reserve without reading its request. Once `closing`, every authenticated call but health's
    is refused UNAVAILABLE, which tells clients to try another replica."""

    def __init__(self, token: str | None = None, metrics: ServingMetrics | None = None,
                 lanes: Lanes | None = None, watch: IdleWatch | None = None):
        self._expected = f"Bearer {token}".encode() if token else None
        self.metrics = metrics
        self.lanes, self.watch = lanes, watch
        self.closing = False
        self.last_arrival = time.monotonic()  # when the latest call reached the guard

    def intercept_service(self, continuation, handler_call_details):
        self.last_arrival = time.monotonic()
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        protocol = PROTOCOL_OF_SERVICE.get(method.split("/")[1]) if self.metrics else None
        metrics = self.metrics if protocol else None
        # Exactly one authorization header: with two, which one a proxy or a server reads is anyone's guess.
        tokens = [value for key, value in handler_call_details.invocation_metadata if key == "authorization"]
        if self._expected is not None and not (
                len(tokens) == 1 and hmac.compare_digest(str(tokens[0]).encode(), self._expected)):
            return _refusal(method, AuthenticationError(
                "missing or wrong token: send metadata 'authorization: Bearer <token>'"), metrics, protocol)
        if self.closing and not method.startswith(HEALTH_METHODS):
            return _refusal(method, NotReadyError("the server is shutting down: try again or another replica"),
                            metrics, protocol)
        if method.startswith(HEALTH_METHODS):
            if handler.response_streaming:
                return handler  # Watch as grpc ships it: non-blocking, it holds no thread
            return _guarded(handler, method, None, None, None, self.watch)  # Check's message read under the watch
        pool = None
        if self.lanes is not None:
            lane = self.lanes.of(method, handler)
            if lane is not None:
                if lane.slots.full:
                    return _refusal(method, lane.slots.busy_error(), metrics, protocol)
                pool = lane
        return _guarded(handler, method, metrics, protocol, pool, self.watch)


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


def _guarded(handler: grpc.RpcMethodHandler, method: str, metrics: ServingMetrics | None, protocol: str | None,
             pool: futures.ThreadPoolExecutor | None, watch: IdleWatch | None) -> grpc.RpcMethodHandler:
    """`handler` wrapped in the guard, run on `pool` (None: the reserve). With a `watch`, requests are read under
    it: a stream's for as long as it is open, a unary call's one message before the method runs (grpc is told
    that every call is client-streaming, so no thread waits unwatched for a message a client trickles in)."""
    kind = ("stream" if handler.request_streaming else "unary") + "_" + \
           ("stream" if handler.response_streaming else "unary")
    behavior = getattr(handler, kind)

    def incoming(request, stream: WatchedCall | None):
        if handler.request_streaming:
            return (_parsed(r) for r in (stream.requests(request) if stream else request))
        return _parsed(stream.one_request(request) if stream else request)

    def watched(context):
        if watch is None:
            return contextlib.nullcontext()
        return watch.watching(context, answers_each=handler.request_streaming and handler.response_streaming)

    def record(model: str, context, started: float) -> None:
        if metrics is not None:
            code = context.code() or grpc.StatusCode.OK
            metrics.request_finished(model, protocol, code.name, time.perf_counter() - started)

    def model_in(message) -> str:
        return "" if handler.request_streaming else model_of(message)

    if handler.response_streaming:
        def guarded(request, context):
            started, model = time.perf_counter(), ""
            with metrics.in_flight(protocol) if metrics else contextlib.nullcontext(), watched(context) as stream:
                try:
                    message = incoming(request, stream)
                    model = model_in(message)
                    responses = behavior(message, context)
                    yield from stream.responses(responses) if stream else responses
                except Exception as exc:
                    _abort(context, method, exc)
                finally:
                    record(model, context, started)
    else:
        def guarded(request, context):
            started, model = time.perf_counter(), ""
            with metrics.in_flight(protocol) if metrics else contextlib.nullcontext(), watched(context) as stream:
                try:
                    message = incoming(request, stream)
                    model = model_in(message)
                    return behavior(message, context)
                except Exception as exc:
                    _abort(context, method, exc)
                finally:
                    record(model, context, started)

    if pool is not None:
        guarded.experimental_thread_pool = pool  # grpc runs the call on this lane's threads
    reads = "stream" if handler.request_streaming or watch is not None else "unary"
    make = getattr(grpc, f"{reads}_{'stream' if handler.response_streaming else 'unary'}_rpc_method_handler")
    return make(guarded, request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)


def _refusal(method: str, error: Exception, metrics: ServingMetrics | None,
             protocol: str | None) -> grpc.RpcMethodHandler:
    """A handler that answers `error`'s status at once. It reads as a stream whatever the method is, so grpc
    calls it without waiting for a request message that a slow client may never finish sending."""
    code, message = status_for(error)

    def refuse(request_iterator, context):
        log.debug("%s: refused, %s %s", method, code.name, message)
        if metrics is not None:
            metrics.request_finished("", protocol, code.name, 0.0)
        context.abort(code, message)
    return grpc.stream_unary_rpc_method_handler(refuse)


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


# --- lanes: the threads each kind of call may take ---------------------------------------------------------

class Lane(futures.ThreadPoolExecutor):
    """The threads of one kind of call, each call holding one of `slots` from hand-over to its end (so a call
    whose client goes away before its request arrives gives its slot back too)."""

    def __init__(self, slots: CallSlots, name: str):
        # one thread more than the cap: another door may take a slot between the guard's look and the hand-over
        self.threads = slots.capacity + 1
        super().__init__(self.threads, thread_name_prefix=name)
        self.slots = slots

    def submit(self, fn, /, *args, **kwargs):
        self.slots.add()
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self.slots.release()
            raise
        future.add_done_callback(self.slots.release)
        return future


class Lanes:
    """Streams, calls and reflection each on threads of their own; health and metadata calls on the server's
    reserve, which none of them can take."""

    def __init__(self, slots: ServerSlots):
        self.streams = Lane(slots.streams, "stream")
        self.calls = Lane(slots.calls, "call")
        self.reflection = Lane(CallSlots("reflection streams open", REFLECTION_STREAMS, "a fixed cap"), "reflection")

    def of(self, method: str, handler: grpc.RpcMethodHandler) -> Lane | None:
        """The lane of `method`, or None for the reserve."""
        if method.startswith(REFLECTION_METHODS):
            return self.reflection
        if method in METADATA_METHODS or method.split("/")[1] not in PROTOCOL_OF_SERVICE:
            return None
        return self.streams if handler.request_streaming else self.calls

    @property
    def threads(self) -> int:
        return sum(lane.threads for lane in (self.streams, self.calls, self.reflection))

    @property
    def in_flight(self) -> int:
        """Calls and streams holding a slot, in every door that shares them."""
        return sum(lane.slots.held for lane in (self.streams, self.calls, self.reflection))

    def shutdown(self) -> None:
        for lane in (self.streams, self.calls, self.reflection):
            lane.shutdown(wait=False)


# --- calls that wait on their client ----------------------------------------------------------------------------

class WatchedCall:
    """What a call (a stream, or a unary call until its message is in) has received and answered, and since when
    it waits on its client."""

    def __init__(self, context: grpc.ServicerContext, answers_each: bool):
        self.context, self.answers_each = context, answers_each
        self.received = self.sent = 0
        self.last_activity = time.monotonic()
        self.sending_since: float | None = None
        self.reading = True

    def one_request(self, iterator):
        """The one message of a unary call; once it is in, the call no longer waits on its client."""
        try:
            return next(iterator)
        except StopIteration:
            raise InvalidInputError("the call ended without its request message") from None
        finally:
            self.reading = False

    def requests(self, iterator) -> Iterator:
        for request in iterator:
            self.received += 1
            self.last_activity = time.monotonic()
            yield request
        self.reading = False

    def responses(self, iterator) -> Iterator:
        for response in iterator:
            self.sending_since = time.monotonic()
            yield response  # grpc resumes this generator once the client has taken the response
            self.sending_since = None
            self.sent += 1
            self.last_activity = time.monotonic()

    def overdue(self, now: float, idle_seconds: float) -> str | None:
        """Why the stream has waited on its client too long, or None. A stream computing an answer is not idle:
        the clock runs only while every request received has been answered (or the client reads nothing)."""
        if self.sending_since is not None and now - self.sending_since > idle_seconds:
            return f"the client read no response for {idle_seconds:g} s"
        answered = self.sent >= self.received or not self.answers_each
        if self.reading and answered and now - self.last_activity > idle_seconds:
            return f"no request message arrived for {idle_seconds:g} s"
        return None


class IdleWatch:
    """Closes calls that wait on their client longer than `idle_seconds`, with DEADLINE_EXCEEDED and a message
    saying why, so that a client opening streams and sending nothing (or trickling in a unary call's message)
    frees their threads and slots. One thread looks over every call of the server a few times per
    `idle_seconds`."""

    def __init__(self, idle_seconds: float):
        self.idle_seconds = idle_seconds
        self._streams: set[WatchedCall] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stream-watch", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watching(self, context: grpc.ServicerContext, answers_each: bool) -> Iterator[WatchedCall]:
        stream = WatchedCall(context, answers_each)
        with self._lock:
            self._streams.add(stream)
        try:
            yield stream
        finally:
            with self._lock:
                self._streams.discard(stream)

    def _run(self) -> None:
        period = min(self.idle_seconds / 4, 1.0)
        while not self._stopped.wait(period):
            now = time.monotonic()
            with self._lock:
                overdue = [(stream, reason) for stream in self._streams
                           if (reason := stream.overdue(now, self.idle_seconds))]
                for stream, _ in overdue:
                    self._streams.discard(stream)
            for stream, reason in overdue:
                log.info("closing a call that waits on its client: %s", reason)
                close_with_status(stream.context, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"closed by the server: {reason} (its --stream-idle-seconds)")

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()


def close_with_status(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End a call from outside its thread with `code` and `message`; the call's thread, waiting on its client,
    wakes with an error and lets go. grpc's public `cancel()` sends a bare CANCELLED, so the call object's own
    cancel, which takes the status the client sees, is used where this grpc has it."""
    context.set_code(code)  # what the call guard records for it
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    if call is not None:
        call.cancel(code.value[0], message)
    else:
        context.cancel()


# --- the server --------------------------------------------------------------------------------------------

class FeatureServer:
    """A gRPC server around a `FeatureService`: the own API and the Open Inference Protocol, with health,
    reflection, the call guard and optional TLS.

    It listens as soon as it is built (health NOT_SERVING, calls UNAVAILABLE); `start` loads and warms up
    the backbones and then reports SERVING; `stop` drains in-flight calls and closes the store. `slots` are
    the caps on streams and calls (shared with the REST door when there is one).
    """

    def __init__(self, service: FeatureService, *, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, tls: tuple[bytes, bytes] | None = None,
                 max_message_bytes: int = 64 * 2**20, metrics: ServingMetrics | None = None,
                 slots: ServerSlots | None = None):
        self.service = service
        self.slots = slots or ServerSlots()
        self.lanes = Lanes(self.slots)
        self.watch = IdleWatch(self.slots.limits.stream_idle_seconds)
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.so_reuseport", 0)]  # a port already taken is an error, not a shared port
        self.guard = CallGuard(token, metrics, self.lanes, self.watch)
        self.server = grpc.server(futures.ThreadPoolExecutor(RESERVE_THREADS, thread_name_prefix="rpc"),
                                  interceptors=[self.guard], options=options,
                                  maximum_concurrent_rpcs=self.lanes.threads + QUEUED_METADATA_CALLS)
        pb_grpc.add_FeatureServiceServicer_to_server(
            FeatureServicer(service, max_message_bytes, self.slots.limits), self.server)
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
            self._release_threads()
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

    def refuse_new_calls(self) -> None:
        """Report NOT_SERVING and answer every new call but health's UNAVAILABLE; calls in flight go on."""
        self.health.enter_graceful_shutdown()
        self.guard.closing = True

    def stop(self, grace: float) -> None:
        """Refuse new calls, let in-flight ones finish within `grace` s, close the port once no call has arrived
        for a moment (see SETTLE_SECONDS), close the store."""
        deadline = time.monotonic() + grace
        self.refuse_new_calls()
        while self.lanes.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        ended = time.monotonic()  # the last call in flight: its client may well call again at once
        settle_until = min(deadline, ended + SETTLE_MAX_SECONDS)
        while (time.monotonic() - max(ended, self.guard.last_arrival) < SETTLE_SECONDS
               and time.monotonic() < settle_until):
            time.sleep(0.01)
        self.server.stop(max(0.0, deadline - time.monotonic())).wait()
        self._release_threads()
        self.service.close()

    def _release_threads(self) -> None:
        self.watch.stop()
        self.lanes.shutdown()
