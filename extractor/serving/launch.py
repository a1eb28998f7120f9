"""The `serve` command's wiring: the model repository as a catalog, the core, its doors (gRPC, REST, metrics)
and signals. Saved heads are handed in by the command that starts the server, so serving needs no classifiers."""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field

from extractor.serving.concurrency import ConcurrencyLimits
from extractor.serving.loaded_models import Catalog

log = logging.getLogger(__name__)


def repository_catalog(data_dir: str | None, repository: str | None = None) -> Catalog:
    """The model repository (`repository` searched before the shipped one) as the core's catalog: entries are
    read again at each listing, so one added while the server runs can be loaded; specs only by entry name."""
    from extractor.models import ModelRepository, release_backbone

    models = ModelRepository(repository, data_dir)
    return Catalog(names=models.names, spec=models.spec, release=release_backbone)


@dataclass(frozen=True)
class Doors:
    """Where the server listens, and how it is secured."""

    host: str = "127.0.0.1"
    port: int = 0
    http_port: int | None = None     # the REST door and /metrics; None: no HTTP
    metrics_port: int | None = None  # /metrics alone on its own port as well
    token: str | None = None
    tls: tuple[bytes, bytes] | None = None
    max_message_bytes: int = 64 * 2**20
    concurrency: ConcurrencyLimits = field(default_factory=ConcurrencyLimits)  # every door's share of the caps


def serve(service_factory, doors: Doors, grace: float) -> int:
    """Run the server until SIGTERM or SIGINT, then drain and exit; prints the bound addresses.

    `service_factory(events)` builds the core with the metrics door as one of its listeners."""
    from extractor.serving.concurrency import ServerSlots
    from extractor.serving.grpc_server import FeatureServer
    from extractor.serving.metrics import ServingMetrics
    from extractor.serving.rest import HttpServer, metrics_app, rest_app

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    metrics = ServingMetrics()
    service = service_factory([metrics])
    metrics.watch(lambda: len(service.served), service.store.path)
    slots = ServerSlots(doors.concurrency)
    server = FeatureServer(service, host=doors.host, port=doors.port, token=doors.token, tls=doors.tls,
                           max_message_bytes=doors.max_message_bytes, metrics=metrics, slots=slots)
    http_servers = []
    try:
        if doors.http_port is not None:
            http_servers.append(HttpServer(rest_app(service, metrics, token=doors.token,
                                                    max_body_bytes=doors.max_message_bytes, slots=slots),
                                           host=doors.host, port=doors.http_port, tls=doors.tls))
        if doors.metrics_port is not None:
            http_servers.append(HttpServer(metrics_app(metrics, token=doors.token), host=doors.host,
                                           port=doors.metrics_port, tls=doors.tls))
    except BaseException:
        for http in http_servers:
            http.stop(0)
        server.server.stop(0)
        raise
    print(f"listening on {doors.host}:{server.port}", flush=True)
    for http in http_servers:
        print(f"http on {doors.host}:{http.port}", flush=True)
    log.info("listening on %s:%d (%s%s); loading backbones", doors.host, server.port,
             "TLS" if doors.tls else "plaintext", ", token required" if doors.token else "")
    try:
        server.start()
    except BaseException:
        for http in http_servers:
            http.stop(0)
        server.server.stop(0)  # nothing was served; close the ports rather than linger half-started
        raise
    log.info("serving %s; limits: %s; %s", ", ".join(service.served), service.limits, doors.concurrency)
    stop.wait()
    log.info("stopping: draining in-flight calls (grace %.0f s)", grace)
    server.refuse_new_calls()  # while the HTTP doors drain, gRPC clients are told to go elsewhere at once
    deadline = time.monotonic() + grace
    for http in http_servers:
        http.stop(max(0.0, deadline - time.monotonic()))
    server.stop(max(0.0, deadline - time.monotonic()))
    log.info("stopped")
    return 0
