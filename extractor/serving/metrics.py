"""The Prometheus door: the core's reports and the doors' calls as `prometheus_client` metrics in one registry."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from extractor.serving.events import ServingEvents

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# name: what it counts (the README's metrics list is this table)
METRICS = {
    "extractor_requests_total": "calls by model, protocol (grpc, oip-grpc, oip-http) and status",
    "extractor_request_seconds": "call latency by model, protocol and status",
    "extractor_requests_in_flight": "calls being answered, by protocol",
    "extractor_cache_hits_total": "images found in the hot cache or the store, by backbone",
    "extractor_cache_misses_total": "images left to compute, by backbone",
    "extractor_batch_size": "images per backbone call",
    "extractor_queue_seconds": "time a call's images waited in the micro-batcher",
    "extractor_compute_seconds": "time of one backbone call",
    "extractor_decode_failures_total": "images that did not decode or were over a pixel limit, by backbone",
    "extractor_models_loaded": "backbones READY",
    "extractor_store_bytes": "size of the embedding store's files",
}


class ServingMetrics(ServingEvents):
    """Every metric of one server, in its own registry (so servers in one process do not mix)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        describe = METRICS.get
        self.requests = Counter("extractor_requests", describe("extractor_requests_total"),
                                ["model", "protocol", "status"], registry=self.registry)
        self.latency = Histogram("extractor_request_seconds", describe("extractor_request_seconds"),
                                 ["model", "protocol", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight_calls = Gauge("extractor_requests_in_flight", describe("extractor_requests_in_flight"),
                                     ["protocol"], registry=self.registry)
        self.hits = Counter("extractor_cache_hits", describe("extractor_cache_hits_total"), ["model"],
                            registry=self.registry)
        self.misses = Counter("extractor_cache_misses", describe("extractor_cache_misses_total"), ["model"],
                              registry=self.registry)
        self.batch_size = Histogram("extractor_batch_size", describe("extractor_batch_size"), ["model"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue = Histogram("extractor_queue_seconds", describe("extractor_queue_seconds"), ["model"],
                               buckets=LATENCY_BUCKETS, registry=self.registry)
        self.compute = Histogram("extractor_compute_seconds", describe("extractor_compute_seconds"), ["model"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.decode_failures = Counter("extractor_decode_failures", describe("extractor_decode_failures_total"),
                                       ["model"], registry=self.registry)
        self.models_loaded = Gauge("extractor_models_loaded", describe("extractor_models_loaded"),
                                   registry=self.registry)
        self.store_bytes = Gauge("extractor_store_bytes", describe("extractor_store_bytes"), registry=self.registry)

    def watch(self, models_loaded: Callable[[], int], store_path: str | os.PathLike) -> None:
        """Gauges read at each scrape: READY backbones, and the store's file sizes (with its WAL)."""
        self.models_loaded.set_function(models_loaded)
        paths = [f"{store_path}{suffix}" for suffix in ("", "-wal")]
        self.store_bytes.set_function(lambda: sum(os.path.getsize(p) for p in paths if os.path.exists(p)))

    def scrape(self) -> bytes:
        """The text exposition format of every metric."""
        return generate_latest(self.registry)

    # --- the doors ---------------------------------------------------------------------------------------

    def request_finished(self, model: str, protocol: str, status: str, seconds: float) -> None:
        self.requests.labels(model, protocol, status).inc()
        self.latency.labels(model, protocol, status).observe(seconds)

    @contextlib.contextmanager
    def in_flight(self, protocol: str) -> Iterator[None]:
        gauge = self.in_flight_calls.labels(protocol)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()

    # --- the core's reports -----------------------------------------------------------------------------

    def queued(self, model: str, seconds: float) -> None:
        self.queue.labels(model).observe(seconds)

    def batch_computed(self, model: str, images: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(images)
        self.compute.labels(model).observe(seconds)

    def looked_up(self, model: str, hits: int, misses: int) -> None:
        self.hits.labels(model).inc(hits)
        self.misses.labels(model).inc(misses)

    def decode_failed(self, model: str, count: int) -> None:
        self.decode_failures.labels(model).inc(count)
