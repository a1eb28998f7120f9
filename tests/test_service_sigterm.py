"""`python -m extractor serve` as its own process: SIGTERM lets in-flight calls finish, then exit 0."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from extractor.client import FeatureClient, RemoteError
from extractor.store import EmbeddingStore

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_sigterm_drains_in_flight_calls_then_exits_zero(tmp_path, data_dir):
    store_path = tmp_path / "store.sqlite"
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "extractor", "--data-dir", str(data_dir), "serve", "--port", "0", "--store",
         str(store_path), "--backbones", "vgg16", "--max-batch", "32", "--grace", "60"],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line + server.stderr.read()
        target = line.split()[-1]
        with FeatureClient(target) as client:
            client.wait_until_serving(timeout=90)

        rng = np.random.default_rng(0)
        batches = [[rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(96)] for _ in range(3)]
        results, finished, failures = {}, [], []

        def embed(i):
            try:
                with FeatureClient(target, timeout=60, retries=0) as client:
                    results[i] = client.embed("vgg16", batches[i])
                finished.append(time.monotonic())
            except Exception as exc:
                failures.append(exc)

        calls = [threading.Thread(target=embed, args=(i,)) for i in range(3)]
        for call in calls:
            call.start()
        time.sleep(0.5)  # the calls are in the server, their 288 images computing in batches of 32
        server.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.2)
        with FeatureClient(target, timeout=5, retries=0) as late:
            try:
                late.backbones()
                refused = None
            except RemoteError as exc:
                refused = exc.code
        for call in calls:
            call.join(60)
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
    stderr = server.stderr.read()
    assert not failures, failures
    assert refused == grpc.StatusCode.UNAVAILABLE, stderr
    assert max(finished) > signalled  # at least one call was still in flight
    assert sorted(results) == [0, 1, 2] and all(r.vectors.shape == (96, 512) for r in results.values())
    assert "stopped" in stderr
    with EmbeddingStore(store_path, readonly=True) as store:  # everything computed was committed
        assert all(store.has(key) for r in results.values() for key in r.keys)
