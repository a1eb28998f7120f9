"""Head training speed: the lecture's mnist_vgg table and a cifar_vgg run, fast trainer vs KerasHead per trial.

Features are synthetic with the sparsity of real VGG16 features on these images: ReLU of shifted
normals, each column with its own rate of being nonzero (Beta(0.15, 0.4), mean 27%), so that a
third of the columns are zero across a trial's 100 examples, as measured on MNIST.

Prints, and writes to benchmarks/results/head_training.json, the fast trainer's median wall and CPU
time per workload and KerasHead's time for all trials, measured on a few trials per spec and scaled.

    python benchmarks/head_training.py [--repeats 3] [--baseline-trials 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402

MNIST_SPECS = ("linear", "dropout-linear", "mlp512-tanh-dropout", "dropout-mlp512-tanh-dropout", "mlp512-tanh")


@dataclass(frozen=True)
class Workload:
    name: str
    specs: tuple[str, ...]
    trials: int
    n_train: int
    n_classes: int
    epochs: int
    batch_size: int
    n_val: int
    validation_freq: int  # epochs == validation_freq: one evaluation at the end, like model.evaluate


WORKLOADS = (
    Workload("mnist_vgg table", MNIST_SPECS, 15, 100, 5, 100, 4, 5074, 100),
    Workload("cifar_vgg", ("dropout-mlp512-tanh-dropout",), 15, 1000, 10, 50, 32, 10000, 1),
)


def relu_features(rng: np.random.Generator, rates: np.ndarray, n: int) -> np.ndarray:
    """(n, len(rates)) float32: column j nonzero with probability rates[j]."""
    from scipy.special import ndtri

    return np.maximum(rng.standard_normal((n, len(rates))) + ndtri(rates), 0).astype(np.float32)


def make_data(workload: Workload, seed: int = 0):
    rng = np.random.default_rng(seed)
    rates = rng.beta(0.15, 0.4, 512)
    X = np.stack([relu_features(rng, rates, workload.n_train) for _ in range(workload.trials)])
    y = np.tile(np.arange(workload.n_train) % workload.n_classes, (workload.trials, 1))
    validation = relu_features(rng, rates, workload.n_val), rng.integers(0, workload.n_classes, workload.n_val)
    return X, y, validation


def run_fast(workload: Workload, X, y, validation) -> tuple[float, float]:
    """(wall, CPU) seconds for all trials of every spec with the fast trainer."""
    from classifiers.trainer import train_trials

    wall, cpu = time.perf_counter(), time.process_time()
    for spec in workload.specs:
        train_trials(spec, X, y, range(workload.trials), workload.epochs, workload.batch_size,
                     validation_data=validation, validation_freq=workload.validation_freq)
    return time.perf_counter() - wall, time.process_time() - cpu


def run_keras(workload: Workload, X, y, validation, trials: int) -> float:
    """Seconds for `trials` trials of every spec, one KerasHead fit (plus evaluation) each."""
    from classifiers.heads import KerasHead

    start = time.perf_counter()
    for spec in workload.specs:
        for t in range(trials):
            head = KerasHead(spec, epochs=workload.epochs, batch_size=workload.batch_size, random_state=t)
            if workload.validation_freq == 1:
                head.fit(X[t], y[t], validation_data=validation)
            else:
                head.fit(X[t], y[t]).score(*validation)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of the fast trainer (median reported)")
    parser.add_argument("--baseline-trials", type=int, default=1,
                        help="KerasHead trials per spec actually run; the time is scaled to all trials")
    args = parser.parse_args()
    from classifiers.trainer import train_trials

    results = {}
    for workload in WORKLOADS:
        X, y, validation = make_data(workload)
        for spec in workload.specs:  # compile (or load) the kernels
            train_trials(spec, X[:1, :20], y[:1, :20], [0], 1, 4, validation_data=validation)
        runs = [run_fast(workload, X, y, validation) for _ in range(args.repeats)]
        wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
        keras = run_keras(workload, X, y, validation, args.baseline_trials) * workload.trials / args.baseline_trials
        print(f"{workload.name}: {len(workload.specs)} spec(s) x {workload.trials} trials, {workload.n_train} "
              f"examples, {workload.epochs} epochs, batch {workload.batch_size}, evaluation on {workload.n_val} "
              f"every {workload.validation_freq} epoch(s)")
        print(f"  fast trainer   median {wall:7.2f} s wall, {cpu:7.2f} s CPU  "
              f"(runs: {', '.join(f'{w:.2f}/{c:.2f}' for w, c in runs)})")
        print(f"  KerasHead      {keras:7.1f} s  ({args.baseline_trials} trial(s) per spec measured, scaled)")
        print(f"  speed-up       {keras / wall:7.1f} x")
        results[workload.name] = {
            "workload": asdict(workload), "fast_wall_seconds": wall, "fast_cpu_seconds": cpu,
            "fast_runs": [{"wall": w, "cpu": c} for w, c in runs],
            "keras_seconds_scaled": keras, "keras_trials_measured_per_spec": args.baseline_trials,
            "speed_up": keras / wall,
        }
    print(f"wrote {write_results('head_training', results)}")


if __name__ == "__main__":
    main()
