"""The Python API of the heads: train one head, or compare heads over trials, on stored feature sets or arrays.
The `classifiers` command line calls these same functions.

    from classifiers import api
    head = api.train_head("logreg", "c10-train", out="heads/c10").model      # saved for `extractor serve`
    result = api.compare_heads("c10-train", "c10-test", heads=["linear", "logreg"], trials=5)
    print(api.format_table(result))
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from classifiers.report import ExperimentResult, MethodResult, format_table
from extractor import api as core
from extractor.errors import ChecksumError, InvalidInputError

log = logging.getLogger(__name__)

__all__ = ["Features", "TrainedHead", "compare_heads", "export_head", "features", "format_table", "train_head"]


@dataclass
class Features:
    """Vectors to train or test on: X (n, d) float32, y (n,) class indices, their class names, and the
    fingerprint of the backbone that made them ("" when unknown: arrays, or vectors made by another tool)."""

    name: str
    X: np.ndarray
    y: np.ndarray
    class_names: list[str]
    fingerprint: str = ""


def features(data, store: core.StoreLike = None) -> Features:
    """`data` as `Features`: a feature set name (read from `store`), or an (X, y, class_names) tuple as
    `extractor.api.load_feature_set` and `extractor.api.embed` return."""
    if isinstance(data, Features):
        return data
    if isinstance(data, str):
        with core.opened_store(store, readonly=True) as opened:
            info = core.describe_feature_set(data, opened)
            X, y, class_names = opened.load_feature_set(data)
        return Features(data, X, y, class_names, info.fingerprint)
    try:
        X, y, class_names = data
    except (TypeError, ValueError):
        raise InvalidInputError("features must be a feature set name or an (X, y, class_names) tuple") from None
    return Features("arrays", np.asarray(X, np.float32), np.asarray(y), list(class_names))


@dataclass
class TrainedHead:
    """A fitted head (a scikit-learn classifier), the classes it tells apart, and where it was saved."""

    model: object
    class_names: list[str]
    training_accuracy: float
    path: Path | None = None


def train_head(head: str, train, *, store: core.StoreLike = None, out: str | os.PathLike | None = None,
               seed: int = 0, epochs: int = 100, batch_size: int = 4) -> TrainedHead:
    """Fit head `head` (a KerasHead spec such as `linear`, `mlp512-tanh`, or `logreg`, `knn`, `linear-svm`,
    `ridge`) on `train` (see `features`); with `out`, save it there with its backbone fingerprint and class
    names (`.keras` or `.skops` added), where `extractor serve --heads DIR` finds it. `epochs` and
    `batch_size` apply to Keras heads."""
    from classifiers.baselines import make_head, single_threaded_blas
    from classifiers.heads import HEAD_SPECS
    from classifiers.persistence import save_head

    data = features(train, store)
    params = {"epochs": epochs, "batch_size": batch_size} if head in HEAD_SPECS else {}
    with single_threaded_blas():
        model = make_head(head, random_state=seed, **params).fit(data.X, data.y)
    trained = TrainedHead(model, data.class_names, float(model.score(data.X, data.y)))
    if out is not None:
        trained.path = save_head(model, out, backbone_fingerprint=data.fingerprint, class_names=data.class_names)
    return trained


def compare_heads(train, test, heads=("linear", "mlp512-tanh", "logreg"), *, store: core.StoreLike = None,
                  trials: int = 15, epochs: int = 100, batch_size: int = 4, optimizers: str | None = None,
                  learning_rates: str | None = None, validation_fraction: float = 0.2) -> ExperimentResult:
    """Train every head in `heads` over `trials` seeds on `train` and score it on `test` (each a feature set
    name or (X, y, class_names), see `features`); the result prints with `format_table` and writes with
    `classifiers.report.write_report`. With `optimizers` or `learning_rates` (comma-separated), Keras heads
    are swept over the grid instead (`classifiers.sweeps.sweep_rows`: a row per point and the pick, made on
    a `validation_fraction` split of the training set)."""
    from classifiers.baselines import fit_trials
    from classifiers.heads import HEAD_SPECS, accuracy
    from classifiers.trainer import train_trials

    train, test = features(train, store), features(test, store)
    check_comparable(train, test)
    seeds = list(range(trials))
    points = None
    if optimizers or learning_rates:
        from classifiers.sweeps import DEFAULT_LEARNING_RATES, DEFAULT_OPTIMIZERS, parse_grid, sweep_rows

        points = parse_grid(optimizers or ",".join(DEFAULT_OPTIMIZERS), learning_rates or list(DEFAULT_LEARNING_RATES))
    rows = []
    for head in heads:
        start = time.perf_counter()
        settings = {"head": head, "trials": trials}
        if head in HEAD_SPECS and points:
            rows += sweep_rows(head, train.X, train.y, test.X, test.y, seeds, epochs, batch_size, points,
                               validation_fraction)
            continue
        if head in HEAD_SPECS:
            results = train_trials(head, np.repeat(train.X[None], trials, axis=0), np.repeat(train.y[None], trials, 0),
                                   seeds, epochs, batch_size)
            accuracies = [accuracy(r, test.X, test.y) for r in results]
            settings |= {"epochs": epochs, "batch_size": batch_size}
        else:
            fitted = fit_trials(head, [(train.X, train.y)] * trials, seeds)
            accuracies = [float(model.score(test.X, test.y)) for model in fitted]
        rows.append(MethodResult(head, accuracies, time.perf_counter() - start, settings))
    return ExperimentResult("compare", f"train {train.name} ({len(train.X)}), test {test.name} ({len(test.X)}), "
                            f"{train.X.shape[1]}-d features", rows, {"train_set": train.name, "test_set": test.name})


def check_comparable(train: Features, test: Features) -> None:
    """Refuse, in one line, a train and test pair that do not come from one backbone or one set of classes."""
    if train.X.shape[1] != test.X.shape[1]:
        raise InvalidInputError(f"{train.name} has {train.X.shape[1]}-d vectors, {test.name} {test.X.shape[1]}-d: "
                                "they come from different backbones")
    if train.fingerprint != test.fingerprint:
        raise InvalidInputError(f"{train.name} and {test.name} come from different backbones "
                                f"({train.fingerprint[:12] or 'external'} vs {test.fingerprint[:12] or 'external'})")
    if not train.fingerprint:
        log.info("%s and %s: vectors made elsewhere, same width; that they come from one model is taken on trust",
                 train.name, test.name)
    if train.class_names != test.class_names:
        raise InvalidInputError(f"the sets have different classes: {train.class_names} vs {test.class_names}")


def export_head(head_path: str | os.PathLike, out: str | os.PathLike, format: str = "keras", *,
                backbone: str | None = None, recipe: str | None = None, input_size: int | None = None,
                pooling: str | None = None, repository: str | os.PathLike | None = None, data_dir=None) -> Path:
    """Write the saved head at `head_path` with its backbone and preprocessing as one model taking uint8
    pixels (see `classifiers.deploy`), as `format` (keras, savedmodel, tflite, onnx) at `out`.

    The backbone is the model repository entry whose fingerprint the head's sidecar records: `backbone`
    (with the options it was embedded with), or else the entry at its defaults that matches."""
    from classifiers.deploy import deployable_model, export_model
    from classifiers.persistence import load_head, read_sidecar
    from extractor.models import backbone_names

    fingerprint = read_sidecar(head_path)["backbone_fingerprint"]
    if not fingerprint:
        raise InvalidInputError(f"{head_path} was trained on vectors made elsewhere: no backbone to export with it")
    names = [backbone] if backbone else backbone_names(repository)
    for name in names:
        spec = core.backbone_spec(name, recipe=recipe, input_size=input_size, pooling=pooling, repository=repository,
                                  data_dir=data_dir)
        try:
            matches = spec.fingerprint == fingerprint
        except ChecksumError:  # an entry whose file is not there yet (mnist_cnn before `pretrain`)
            continue
        if matches:
            return export_model(deployable_model(spec, load_head(head_path)), out, format)
    where = f"{backbone} with these options" if backbone else "no entry at its defaults"
    raise InvalidInputError(f"{head_path} was trained on backbone fingerprint {fingerprint[:12]}, and {where} has "
                            "it: give --backbone and the --recipe, --input-size, --pooling it was embedded with")
