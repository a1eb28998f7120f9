"""`python -m extractor serve` as its own process under load: a soak of mixed calls that leaks nothing, and
SIGTERM while calls are in flight, which answers every accepted call and exits 0."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import CLASSES, process_status, random_images, reliability_sizes
from extractor.serving.client import FeatureClient, RemoteError
from extractor.store import EmbeddingStore

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 16
GRACE = 60.0
# Threads the server may add after the warm-up: the thread pool of each kind of call grows a worker at a time up
# to its cap when every worker is busy; a thread leaked per call would add hundreds.
POOL_GROWTH = 8


class ServedProcess:
    """The server in its own process on a free port, its store and log in `folder`; ready once built. With a
    `token`, the server requires it (and the readiness check sends it)."""

    def __init__(self, folder: Path, data_dir: Path, *options: str, token: str | None = None):
        self.store, self.log = folder / "store.sqlite", folder / "server.log"
        if token is not None:
            (folder / "token").write_text(token)
            options = (*options, "--token-file", str(folder / "token"))
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "extractor", "--data-dir", str(data_dir), "serve", "--port", "0", "--store",
                 str(self.store), "--backbones", "vgg16", "--max-batch", "32", "--grace", str(GRACE), *options],
                cwd=PROJECT_ROOT, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, stdout=subprocess.PIPE,
                stderr=log, text=True)
        line = self.process.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line + self.log.read_text()
        self.target = line.split()[-1]
        with FeatureClient(self.target, token=token) as client:
            client.wait_until_serving(timeout=120)

    def status(self) -> dict[str, int]:
        return process_status(self.process.pid)

    def stop(self) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took."""
        signalled = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(GRACE + 30), time.monotonic() - signalled


@pytest.fixture
def serve(tmp_path, data_dir):
    """Start servers with `serve(*options)`; any still running at the end is killed."""
    started = []

    def start(*options: str) -> ServedProcess:
        started.append(ServedProcess(tmp_path, data_dir, *options))
        return started[-1]

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


class MixedCalls:
    """One client's calls: new images, cache hits, stored vectors by key, a head, streams, and deliberate
    errors, each checked against what was computed before; anything else is an error under load."""

    KINDS = ["embed new", "embed hits", "get embeddings", "classify", "stream", "unknown backbone", "bad image"]

    def __init__(self, client: FeatureClient, seed: int, pool: np.ndarray, expected):
        self.client, self.rng, self.pool, self.expected = client, np.random.default_rng(seed), pool, expected
        self.done: Counter = Counter()
        self.errors: list[str] = []

    def run(self, until: float) -> None:
        while time.monotonic() < until:
            kind = self.KINDS[self.rng.integers(len(self.KINDS))]
            try:
                getattr(self, kind.replace(" ", "_"))()
                self.done[kind] += 1
            except Exception as exc:  # noqa: BLE001  every failure is counted, then reported by the test
                self.errors.append(f"{kind}: {exc!r}")

    def hits(self, n: int) -> np.ndarray:
        return self.rng.choice(len(self.pool), n, replace=False)

    def embed_new(self):
        result = self.client.embed("vgg16", random_images(4, seed=int(self.rng.integers(2**32))))
        assert result.vectors.shape == (4, 512) and np.isfinite(result.vectors).all() and not result.errors

    def embed_hits(self):
        chosen = self.hits(8)
        result = self.client.embed("vgg16", self.pool[chosen])
        assert result.cached.all() and np.array_equal(result.vectors, self.expected.vectors[chosen])

    def get_embeddings(self):
        chosen = self.hits(16)
        vectors, found = self.client.get_embeddings("vgg16", [self.expected.keys[i] for i in chosen])
        assert found.all() and np.array_equal(vectors, self.expected.vectors[chosen])

    def classify(self):
        result = self.client.classify("lr", self.pool[self.hits(4)])
        assert set(result.labels) <= set(CLASSES) and np.allclose(result.probabilities.sum(axis=1), 1, atol=1e-5)

    def stream(self):
        chosen = self.hits(6)
        images = [*self.pool[chosen], *random_images(2, seed=int(self.rng.integers(2**32)))]
        parts = list(self.client.embed_stream("vgg16", images, chunk_size=4))
        vectors = np.concatenate([part.vectors for part in parts])
        assert [part.offset for part in parts] == [0, 4] and np.array_equal(vectors[:6], self.expected.vectors[chosen])

    def unknown_backbone(self):
        try:
            self.client.embed("resnet", self.pool[:1])
        except RemoteError as exc:
            assert exc.code == grpc.StatusCode.NOT_FOUND
            return
        raise AssertionError("an unknown backbone was served")

    def bad_image(self):
        result = self.client.embed("vgg16", [b"junk", self.pool[0]])
        assert [(f.index, f.code) for f in result.errors] == [(0, grpc.StatusCode.INVALID_ARGUMENT)]
        assert np.array_equal(result.vectors[1], self.expected.vectors[0])


