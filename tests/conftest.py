"""Shared fixtures: the shared data directory and a per-session cache directory."""

import os

import pytest

from extractor import paths


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


def make_npz(path, n: int, seed: int = 0, size: int = 32, classes: int = 3):
    """A small npz dataset of random uint8 images (n, size, size, 3) with labels; returns its data spec."""
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    np.savez(path, x=x, y=rng.integers(0, classes, n), class_names=np.array([f"c{i}" for i in range(classes)]))
    return f"npz:{path}"
