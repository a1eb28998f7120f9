"""Saving and loading trained heads: the model file plus a JSON sidecar that pins its sha256 and provenance.

Keras heads are stored in the `.keras` format, scikit-learn ones with joblib. joblib is pickle, so
a model file is deserialised only after its sha256 matches the one its sidecar recorded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from extractor.errors import ChecksumError, InvalidInputError
from extractor.paths import file_sha256

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar beside a model file: `<path>.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _versions() -> dict[str, str]:
    import keras
    import sklearn
    import tensorflow as tf

    return {"tensorflow": tf.__version__, "keras": keras.__version__, "sklearn": sklearn.__version__,
            "numpy": np.__version__}


def _json_safe(value):
    """value as JSON, or its repr where JSON has no form for it (estimators, arrays)."""
    if isinstance(value, np.generic):
        return value.item()
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def save_head(head, path: str | Path, *, backbone_fingerprint: str, class_names) -> Path:
    """Write a fitted head to `path` (suffix `.keras` for Keras heads, `.joblib` otherwise, added if
    missing) and its sidecar `<path>.json`; returns the model file's path."""
    from classifiers.heads import KerasHead

    is_keras = isinstance(head, KerasHead)
    path = Path(path)
    suffix = ".keras" if is_keras else ".joblib"
    if path.suffix != suffix:
        path = path.with_name(path.name + suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_keras:
        head.model_.save(path)
        fitted = {"n_features_in_": int(head.n_features_in_), "history_": head.history_}
    else:
        import joblib

        joblib.dump(head, path)
        fitted = {}
    sidecar = {
        "format": FORMAT_VERSION,
        "kind": "keras" if is_keras else "sklearn",
        "estimator": f"{type(head).__module__}.{type(head).__qualname__}",
        "model_file": path.name,
        "sha256": file_sha256(path),
        "params": {key: _json_safe(value) for key, value in head.get_params(deep=not is_keras).items()},
        "classes": [_json_safe(c) for c in head.classes_],
        "class_names": [str(name) for name in class_names],
        "backbone_fingerprint": backbone_fingerprint,
        "versions": _versions(),
        "fitted": fitted,
    }
    sidecar_path(path).write_text(json.dumps(sidecar, indent=2))
    log.info("saved %s head to %s", sidecar["kind"], path)
    return path


def read_sidecar(path: str | Path) -> dict:
    """The sidecar of the model file at `path`."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        raise InvalidInputError(f"no sidecar {sidecar} beside {path}")
    return json.loads(sidecar.read_text())


def load_head(path: str | Path):
    """The head saved at `path`, after checking the model file's sha256 against its sidecar."""
    path = Path(path)
    sidecar = read_sidecar(path)
    actual = file_sha256(path)
    if actual != sidecar["sha256"]:
        raise ChecksumError(f"sha256 mismatch for {path}: sidecar says {sidecar['sha256']}, file has {actual}; "
                            "refusing to load it")
    if sidecar["kind"] == "sklearn":
        import joblib

        return joblib.load(path)
    import keras

    import classifiers.keras_training  # noqa: F401  registers the custom layer for deserialisation
    from classifiers.heads import KerasHead

    head = KerasHead(**sidecar["params"])
    head.model_ = keras.saving.load_model(path)
    head.classes_ = np.asarray(sidecar["classes"])
    head.n_features_in_ = sidecar["fitted"]["n_features_in_"]
    head.history_ = sidecar["fitted"]["history_"]
    return head
