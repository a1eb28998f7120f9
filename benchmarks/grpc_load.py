"""Served load on loopback, by protocol: served vs in-process embed throughput and latency, and cache-hit throughput.

A server runs as its own process (`python -m extractor serve --port 0 --http-port 0`, VGG16 at 32x32, 512-d)
on a temporary store; clients are threads here. Each round measures, for the same time each: the in-process
Embedder on 32-image calls of new images, then 1, 4 and 16 concurrent clients sending 32-image calls of new
images over each protocol: the own gRPC API (`FeatureClient.embed`), the Open Inference Protocol over gRPC
(`tritonclient.grpc`, raw tensors) and over REST (`tritonclient.http`, the binary tensor extension). Then
cache hits on the own API: single 32-image Embed calls (latency), GetEmbeddings and EmbedStream (vectors/s).
Medians over rounds are printed with their ratios and written as JSON.

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
PROTOCOLS = ("grpc", "oip-grpc", "rest")
TARGETS = {"served_over_in_process_at_4_plus_clients": 0.85, "oip_grpc_over_in_process_at_4_plus_clients": 0.85,
           "rest_binary_over_in_process_at_4_plus_clients": 0.7, "cache_hit_vectors_per_s": 50_000,
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


def connect(protocol: str, targets: dict[str, str]):
    """A new client of `protocol`, connected: (embed 32 new images and check the vectors, close)."""
    if protocol == "grpc":
        client = FeatureClient(targets["grpc"], timeout=120)
        client.limits()

        def embed(batch: np.ndarray) -> None:
            result = client.embed("vgg16", batch)
            assert not result.errors and not result.cached.any()
        return embed, client.close
    if protocol == "oip-grpc":
        import tritonclient.grpc as triton
        client = triton.InferenceServerClient(targets["grpc"])
    else:
        import tritonclient.http as triton
        client = triton.InferenceServerClient(targets["http"], network_timeout=120)
    assert client.is_model_ready("vgg16")

    def infer(batch: np.ndarray) -> None:
        pixels = triton.InferInput("PIXELS", list(batch.shape), "UINT8")
        pixels.set_data_from_numpy(batch)
        assert client.infer("vgg16", [pixels]).as_numpy("EMBEDDING").shape == (len(batch), 512)
    return infer, client.close


def served(targets: dict[str, str], protocol: str, clients: int, images: FreshImages, seconds: float) -> dict:
    latencies: list[float] = []
    counts = [0] * clients
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def run(i: int) -> None:
        stream = images.stream()
        embed, close = connect(protocol, targets)  # connect before the clock starts
        try:
            start.wait()
            while time.perf_counter() < stop_at[0]:
                batch = next(stream)
                t0 = time.perf_counter()
                embed(batch)
                latencies.append(time.perf_counter() - t0)
                counts[i] += len(batch)
        finally:
            close()

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


def start_server(store: Path) -> tuple[subprocess.Popen, dict[str, str]]:
    """The server process and its addresses: {"grpc": HOST:PORT, "http": HOST:PORT}."""
    server = subprocess.Popen(
        [sys.executable, "-m", "extractor", "serve", "--port", "0", "--http-port", "0", "--store", str(store),
         "--backbones", "vgg16"],
        cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, stdout=subprocess.PIPE, text=True)
    lines = [server.stdout.readline(), server.stdout.readline()]
    if not lines[0].startswith("listening on ") or not lines[1].startswith("http on "):
        server.kill()
        raise SystemExit(f"server did not start: {lines!r}")
    return server, {"grpc": lines[0].split()[-1], "http": lines[1].split()[-1]}


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
        server, targets = start_server(Path(tmp) / "served.sqlite")
        target = targets["grpc"]
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
                    for protocol in PROTOCOLS:
                        for clients in client_counts:
                            entry[f"{protocol}_clients_{clients}"] = served(targets, protocol, clients, images,
                                                                            args.seconds)
                    entry["ratios"] = {f"{p}_clients_{c}": entry[f"{p}_clients_{c}"]["images_per_s"]
                                       / entry["in_process"]["images_per_s"] for p in PROTOCOLS for c in client_counts}
                    log.info("round %d: %s", r + 1, json.dumps(entry))
                    rounds.append(entry)
            hits = [cache_hits(target, np.stack(images.kept), args.seconds) for _ in range(args.rounds)]
        finally:
            server.terminate()
            server.wait(60)

    summary = {
        "in_process_images_per_s": median_of(rounds, "in_process", "images_per_s"),
        **{f"{p}_clients_{c}": {key: median_of(rounds, f"{p}_clients_{c}", key)
                                for key in ("images_per_s", "p50_ms", "p99_ms")}
           for p in PROTOCOLS for c in client_counts},
        "served_over_in_process": {f"{p}_clients_{c}": median_of(rounds, "ratios", f"{p}_clients_{c}")
                                   for p in PROTOCOLS for c in client_counts},
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
    print(f"{'clients':>7}  " + "  ".join(f"{p:>30}" for p in PROTOCOLS))
    for c in client_counts:
        cells = []
        for p in PROTOCOLS:
            s = summary[f"{p}_clients_{c}"]
            cells.append(f"{s['images_per_s']:6.0f}/s p99 {s['p99_ms']:6.1f} ms "
                         f"x{summary['served_over_in_process'][f'{p}_clients_{c}']:.2f}")
        print(f"{c:>7}  " + "  ".join(f"{cell:>30}" for cell in cells))
    h = summary["cache_hits"]
    print(f"cache hits: 32-image Embed p50 {h['embed_32_p50_ms']:.1f} ms, p99 {h['embed_32_p99_ms']:.1f} ms; "
          f"GetEmbeddings {h['get_embeddings_vectors_per_s']:.0f} vectors/s; "
          f"EmbedStream {h['embed_stream_vectors_per_s']:.0f} vectors/s")
    print(f"targets: {TARGETS}\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
