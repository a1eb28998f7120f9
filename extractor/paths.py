"""Where data, weights, caches and the store live; the one module that reads environment variables.

EXTRACTOR_DATA_DIR   the shared datasets and weights (default: ../shared/data beside the project)
EXTRACTOR_CACHE_DIR  extracted archives, pretrained models (default: $XDG_CACHE_HOME/extractor)
EXTRACTOR_STORE      the embedding store file (default: <cache dir>/store.sqlite)
EXTRACTOR_MODEL_REPOSITORY  the user's model repository (default: <cache dir>/model-repository)
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from stat import S_ISREG

from extractor.errors import ChecksumError, InvalidInputError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The directory holding the shared datasets and weights, with SHA256SUMS."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("EXTRACTOR_DATA_DIR"):
        return Path(os.environ["EXTRACTOR_DATA_DIR"]).expanduser()
    for candidate in (PROJECT_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return PROJECT_ROOT.parent / "shared" / "data"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The directory for derived files (extracted archives, pretrained models); created on demand."""
    if override:
        root = Path(override).expanduser()
    elif os.environ.get("EXTRACTOR_CACHE_DIR"):
        root = Path(os.environ["EXTRACTOR_CACHE_DIR"]).expanduser()
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "extractor"
    root.mkdir(parents=True, exist_ok=True)
    return root


def store_path(override: str | os.PathLike | None = None) -> Path:
    """The embedding store file."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("EXTRACTOR_STORE"):
        return Path(os.environ["EXTRACTOR_STORE"]).expanduser()
    return cache_dir() / "store.sqlite"


def model_repository(override: str | os.PathLike | None = None) -> Path:
    """The user's model repository folder (searched before the one shipped with the project)."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("EXTRACTOR_MODEL_REPOSITORY"):
        return Path(os.environ["EXTRACTOR_MODEL_REPOSITORY"]).expanduser()
    return cache_dir() / "model-repository"


def shards_dir(override: str | os.PathLike | None, feature_set: str) -> Path:
    """The folder for a Ray job's Parquet shards and manifest (default: per feature set in the cache)."""
    if override:
        return Path(override).expanduser()
    # One path component inside shards/: never empty, "." or "..", which would be the folder itself or its parent.
    return cache_dir() / "shards" / (re.sub(r"^\.|[^A-Za-z0-9._-]", "_", feature_set) or "_")


def file_identity(path: str) -> tuple[str, int, int] | None:
    """(path, size, mtime_ns) of a regular file, or None: what a remembered pixel digest is valid for."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (path, stat.st_size, stat.st_mtime_ns) if S_ISREG(stat.st_mode) else None


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(folder: str | os.PathLike) -> str:
    """Hex sha256 of a folder (a SavedModel): over each file's relative path and sha256, sorted."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def content_sha256(path: str | os.PathLike) -> str:
    """sha256 of a model file, or of a model folder's files (`tree_sha256`)."""
    return tree_sha256(path) if Path(path).is_dir() else file_sha256(path)


def published_sha256(filename: str, directory: Path) -> str | None:
    """The sha256 listed for `filename` in `directory`/SHA256SUMS, or None if it is not listed."""
    sums = directory / "SHA256SUMS"
    if not sums.is_file():
        return None
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == filename:
            return parts[0].lower()
    return None


_verified: dict[tuple[str, float, int], str] = {}


def verified_file(path: str | os.PathLike, expected_sha256: str | None) -> Path:
    """Return `path` after checking it exists and its sha256 (`content_sha256`) equals `expected_sha256`.

    A file is hashed once per process (keyed by path, mtime and size), so repeated loads stay cheap.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"file not found: {path}")
    if not expected_sha256:
        raise ChecksumError(f"no sha256 known for {path}: list it in SHA256SUMS or pass one")
    stat = path.stat()
    cache_key = (str(path.resolve()), stat.st_mtime, stat.st_size)
    actual = _verified.get(cache_key) or content_sha256(path)
    if actual != expected_sha256.lower():
        raise ChecksumError(
            f"sha256 mismatch for {path}: expected {expected_sha256.lower()}, got {actual}; "
            "the file is corrupt or not the one expected"
        )
    _verified[cache_key] = actual
    return path
