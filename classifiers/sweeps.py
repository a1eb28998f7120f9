"""Optimiser x learning-rate sweeps of a head over trials; the pick is made on a validation split of each
trial's own training images, never on the test set.

Every grid point trains all trials in the fast trainer (trials side by side in threads) on the part of
each trial's training set left after a stratified validation split (seeded by the trial's seed); the
point with the best mean validation accuracy over the trials is chosen, and each trial is then trained
again on its whole training set at that point.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_OPTIMIZERS = ("adam", "rmsprop", "sgd")
DEFAULT_LEARNING_RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
VALIDATION_FRACTION = 0.2


@dataclass(frozen=True)
class SweepPoint:
    optimizer: str
    learning_rate: float

    def label(self) -> str:
        return f"{self.optimizer} lr={self.learning_rate:g}"


@dataclass
class SweepResult:
    """Validation accuracy per grid point and trial, the chosen point and the trials retrained at it."""

    spec: str
    points: list[SweepPoint]
    validation: dict[SweepPoint, list[float]]
    chosen: SweepPoint
    final: list          # TrialResult per trial, trained on its whole training set at `chosen`
    validation_fraction: float

    def as_dict(self, test: dict[SweepPoint, list[float]] | None = None) -> dict:
        """Plain data for report.json (and the report's plot); `test`: accuracies of points also tested."""
        rows = []
        for point in self.points:
            row = {"optimizer": point.optimizer, "learning_rate": point.learning_rate,
                   "validation_mean": float(np.mean(self.validation[point]))}
            if test and point in test:
                row["test_mean"] = float(np.mean(test[point]))
            rows.append(row)
        return {"head": self.spec, "validation_fraction": self.validation_fraction, "points": rows,
                "chosen": {"optimizer": self.chosen.optimizer, "learning_rate": self.chosen.learning_rate}}


def parse_grid(optimizers: str | list[str], learning_rates: str | list[float]) -> list[SweepPoint]:
    """Every (optimizer, learning rate) pair of comma-separated names and rates; bad ones are a ValueError."""
    from classifiers.trainer import OPTIMIZERS

    names = [o.strip() for o in optimizers.split(",") if o.strip()] if isinstance(optimizers, str) else list(optimizers)
    if isinstance(learning_rates, str):
        try:
            rates = [float(r) for r in learning_rates.split(",") if r.strip()]
        except ValueError:
            raise ValueError(f"learning rates must be numbers separated by commas; got {learning_rates!r}") from None
    else:
        rates = [float(r) for r in learning_rates]
    for name in names:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    if not names or not rates or any(not 0 < r < 10 for r in rates):
        raise ValueError(f"a sweep needs optimizers and learning rates in (0, 10); got {names} and {rates}")
    return [SweepPoint(name, rate) for name in dict.fromkeys(names) for rate in dict.fromkeys(rates)]


def validation_split(y_trials: np.ndarray, seeds, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(T, n_fit) and (T, n_val) row indices: a stratified split of each trial's labels, seeded by its seed."""
    from sklearn.model_selection import StratifiedShuffleSplit

    fit, held_out = [], []
    for labels, seed in zip(y_trials, seeds):
        split = StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=int(seed))
        rows_fit, rows_val = next(split.split(np.zeros(len(labels)), labels))
        fit.append(np.sort(rows_fit))
        held_out.append(np.sort(rows_val))
    return np.stack(fit), np.stack(held_out)


def sweep_trials(spec: str, X_trials, y_trials, seeds, epochs: int, batch_size: int, points: list[SweepPoint],
                 validation_fraction: float = VALIDATION_FRACTION, n_jobs: int | None = None) -> SweepResult:
    """Sweep `points` for head `spec` on X_trials (T, n, d), y_trials (T, n); see the module docstring."""
    from classifiers.heads import accuracy
    from classifiers.trainer import train_trials

    X_trials, y_trials = np.asarray(X_trials, np.float32), np.asarray(y_trials)
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1); got {validation_fraction!r}")
    fit, held_out = validation_split(y_trials, seeds, validation_fraction)
    X_fit = np.take_along_axis(X_trials, fit[:, :, None], axis=1)
    y_fit = np.take_along_axis(y_trials, fit, axis=1)
    validation = {}
    for point in points:
        results = train_trials(spec, X_fit, y_fit, seeds, epochs, batch_size, learning_rate=point.learning_rate,
                               optimizer=point.optimizer, n_jobs=n_jobs)
        validation[point] = [accuracy(r, X[rows], y[rows])
                             for r, X, y, rows in zip(results, X_trials, y_trials, held_out)]
        log.debug("%s %s: validation accuracy %.3f", spec, point.label(), np.mean(validation[point]))
    chosen = max(points, key=lambda p: np.mean(validation[p]))  # the first of equals, in the grid's order
    final = train_trials(spec, X_trials, y_trials, seeds, epochs, batch_size, learning_rate=chosen.learning_rate,
                         optimizer=chosen.optimizer, n_jobs=n_jobs)
    return SweepResult(spec, list(points), validation, chosen, final, validation_fraction)


def sweep_rows(spec: str, X, y, X_test, y_test, seeds, epochs: int, batch_size: int, points: list[SweepPoint],
               validation_fraction: float = VALIDATION_FRACTION) -> list:
    """Rows for `classifiers compare`: every grid point trained on the whole set (X (n, d), y (n,)) for each
    seed and tested, then the pick (made on validation splits) with the sweep in its settings for the plot."""
    import time

    from classifiers.report import MethodResult
    from classifiers.heads import accuracy
    from classifiers.trainer import train_trials

    X, y = np.asarray(X, np.float32), np.asarray(y)
    X_trials, y_trials = np.repeat(X[None], len(seeds), axis=0), np.repeat(y[None], len(seeds), axis=0)
    start = time.perf_counter()
    sweep = sweep_trials(spec, X_trials, y_trials, seeds, epochs, batch_size, points, validation_fraction)
    pick_seconds = time.perf_counter() - start
    rows, tested = [], {}
    for point in points:
        start = time.perf_counter()
        results = sweep.final if point == sweep.chosen else train_trials(
            spec, X_trials, y_trials, seeds, epochs, batch_size, learning_rate=point.learning_rate,
            optimizer=point.optimizer)
        tested[point] = [accuracy(r, X_test, y_test) for r in results]
        rows.append(MethodResult(f"{spec} {point.label()}", tested[point], time.perf_counter() - start,
                                 {"head": spec, "trials": len(seeds), "epochs": epochs, "batch_size": batch_size,
                                  "optimizer": point.optimizer, "learning_rate": point.learning_rate}))
    rows.append(MethodResult(
        f"{spec} sweep pick: {sweep.chosen.label()}", tested[sweep.chosen], pick_seconds,
        {"head": spec, "trials": len(seeds), "epochs": epochs, "batch_size": batch_size,
         "sweep": sweep.as_dict(tested)},
        note=f"picked on a {validation_fraction:.0%} validation split of the training set, not on the test set"))
    return rows
