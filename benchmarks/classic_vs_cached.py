"""Classic freeze-and-retrain vs cached features: wall time per experiment's full transfer table, same run.

Cached: a fresh, empty store; every trial's training set and the test set embedded once, then every
transfer row's 15 trials trained on the vectors (the time `make run` would take cold, minus pretraining).
Classic: the lecture's end-to-end model (frozen backbone + head in one Keras model, `fit` on pixels, with
per-epoch validation where the lecture has it), every training step and validation batch timed over one
epoch of each of three builds of the model; the lower quartile of their steady-state steps (the first
steps' tracing and warm-up reported apart; `classifiers.classic.steady_epoch_seconds` says why) is
extrapolated to the full table (epochs x 15 trials x transfer rows): its full run takes hours.

The whole comparison runs `--repeats` times (default 3) in one invocation, each in a fresh store and
building its backbones again (after one untimed pass of tl_mnist's table: the process's first use of
TensorFlow and of the compiled functions is in no repetition's time), and
the ratios of every repetition are written under `ratios`: the figure holds when they agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", default="tl_mnist,mnist_vgg,cifar_vgg")
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--classic-epochs", type=int, default=1, help="epochs of the classic model timed (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="independent repetitions, each cold (default 3)")
    args = parser.parse_args()

    from classifiers.experiments import RunSettings
    from extractor.pretrain import pretrain_mnist_cnn

    pretrain_mnist_cnn()  # reused when present; not part of either side's time
    settings = RunSettings(trials=args.trials, classic_epochs=args.classic_epochs, beyond=False)
    names = args.experiments.split(",")
    # The first pass in a process traces the trainer's and the backbones' compiled functions (about 0.4 s of
    # tl_mnist's 3 s cached side): one untimed pass of the smallest table first, so that no repetition
    # carries it.
    transfer_tables(["tl_mnist"], settings)
    repeats: list[dict] = []
    for repeat in range(args.repeats):
        results = transfer_tables(names, settings)
        for name, timing in results.items():
            print(f"run {repeat + 1}  {name:10s} classic {timing['classic_full_table_seconds']:8.0f} s "
                  f"({timing['classic_full_table_seconds_range'][0]:.0f}-"
                  f"{timing['classic_full_table_seconds_range'][1]:.0f})   cached "
                  f"{timing['cached_full_table_seconds']:6.1f} s (embed {timing['cached_embed_seconds']:.1f} + "
                  f"train {timing['cached_train_seconds']:.1f})   ratio {timing['speedup']:5.0f}x   slow steps "
                  f"{timing['classic_slow_step_share']:.0%}", flush=True)
        repeats.append(results)
    ratios = {name: [run[name]["speedup"] for run in repeats] for name in names}
    spread = {name: round(max(r) / min(r) - 1, 3) for name, r in ratios.items()}
    for name in names:
        print(f"{name:10s} ratios {', '.join(f'{r:.0f}x' for r in ratios[name])}: largest / smallest - 1 = "
              f"{spread[name]:.0%} (target <= 20%)")
    path = write_results("classic_vs_cached", {"trials": args.trials, "classic_epochs_timed": args.classic_epochs,
                                               "repeats": repeats, "ratios": ratios, "ratio_spread": spread,
                                               "experiments": repeats[-1]})
    print(f"wrote {path}")


def transfer_tables(names: list[str], settings) -> dict:
    """Each experiment's transfer table (its head and classic rows) in a fresh, empty store, with backbones
    built afresh, as a cold `make run` has them: the timing of each."""
    from classifiers.experiments import EXPERIMENTS, ExperimentRunner
    from classifiers.trial_cache import TrialCache
    from extractor.models import release_all_backbones
    from extractor.store import EmbeddingStore

    results = {}
    with tempfile.TemporaryDirectory() as tmp, EmbeddingStore(Path(tmp) / "cold.sqlite") as store:
        runner = ExperimentRunner(store, settings, trial_cache=TrialCache(Path(tmp) / "trials"))
        for name in names:
            experiment = EXPERIMENTS[name]
            transfer = dataclasses.replace(
                experiment, methods=tuple(m for m in experiment.methods if m.kind in ("head", "classic")))
            results[name] = runner.run(transfer).details["timing"]
    release_all_backbones()
    return results


if __name__ == "__main__":
    main()
