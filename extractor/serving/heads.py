"""Heads as the core serves them: class probabilities for the vectors of one backbone, handed to the core."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extractor.errors import InvalidInputError

HEAD_SUFFIXES = (".keras", ".skops", ".joblib")  # see classifiers.persistence, which refuses .joblib (pickles)


@dataclass
class Head:
    """A saved head as the service uses it: class probabilities for vectors of one backbone."""

    name: str
    backbone_fingerprint: str
    class_names: list[str]
    model: Any  # predict_proba((n, d) float32) -> (n, k), columns in class_names order


HeadLoader = Callable[[Path], Head]


def load_heads(directory: str | Path, loader: HeadLoader) -> dict[str, Head]:
    """Every saved head in `directory` (files ending in .keras, .skops or .joblib), by name, each read by `loader`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InvalidInputError(f"heads directory not found: {directory}")
    heads: dict[str, Head] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix in HEAD_SUFFIXES:
            head = loader(path)
            if head.name in heads:
                raise InvalidInputError(f"two heads named {head.name!r} in {directory}")
            heads[head.name] = head
    return heads
