"""cifar_vgg's faithful transfer row (VGG16 + dropout-mlp512-tanh-dropout): a sweep of what the lecture leaves
open (epochs, batch size, Adam's learning rate and epsilon), picked on validation splits, never on the test set.

Stage 1, the pick: every (batch size, learning rate, epsilon) point trains the heads of the first --trials
trials in the fast trainer on a stratified 80% of each trial's own 1,000 training vectors (split seeded by
the trial, as `classifiers.sweeps`), with validation accuracy on the other 20% after every epoch; the point
"E epochs" is that curve at epoch E, for E in --epoch-grid. The pick is the best mean validation accuracy.
Stage 2, the test: the row's default and the pick, each trained on all 1,000 vectors of every one of the 15
trials, scored on the 10,000 test images after their last epoch; the test curve (every --test-every epochs)
shows how far even the best epoch gets, which the lecture's per-epoch test validation would show, and is not
used to pick. Figures in benchmarks/results/cifar_transfer_sweep.json, plot beside it.

    python benchmarks/cifar_transfer_sweep.py [--trials 5] [--batch-sizes 8,16,32,64,128]
        [--learning-rates 1e-4,3e-4,1e-3,3e-3] [--epsilons 1e-7,1e-8] [--max-epochs 150] [--store PATH]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, figure_row, save_figure, write_results  # noqa: E402

log = logging.getLogger("cifar_transfer_sweep")

HEAD = "dropout-mlp512-tanh-dropout"
DEFAULT = {"epochs": 50, "batch_size": 32, "learning_rate": 1e-3, "epsilon": 1e-7}   # the row as it stands
LECTURE = (48.0, 49.5)


def curves(X_trials, y_trials, seeds, batch_size: int, learning_rate: float, epsilon: float, epochs: int,
           validation, every: int = 1, workers: int = 2) -> list[list[float]]:
    """Per trial, accuracy on its own validation set `validation(t)` = (X_val, y_val) after every `every`-th epoch."""
    from classifiers.trainer import train_trials

    def one(t: int) -> list[float]:
        (result,) = train_trials(HEAD, X_trials[t][None], y_trials[t][None], [seeds[t]], epochs, batch_size,
                                 learning_rate=learning_rate, validation_data=validation(t), validation_freq=every,
                                 n_jobs=1, epsilon=epsilon)
        return result.history["val_accuracy"]

    # one trial per thread, each with its own validation set (the trainer shares one across its trials)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(len(seeds))))


def pick_stage(args, X_fit, y_fit, seeds, validation_of, batch_sizes, rates, epsilons, epoch_grid) -> dict:
    """Stage 1: validation curves of every point; the pick (see the module docstring)."""
    import numpy as np

    points, started = [], time.perf_counter()
    for epsilon in epsilons:
        for batch_size in batch_sizes:
            for rate in rates:
                if epsilon != epsilons[0] and (batch_size, rate) != (DEFAULT["batch_size"], DEFAULT["learning_rate"]):
                    continue   # epsilon is compared at the default point, then at the pick (below)
                start = time.perf_counter()
                validation = np.asarray(curves(X_fit, y_fit, seeds, batch_size, rate, epsilon, args.max_epochs,
                                               validation_of))
                mean = validation.mean(axis=0)
                points.append({"batch_size": batch_size, "learning_rate": rate, "epsilon": epsilon,
                               "validation_curve_mean": [round(float(v), 4) for v in mean],
                               "validation_by_epochs": {str(e): [round(float(v), 4) for v in validation[:, e - 1]]
                                                        for e in epoch_grid},
                               "seconds": round(time.perf_counter() - start, 1)})
                log.info("batch %d lr %g eps %g: validation %s (%.0f s)", batch_size, rate, epsilon,
                         " ".join(f"{e}:{100 * mean[e - 1]:.1f}" for e in epoch_grid), points[-1]["seconds"])

    def score(point, epochs):
        return float(np.mean(point["validation_by_epochs"][str(epochs)]))

    candidates = [(score(p, e), p, e) for p in points for e in epoch_grid]
    best_score, best, best_epochs = max(candidates, key=lambda c: c[0])
    pick = {"epochs": best_epochs, "batch_size": best["batch_size"], "learning_rate": best["learning_rate"],
            "epsilon": best["epsilon"]}
    if len(epsilons) > 1:   # the pick's point at the other epsilons too, to compare them where it matters
        for epsilon in epsilons:
            if not any(p["batch_size"] == pick["batch_size"] and p["learning_rate"] == pick["learning_rate"]
                       and p["epsilon"] == epsilon for p in points):
                validation = np.asarray(curves(X_fit, y_fit, seeds, pick["batch_size"], pick["learning_rate"],
                                               epsilon, args.max_epochs, validation_of))
                points.append({"batch_size": pick["batch_size"], "learning_rate": pick["learning_rate"],
                               "epsilon": epsilon, "validation_curve_mean":
                                   [round(float(v), 4) for v in validation.mean(axis=0)],
                               "validation_by_epochs": {str(e): [round(float(v), 4) for v in validation[:, e - 1]]
                                                        for e in epoch_grid}})
    default_point = next((p for p in points if all(p[k] == DEFAULT[k] for k in ("batch_size", "learning_rate",
                                                                                "epsilon"))), None)
    default_score = score(default_point, DEFAULT["epochs"]) if default_point and DEFAULT["epochs"] in epoch_grid \
        else None
    log.info("pick %s: validation %.1f%% (the default %s)", pick, 100 * best_score,
             "not in the grid" if default_score is None else f"{100 * default_score:.1f}%")

    return {"points": points, "pick": pick, "pick_validation_mean": round(best_score, 4),
            "default_validation_mean": None if default_score is None else round(default_score, 4),
            "pick_seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5, help="trials per point in the pick (default 5)")
    parser.add_argument("--batch-sizes", default="8,16,32,64,128")
    parser.add_argument("--learning-rates", default="1e-4,3e-4,1e-3,3e-3")
    parser.add_argument("--epsilons", default="1e-7,1e-8", help="Adam's epsilon: Keras 2/3's 1e-7, Keras 1's 1e-8")
    parser.add_argument("--max-epochs", type=int, default=150)
    parser.add_argument("--epoch-grid", default="10,20,30,50,75,100,150", help="epoch counts the pick chooses among")
    parser.add_argument("--test-every", type=int, default=5, help="epochs between points of the test curves")
    parser.add_argument("--store", default=None, help="embedding store (default: EXTRACTOR_STORE or the user cache)")
    parser.add_argument("--out", default="cifar_transfer_sweep", help="results name under benchmarks/results/")
    parser.add_argument("--test-only", action="store_true", help="stage 2 only, on the pick of the results file")
    parser.add_argument("--no-test", action="store_true", help="stage 1 only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import numpy as np

    from classifiers.experiments import EXPERIMENTS, ExperimentRunner, RunSettings
    from classifiers.sweeps import validation_split
    from extractor import paths
    from extractor.store import EmbeddingStore

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rates = [float(r) for r in args.learning_rates.split(",")]
    epsilons = [float(e) for e in args.epsilons.split(",")]
    epoch_grid = [e for e in (int(e) for e in args.epoch_grid.split(",")) if e <= args.max_epochs]
    experiment = EXPERIMENTS["cifar_vgg"]
    with EmbeddingStore(paths.store_path(args.store)) as store:
        data = ExperimentRunner(store, RunSettings(full=True)).trial_data(experiment, experiment.methods[0])
    seeds_all = list(range(len(data.X_trials)))
    seeds = seeds_all[:args.trials]
    fit, held_out = validation_split(data.y_trials[:args.trials], seeds, 0.2)
    X_fit = np.take_along_axis(data.X_trials[:args.trials], fit[:, :, None], axis=1)
    y_fit = np.take_along_axis(data.y_trials[:args.trials], fit, axis=1)

    def validation_of(t):
        return data.X_trials[t][held_out[t]], data.y_trials[t][held_out[t]]

    out = RESULTS / f"{args.out}.json"
    if args.test_only:   # stage 1 as an earlier run of this script left it
        stage = {k: json.loads(out.read_text())[k] for k in ("points", "pick", "pick_validation_mean",
                                                           "default_validation_mean", "pick_seconds")}
    else:
        stage = pick_stage(args, X_fit, y_fit, seeds, validation_of, batch_sizes, rates, epsilons, epoch_grid)
    pick = stage["pick"]

    tested = {}
    for name, setting in () if args.no_test else (("default", DEFAULT), ("pick", pick)):
        if name == "pick" and setting == DEFAULT:
            tested[name] = tested["default"]
            continue
        epochs = max(setting["epochs"], args.max_epochs)
        every = args.test_every if setting["epochs"] % args.test_every == 0 else 1
        start = time.perf_counter()
        test_curves = np.asarray(curves(data.X_trials, data.y_trials, seeds_all, setting["batch_size"],
                                        setting["learning_rate"], setting["epsilon"], epochs,
                                        lambda t: (data.X_test, data.y_test), every))
        at = setting["epochs"] // every - 1
        accuracies = test_curves[:, at]
        tested[name] = {"setting": setting, "trials": len(seeds_all),
                        "accuracies": [round(float(a), 4) for a in accuracies],
                        "mean": round(float(accuracies.mean()), 4), "min": round(float(accuracies.min()), 4),
                        "max": round(float(accuracies.max()), 4), "test_every": every,
                        "test_curve_mean": [round(float(v), 4) for v in test_curves.mean(axis=0)],
                        "best_epoch_of_test_curve_mean": int((np.argmax(test_curves.mean(axis=0)) + 1) * every),
                        "best_of_test_curve_mean": round(float(test_curves.mean(axis=0).max()), 4),
                        # each trial's best point of its test curve: what a reader of per-epoch test
                        # validation could report as "best", optimistic by construction
                        "best_epoch_per_trial": [round(float(c.max()), 4) for c in test_curves],
                        "test_curves": [[round(float(v), 4) for v in c] for c in test_curves],
                        "seconds": round(time.perf_counter() - start, 1)}
        log.info("%s %s: test %.1f%% (%.1f-%.1f) over %d trials; best epoch of the mean test curve %d: %.1f%%",
                 name, setting, 100 * accuracies.mean(), 100 * accuracies.min(), 100 * accuracies.max(),
                 len(seeds_all), tested[name]["best_epoch_of_test_curve_mean"],
                 100 * tested[name]["best_of_test_curve_mean"])

    results = {"head": HEAD, "lecture": list(LECTURE), "default": DEFAULT, "trials_in_pick": args.trials,
               "validation_fraction": 0.2, "epoch_grid": epoch_grid, "max_epochs": args.max_epochs,
               **stage, "tested": tested,
               "command": " ".join(["python", "benchmarks/cifar_transfer_sweep.py", *sys.argv[1:]])}
    path = write_results(args.out, results)
    plot(results, RESULTS / f"{args.out}.png")
    print(f"wrote {path} and {RESULTS / (args.out + '.png')}")


def plot(results: dict, path: Path) -> None:
    """Left: mean validation accuracy against epochs per batch size at the default rate and per rate at the
    default batch size (the pick's where the grid lacks the default's); right: the default's and the pick's
    mean test curves against the lecture's range."""
    default = dict(results["default"])
    for key in ("batch_size", "learning_rate"):
        if not any(p[key] == default[key] for p in results["points"]):
            default[key] = results["pick"][key]
    figure, (by_batch, by_rate, test) = figure_row(3, (17, 5))
    for point in results["points"]:
        curve = [100 * v for v in point["validation_curve_mean"]]
        epochs = range(1, len(curve) + 1)
        if point["learning_rate"] == default["learning_rate"] and point["epsilon"] == default["epsilon"]:
            by_batch.plot(epochs, curve, label=f"batch {point['batch_size']}")
        if point["batch_size"] == default["batch_size"]:
            style = "-" if point["epsilon"] == default["epsilon"] else ":"
            by_rate.plot(epochs, curve, style, label=f"lr {point['learning_rate']:g}, eps {point['epsilon']:g}")
    for axis, title in ((by_batch, f"validation (20% of each trial's 1,000), lr {default['learning_rate']:g}"),
                        (by_rate, f"validation, batch {default['batch_size']}")):
        axis.set(title=title, xlabel="epochs", ylabel="mean accuracy over trials (%)")
    for name, row in results["tested"].items():
        curve = [100 * v for v in row["test_curve_mean"]]
        epochs = [row["test_every"] * (i + 1) for i in range(len(curve))]
        s = row["setting"]
        test.plot(epochs, curve, label=f"{name}: batch {s['batch_size']}, lr {s['learning_rate']:g}, "
                                       f"eps {s['epsilon']:g}; {s['epochs']} epochs: {100 * row['mean']:.1f}%")
    test.axhspan(*results["lecture"], color="green", alpha=0.15, label="lecture's range")
    trials = next(iter(results["tested"].values()))["trials"] if results["tested"] else 0
    test.set(title=f"test (10,000 images), mean of {trials} trials",
             xlabel="epochs", ylabel="accuracy (%)")
    save_figure(figure, (by_batch, by_rate, test),
                "cifar_vgg transfer: VGG16 (lecture preprocessing) + dropout-mlp512-tanh-dropout", path)


if __name__ == "__main__":
    main()
