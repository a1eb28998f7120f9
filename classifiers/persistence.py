"""Saving and loading trained heads so that loading one cannot run code: the model file plus a JSON
sidecar that pins its sha256 and provenance.

Keras heads are stored in the `.keras` format and loaded with `safe_mode=True` (no Lambda layers);
scikit-learn heads with `skops` (`.skops`), which rebuilds only types on a trusted list and names any
other type instead of importing it. A head is loaded only from inside its folder (no links out of it),
and only after its sha256 matches its sidecar's. Old joblib heads are pickles: they are refused, with
how to re-save them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from extractor.errors import ChecksumError, InvalidInputError, UntrustedModelError
from extractor.paths import file_sha256

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: scikit-learn heads in skops instead of joblib
KERAS_SUFFIX, SKLEARN_SUFFIX, JOBLIB_SUFFIX = ".keras", ".skops", ".joblib"
# Types a saved scikit-learn head may hold beyond those skops trusts by default (scikit-learn's
# estimators, numpy, scipy): the project's own heads and the pure-data parts scikit-learn builds inside them.
TRUSTED_TYPES = frozenset({
    "classifiers.baselines.SweptLogisticRegression",
    "sklearn.model_selection._split.StratifiedKFold",
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.metrics._dist_metrics.ManhattanDistance64",
    "sklearn.metrics._dist_metrics.MinkowskiDistance64",
    "sklearn.metrics._dist_metrics.ChebyshevDistance64",
})


def sidecar_path(path: str | Path) -> Path:
    """The JSON sidecar beside a model file: `<path>.json`."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _versions() -> dict[str, str]:
    import keras
    import sklearn
    import skops
    import tensorflow as tf

    return {"tensorflow": tf.__version__, "keras": keras.__version__, "sklearn": sklearn.__version__,
            "numpy": np.__version__, "skops": skops.__version__}


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
    """Write a fitted head to `path` (suffix `.keras` for Keras heads, `.skops` otherwise, added if
    missing) and its sidecar `<path>.json`; returns the model file's path.

    A scikit-learn head holding a type `load_head` would refuse is not written (UntrustedModelError).
    """
    from classifiers.heads import KerasHead

    is_keras = isinstance(head, KerasHead)
    path = Path(path)
    suffix = KERAS_SUFFIX if is_keras else SKLEARN_SUFFIX
    if path.suffix != suffix:
        path = path.with_name(path.name + suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_keras:
        head.model_.save(path)
        fitted = {"n_features_in_": int(head.n_features_in_), "history_": head.history_}
    else:
        import skops.io

        skops.io.dump(head, path)
        try:
            _check_trusted(path)
        except UntrustedModelError:
            path.unlink()
            raise
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
    try:
        return json.loads(sidecar.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"sidecar {sidecar} is not JSON: {exc}") from None


def load_head(path: str | Path, *, folder: str | Path | None = None):
    """The head saved at `path`, which must lie inside `folder` (default: the folder `path` names), after
    checking the model file's sha256 against its sidecar. Nothing in the file can run code: joblib
    heads and untrusted types are refused (UntrustedModelError), Keras heads load in safe mode."""
    path = Path(path)
    _check_inside(path, Path(folder) if folder is not None else path.parent)
    if path.suffix == JOBLIB_SUFFIX:
        raise UntrustedModelError(
            f"{path} is a joblib head, a pickle that can run code when loaded, and is no longer loaded; re-save it "
            f"as {path.stem}{SKLEARN_SUFFIX}: train it again (python -m classifiers train ... --out "
            f"{path.with_suffix('')}), or, if you trust this file, convert it: python -c \"from "
            f"classifiers.persistence import convert_joblib_head; convert_joblib_head('{path}')\"")
    sidecar = read_sidecar(path)
    _check_sha256(path, sidecar)
    if sidecar.get("kind") == "sklearn" and path.suffix == SKLEARN_SUFFIX:
        return _load_skops(path)
    if sidecar.get("kind") == "keras" and path.suffix == KERAS_SUFFIX:
        return _load_keras(path, sidecar)
    raise InvalidInputError(f"{path}: a {sidecar.get('kind')!r} head cannot be a {path.suffix or 'suffix-less'} file")


def _check_inside(path: Path, folder: Path) -> None:
    """Refuse a model file or sidecar that resolves (through links) outside `folder`."""
    root = folder.resolve()
    for file in (path, sidecar_path(path)):
        if not file.resolve().is_relative_to(root):
            raise UntrustedModelError(f"{file} resolves to {file.resolve()}, outside the heads folder {root}: "
                                      "refusing to load it")


def _check_sha256(path: Path, sidecar: dict) -> None:
    actual = file_sha256(path)
    if actual != sidecar.get("sha256"):
        raise ChecksumError(f"sha256 mismatch for {path}: sidecar says {sidecar.get('sha256')}, file has {actual}; "
                            "refusing to load it")


def _check_trusted(path: Path) -> list[str]:
    """The types in a skops file beyond skops' defaults, all of them trusted; UntrustedModelError names the others."""
    import skops.io

    try:
        extra = skops.io.get_untrusted_types(file=path)
    except Exception as exc:  # not a zip, no schema, ...: skops' own errors vary by what is broken
        raise InvalidInputError(f"{path} is not a readable skops file: {exc}") from exc
    refused = sorted(set(extra) - TRUSTED_TYPES)
    if refused:
        raise UntrustedModelError(f"{path} holds types that are not trusted: {', '.join(refused)}; refusing to "
                                  "load it")
    return extra


def _load_skops(path: Path):
    import skops.io

    trusted = _check_trusted(path)
    try:
        return skops.io.load(path, trusted=trusted)
    except Exception as exc:
        raise InvalidInputError(f"cannot load {path}: {exc}") from exc


def _load_keras(path: Path, sidecar: dict):
    import keras

    import classifiers.keras_training  # noqa: F401  registers the custom layer for deserialisation
    from classifiers.heads import KerasHead

    head = KerasHead(**sidecar["params"])
    try:
        head.model_ = keras.saving.load_model(path, safe_mode=True)
    except Exception as exc:  # Keras raises ValueError, OSError, zipfile's errors, ... for broken files
        if "safe_mode" in str(exc):
            raise UntrustedModelError(f"{path} holds Python code (a Lambda layer), which safe mode does not load: "
                                      "refusing to load it") from None
        raise InvalidInputError(f"cannot load {path}: {exc}") from exc
    head.classes_ = np.asarray(sidecar["classes"])
    head.n_features_in_ = sidecar["fitted"]["n_features_in_"]
    head.history_ = sidecar["fitted"]["history_"]
    return head


def convert_joblib_head(path: str | Path) -> Path:
    """Re-save an old joblib head (and its sidecar) as a `.skops` head beside it; return the new file.

    This unpickles the file, so call it only on a file you trust (one this project wrote): its sha256 is
    checked against its sidecar first. The joblib file and its sidecar are removed once the new head loads.
    """
    import joblib

    path = Path(path)
    sidecar = read_sidecar(path)
    _check_sha256(path, sidecar)
    head = joblib.load(path)
    new_path = save_head(head, path.with_suffix(""), backbone_fingerprint=sidecar["backbone_fingerprint"],
                         class_names=sidecar["class_names"])
    load_head(new_path)
    path.unlink()
    sidecar_path(path).unlink()
    log.info("converted %s to %s", path, new_path)
    return new_path
