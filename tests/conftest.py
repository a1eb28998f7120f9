"""Shared fixtures: the shared data directory, a per-session cache directory, the VGG16 spec and saved heads
that test servers serve, and the two sizes of the reliability tests with the figures they report."""

import dataclasses
import io
import os

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from classifiers.persistence import save_head
from extractor import paths
from extractor.models import get_backbone_spec, load_backbone
from extractor.serving.grpc_server import FeatureServer
from extractor.cli import saved_heads
from extractor.serving.metrics import ServingMetrics
from extractor.serving.requests import Limits
from extractor.serving.service import FeatureService
from extractor.store import EmbeddingStore

LIMITS = Limits(max_images_per_request=64, max_decoded_pixels=100 * 100)
MAX_MESSAGE_BYTES = 2 * 2**20
CLASSES = ["cat", "dog", "owl"]


@pytest.fixture(scope="session")
def data_dir():
    directory = paths.data_dir()
    if not (directory / "SHA256SUMS").is_file():
        pytest.fail(f"shared data not found at {directory}; set EXTRACTOR_DATA_DIR")
    return directory


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """Derived files go to a temporary cache shared by the session, never the user's cache."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("EXTRACTOR_CACHE_DIR")
    os.environ["EXTRACTOR_CACHE_DIR"] = str(cache)
    os.environ.pop("EXTRACTOR_STORE", None)
    yield cache
    if old is None:
        os.environ.pop("EXTRACTOR_CACHE_DIR", None)
    else:
        os.environ["EXTRACTOR_CACHE_DIR"] = old


def small_image_model(side: int, filters: int, embedding_units: int | None = None):
    """A seeded functional image model made here: conv -> relu -> global average pool [-> dense
    'embedding'] -> dense 'logits' (5 classes), its input named 'pixels'."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((side, side, 3), name="pixels")
    x = keras.layers.Conv2D(filters, 3, name="conv")(inputs)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    if embedding_units:
        x = keras.layers.Dense(embedding_units, name="embedding")(x)
    return keras.Model(inputs, keras.layers.Dense(5, name="logits")(x))


def make_npz(path, n: int, seed: int = 0, size: int = 32, classes: int = 3):
    """A small npz dataset of random uint8 images (n, size, size, 3) with labels; returns its data spec."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.savez(path, x=x, y=rng.integers(0, classes, n), class_names=np.array([f"c{i}" for i in range(classes)]))
    return f"npz:{path}"


def random_images(n: int, seed: int, size: int = 32, channels: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, channels), dtype=np.uint8) for _ in range(n)]


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array.squeeze()).save(out, format="PNG")
    return out.getvalue()


# --- test servers: VGG16 at 32x32 and heads saved by classifiers.persistence -------------------------------

@pytest.fixture(scope="session")
def spec(data_dir):
    return get_backbone_spec("vgg16", data_dir=data_dir)


def renamed(spec, name: str):
    """The same backbone as another entry of a repository, named `name`."""
    return dataclasses.replace(spec, config=dataclasses.replace(spec.config, name=name))


def fitted_head(spec, head=None):
    """`head` (default: a logistic regression) fitted on random vectors of `spec`'s width, 3 classes."""
    X = np.random.default_rng(0).normal(size=(60, spec.output_dim)).astype(np.float32)
    return (head or LogisticRegression(max_iter=200)).fit(X, np.arange(60) % 3)


@pytest.fixture(scope="session")
def heads_dir(spec, tmp_path_factory):
    """Saved heads: `lr` for VGG16 and `orphan` for a backbone not served; and a file that is not a head."""
    folder = tmp_path_factory.mktemp("heads")
    save_head(fitted_head(spec), folder / "lr", backbone_fingerprint=spec.fingerprint, class_names=CLASSES)
    save_head(fitted_head(spec), folder / "orphan", backbone_fingerprint="0" * 64, class_names=CLASSES)
    (folder / "notes.txt").write_text("not a head")
    return folder


def start_server(spec, store_path, *, heads_dir=None, backbone_loader=load_backbone, start=True, max_wait=0.05,
                 limits=LIMITS, max_message_bytes=MAX_MESSAGE_BYTES, catalog=None, **server_options):
    """A gRPC server on port 0 in this process, its metrics at `server.metrics`."""
    metrics = ServingMetrics()
    service = FeatureService([spec], EmbeddingStore(store_path), limits=limits, max_wait=max_wait,
                             heads=lambda: saved_heads(heads_dir), backbone_loader=backbone_loader, catalog=catalog,
                             events=[metrics])
    metrics.watch(lambda: len(service.served), store_path)
    server = FeatureServer(service, port=0, max_message_bytes=max_message_bytes, metrics=metrics, **server_options)
    server.metrics = metrics
    if start:
        server.start()
    return server


# --- reliability tests: a short size for `make test`, a full one for `make test-reliability` ---------------

def process_status(pid: int | str = "self") -> dict[str, int]:
    """What /proc says of a process: resident and peak memory in bytes, threads, open file descriptors."""
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines())
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "peak_rss": int(fields["VmHWM"].split()[0]) * 1024,
            "threads": int(fields["Threads"]), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def reliability_sizes(short, full) -> list:
    """Parameters for a reliability test's two sizes: the short one runs with `make test`; the full one is
    marked `reliability`, runs with `make test-reliability` and reports to benchmarks/results/reliability.json."""
    return [pytest.param(short, id="short"), pytest.param(full, id="full", marks=pytest.mark.reliability)]


class ReliabilityFigures:
    """Counts and measurements of the reliability tests, by name; counts add up over tests. The counts of
    what must never happen start at 0, so a report says so even when nothing went wrong."""

    MUST_BE_ZERO = ("internal_errors", "crashes", "vectors_lost", "store_verify_failures", "errors_under_load",
                    "calls_lost_on_sigterm")

    def __init__(self):
        self.values: dict = {"cases_tried": 0, "kills": 0, **dict.fromkeys(self.MUST_BE_ZERO, 0)}
        self.tests: list[str] = []

    def add(self, **counts: int) -> None:
        for name, count in counts.items():
            self.values[name] = self.values.get(name, 0) + count

    def set(self, **values) -> None:
        self.values.update(values)

    def cases(self, target: str, count: int) -> None:
        """`count` generated cases tried against `target` (an RPC or a reader)."""
        self.add(cases_tried=count)
        by_target = self.values.setdefault("cases_by_target", {})
        by_target[target] = by_target.get(target, 0) + count


FULL_RUN_FIGURES = ReliabilityFigures()


@pytest.fixture
def figures(request) -> ReliabilityFigures:
    """Where a reliability test records its figures; only the full size's are reported."""
    if request.node.get_closest_marker("reliability"):
        FULL_RUN_FIGURES.tests.append(request.node.nodeid)
        return FULL_RUN_FIGURES
    return ReliabilityFigures()


def pytest_sessionfinish(session, exitstatus):
    """After a run with full-size reliability tests: their figures to benchmarks/results/reliability.json."""
    if FULL_RUN_FIGURES.tests:
        from benchmarks.common import write_results

        path = write_results("reliability", {**FULL_RUN_FIGURES.values, "all_passed": exitstatus == 0,
                                             "tests": FULL_RUN_FIGURES.tests})
        print(f"\nreliability figures written to {path}")
