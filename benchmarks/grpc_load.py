"""gRPC load on loopback: served vs in-process embed throughput and latency, and cache-hit throughput.

A server runs as its own process (`python -m extractor serve --port 0`, VGG16 at 32x32, 512-d) on a
temporary store; clients are threads here. Each round measures, for the same time each: the in-process
Embedder on 32-image calls of new images, then 1, 4 and 16 concurrent clients sending 32-image Embed
calls of new images. Then cache hits: single 32-image Embed calls (latency), GetEmbeddings and
EmbedStream (vectors/s). Medians over rounds are printed with their ratios and written as JSON.

    python benchmarks/grpc_load.py [--seconds 3] [--rounds 3] [--out benchmarks/results/grpc_load.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from extractor.models import get_backbone_spec  # noqa: E402
from extractor.serving.client import FeatureClient  # noqa: E402
from extractor.embedder import Embedder  # noqa: E402
from extractor.store import EmbeddingStore  # noqa: E402

log = logging.getLogger("grpc_load")

REQUEST_IMAGES = 32
SIDE = 32
TARGETS = {"served_over_in_process_at_4_plus_clients": 0.85, "cache_hit_vectors_per_s": 50_000,
           "cache_hit_p99_ms": 20.0}


class FreshImages:
    """New random 32x32 RGB images (never cache hits), a different stream per caller; keeps the first
    `keep` sent to the server for the cache-hit measurements."""

    def __init__(self, keep: int):
        self._seed = 0
        self._lock = threading.Lock()
        self.kept: list[np.ndarray] = []
        self.keep = keep

    def stream(self, served: bool = True):
        with self._lock:
            self._seed += 1
            rng = np.random.default_rng(self._seed)
        while True:
            batch = rng.integers(0, 256, (REQUEST_IMAGES, SIDE, SIDE, 3), dtype=np.uint8)
            with self._lock:
                if served and len(self.kept) < self.keep:
                    self.kept.extend(batch)
            yield batch


def percentile_ms(latencies: list[float], q: float) -> float:
    return round(float(np.percentile(latencies, q)) * 1000, 2)


def in_process(embedder: Embedder, images: FreshImages, seconds: float) -> dict:
    stream = images.stream(served=False)
    count, latencies = 0, []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch = next(stream)
        t0 = time.perf_counter()
        embedder.embed(list(batch))
        latencies.append(time.perf_counter() - t0)
        count += len(batch)
    return {"images_per_s": count / (time.perf_counter() - started), "p50_ms": percentile_ms(latencies, 50),
            "p99_ms": percentile_ms(latencies, 99), "requests": len(latencies)}


def served(target: str, clients: int, images: FreshImages, seconds: float) -> dict:
    latencies: list[float] = []
    counts = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def run(i: int) -> None:
        stream = images.stream()
        with FeatureClient(target, timeout=120) as client:
            client.limits()  # connect before the clock starts
            start.wait()
            while time.perf_counter() < stop_at[0]:
                batch = next(stream)
                t0 = time.perf_counter()
                result = client.embed("vgg16", batch)
                latencies.append(time.perf_counter() - t0)
                assert not result.errors and not result.cached.any()
                counts[i] += len(batch)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + seconds
    started = time.perf_counter()
    start.wait()
    for thread in threads:
        thread.join()
    return {"images_per_s": sum(counts) / (time.perf_counter() - started), "p50_ms": percentile_ms(latencies, 50),
            "p99_ms": percentile_ms(latencies, 99), "requests": len(latencies)}


def cache_hits(target: str, images: np.ndarray, seconds: float) -> dict:
    with FeatureClient(target, timeout=60) as client:
        keys = [k for part in client.embed_stream("vgg16", images, chunk_size=256) for k in part.keys]
        # single 32-image Embed calls whose vectors are all stored
        latencies = []
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            offset = (len(latencies) * REQUEST_IMAGES) % (len(images) - REQUEST_IMAGES)
            t0 = time.perf_counter()
            result = client.embed("vgg16", images[offset:offset + REQUEST_IMAGES])
            latencies.append(time.perf_counter() - t0)
            assert result.cached.all()
        single = {"p50_ms": percentile_ms(latencies, 50), "p99_ms": percentile_ms(latencies, 99),
                  "requests": len(latencies)}

        vectors, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for start in range(0, len(keys), 1024):
                found = client.get_embeddings("vgg16", keys[start:start + 1024])[1]
                vectors += int(found.sum())
        get_embeddings = vectors / (time.perf_counter() - started)

        vectors, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for part in client.embed_stream("vgg16", images, chunk_size=256):
                vectors += int(part.cached.sum())
        stream = vectors / (time.perf_counter() - started)
    return {"embed_32_hits": single, "get_embeddings_vectors_per_s": get_embeddings,
            "embed_stream_vectors_per_s": stream, "distinct_vectors": len(keys)}


def start_server(store: Path) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "extractor", "serve", "--port", "0", "--store", str(store), "--backbones", "vgg16"],
        cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    if not line.startswith("listening on "):
        server.kill()
        raise SystemExit(f"server did not start: {line!r}")
    return server, line.split()[-1]


def median_of(rounds: list[dict], *path: str) -> float:
    values = []
    for entry in rounds:
        for key in path:
            entry = entry[key]
        values.append(entry)
    return round(statistics.median(values), 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "benchmarks" / "results" / "grpc_load.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    client_counts = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        server, target = start_server(Path(tmp) / "served.sqlite")
        try:
            with FeatureClient(target) as client:
                client.wait_until_serving(timeout=300)
            spec = get_backbone_spec("vgg16")
            images = FreshImages(keep=4096)
            rounds = []
            with EmbeddingStore(Path(tmp) / "in_process.sqlite") as store:
                embedder = Embedder(spec, store)
                embedder.embed(list(next(images.stream(served=False))))  # build and trace outside the clock
                for r in range(args.rounds):
                    entry = {"in_process": in_process(embedder, images, args.seconds)}
                    for clients in client_counts:
                        entry[f"clients_{clients}"] = served(target, clients, images, args.seconds)
                    entry["ratios"] = {f"clients_{c}": entry[f"clients_{c}"]["images_per_s"]
                                       / entry["in_process"]["images_per_s"] for c in client_counts}
                    log.info("round %d: %s", r + 1, json.dumps(entry))
                    rounds.append(entry)
            hits = [cache_hits(target, np.stack(images.kept), args.seconds) for _ in range(args.rounds)]
        finally:
            server.terminate()
            server.wait(60)

    summary = {
        "in_process_images_per_s": median_of(rounds, "in_process", "images_per_s"),
        **{f"clients_{c}": {key: median_of(rounds, f"clients_{c}", key) for key in ("images_per_s", "p50_ms", "p99_ms")}
           for c in client_counts},
        "served_over_in_process": {f"clients_{c}": median_of(rounds, "ratios", f"clients_{c}") for c in client_counts},
        "cache_hits": {
            "embed_32_p50_ms": median_of(hits, "embed_32_hits", "p50_ms"),
            "embed_32_p99_ms": median_of(hits, "embed_32_hits", "p99_ms"),
            "get_embeddings_vectors_per_s": median_of(hits, "get_embeddings_vectors_per_s"),
            "embed_stream_vectors_per_s": median_of(hits, "embed_stream_vectors_per_s"),
        },
    }
    report = {"benchmark": "grpc_load", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
              "cpus": os.cpu_count(), "seconds_per_measurement": args.seconds, "request_images": REQUEST_IMAGES,
              "backbone": f"vgg16 {SIDE}x{SIDE}, {spec.output_dim}-d", "targets": TARGETS, "summary": summary,
              "rounds": rounds, "cache_hit_rounds": hits}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))

    print(f"in-process embed (32-image calls): {summary['in_process_images_per_s']:.0f} images/s")
    for c in client_counts:
        s = summary[f"clients_{c}"]
        print(f"{c:>2} client(s): {s['images_per_s']:7.0f} images/s  p50 {s['p50_ms']:7.1f} ms  p99 {s['p99_ms']:7.1f} ms"
              f"  x{summary['served_over_in_process'][f'clients_{c}']:.2f} of in-process")
    h = summary["cache_hits"]
    print(f"cache hits: 32-image Embed p50 {h['embed_32_p50_ms']:.1f} ms, p99 {h['embed_32_p99_ms']:.1f} ms; "
          f"GetEmbeddings {h['get_embeddings_vectors_per_s']:.0f} vectors/s; "
          f"EmbedStream {h['embed_stream_vectors_per_s']:.0f} vectors/s")
    print(f"targets: {TARGETS}\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
