"""Outcomes of trials that cannot use the embedding store (from-scratch and classic rows), kept by content key.

Such a trial trains a whole CNN on pixels; its outcome is a function of its settings, data and seed,
so it is computed once and reused, like a vector. The key hashes everything that changes the outcome.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from classifiers.classic import ClassicRun

FORMAT_VERSION = 2


class TrialCache:
    """One JSON file per trial outcome under `root` (default: <cache dir>/trials)."""

    def __init__(self, root: str | os.PathLike | None = None):
        from extractor import paths

        self.root = Path(root) if root else paths.cache_dir() / "trials"

    @staticmethod
    def key(**fields) -> str:
        import keras
        import tensorflow as tf

        fields |= {"format": FORMAT_VERSION, "tensorflow": tf.__version__, "keras": keras.__version__}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def get(self, key: str) -> ClassicRun | None:
        path = self.root / f"{key}.json"
        try:
            return ClassicRun(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def put(self, key: str, run: ClassicRun) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        partial = self.root / f".{key}.{os.getpid()}.json"
        partial.write_text(json.dumps(asdict(run)))
        os.replace(partial, self.root / f"{key}.json")