def run_clients(callers: list[MixedCalls], seconds: float) -> None:
    until = time.monotonic() + seconds
    threads = [threading.Thread(target=caller.run, args=(until,)) for caller in callers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@pytest.mark.parametrize("seconds", reliability_sizes(5, 60))
def test_soak_of_mixed_calls_leaks_nothing(seconds, serve, heads_dir, figures):
    """16 clients for `seconds` after a warm-up: no errors but the deliberate ones, resident memory grows
    under 10%, file descriptors come back to what they were and threads nearly so."""
    server = serve("--heads", str(heads_dir))
    pool = np.stack(random_images(64, seed=1))
    clients = [FeatureClient(server.target, timeout=60, retries=0) for _ in range(CLIENTS)]
    try:
        expected = clients[0].embed("vgg16", pool)
        callers = [MixedCalls(client, seed, pool, expected) for seed, client in enumerate(clients)]
        run_clients(callers, max(seconds / 4, 3))  # warm-up: every kind of call, every thread the pool makes
        time.sleep(1)
        warm = server.status()
        run_clients(callers, seconds)
        time.sleep(1)
        after = server.status()
    finally:
        for client in clients:
            client.close()
    errors = [error for caller in callers for error in caller.errors]
    calls = sum((caller.done for caller in callers), Counter())
    growth = 100 * (after["rss"] - warm["rss"]) / warm["rss"]
    figures.add(errors_under_load=len(errors), calls_under_load=sum(calls.values()),
                deliberate_errors_under_load=calls["unknown backbone"] + calls["bad image"])
    figures.set(soak_seconds=seconds, soak_clients=CLIENTS, rss_growth_pct=round(growth, 2),
                server_rss_mb_after_warm_up=warm["rss"] >> 20, thread_growth=after["threads"] - warm["threads"],
                fd_growth=after["fds"] - warm["fds"])
    assert not errors, errors[:10]
    assert set(calls) == set(MixedCalls.KINDS), calls
    assert growth < 10, (warm, after)
    assert after["threads"] <= warm["threads"] + POOL_GROWTH and after["fds"] <= warm["fds"], (warm, after)
    assert server.stop()[0] == 0


@pytest.mark.parametrize("clients", reliability_sizes(4, CLIENTS))
def test_sigterm_answers_every_accepted_call_and_exits_zero(clients, serve, figures):
    """SIGTERM while `clients` clients keep calling (96 new images at a time, streams, cache hits): every call
    started before the signal is answered in full, later ones are answered or refused UNAVAILABLE, the
    server exits 0 within its grace period, and everything it answered is in its store."""
    server = serve()
    pool = np.stack(random_images(32, seed=2))
    signalled = threading.Event()
    outcomes: list[tuple[float, float, str, object]] = []  # (started, finished, kind, result or status code)
    lock = threading.Lock()

    def keep_calling(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with FeatureClient(server.target, timeout=GRACE, retries=0) as client:
            while True:
                kind = ["embed new", "stream", "embed hits"][rng.integers(3)]
                started = time.monotonic()
                try:
                    if kind == "embed new":
                        result = client.embed("vgg16", random_images(96, seed=int(rng.integers(2**32))))
                    elif kind == "stream":
                        images = random_images(64, seed=int(rng.integers(2**32)))
                        result = list(client.embed_stream("vgg16", images, chunk_size=16))
                    else:
                        result = client.embed("vgg16", pool)
                except RemoteError as exc:
                    result = exc.code
                with lock:
                    outcomes.append((started, time.monotonic(), kind, result))
                if signalled.is_set() and isinstance(result, grpc.StatusCode):
                    return

    with FeatureClient(server.target) as client:
        client.embed("vgg16", pool)
    threads = [threading.Thread(target=keep_calling, args=(seed,)) for seed in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(2)  # calls in flight, their images computing in batches of 32
    signal_time = time.monotonic()
    signalled.set()
    code, seconds = server.stop()
    for thread in threads:
        thread.join(GRACE)
    accepted = [(kind, result) for started, _, kind, result in outcomes if started < signal_time - 0.2]
    late = [result for started, _, _, result in outcomes if started >= signal_time - 0.2]
    lost = [(kind, result) for kind, result in accepted if isinstance(result, grpc.StatusCode)]
    in_flight = sum(started < signal_time < finished for started, finished, _, _ in outcomes)
    figures.add(calls_lost_on_sigterm=len(lost), calls_in_flight_at_sigterm=in_flight)
    figures.set(sigterm_exit_code=code, sigterm_exit_seconds=round(seconds, 2), sigterm_grace_seconds=GRACE)
    assert not lost, lost
    assert in_flight >= 1 and code == 0 and seconds < GRACE
    assert all(not isinstance(r, grpc.StatusCode) or r == grpc.StatusCode.UNAVAILABLE for r in late), late
    assert any(isinstance(r, grpc.StatusCode) for r in late)  # the clients kept calling until refused
    assert "stopped" in server.log.read_text()
    answered = [result for _, result in accepted if not isinstance(result, grpc.StatusCode)]
    keys = [key for result in answered for part in (result if isinstance(result, list) else [result])
            for key in part.keys]
    with EmbeddingStore(server.store, readonly=True) as store:  # everything answered was committed
        assert all(store.has(key) for key in keys)
