"""Classic freeze-and-retrain vs cached features: wall time per experiment's full transfer table, same run.

Cached: a fresh, empty store; every trial's training set and the test set embedded once, then every
transfer row's 15 trials trained on the vectors (the time `make run` would take cold, minus pretraining).
Classic: the lecture's end-to-end model (frozen backbone + head in one Keras model, `fit` on pixels, with
per-epoch validation where the lecture has it), timed over a few epochs of one trial and extrapolated
per epoch to the full table (epochs x 15 trials x transfer rows): its full run takes hours.
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
    parser.add_argument("--classic-epochs", type=int, default=2, help="epochs of the classic model timed (default 2)")
    args = parser.parse_args()

    from classifiers.experiments import EXPERIMENTS, ExperimentRunner, RunSettings
    from classifiers.trial_cache import TrialCache
    from extractor.pretrain import pretrain_mnist_cnn
    from extractor.store import EmbeddingStore

    pretrain_mnist_cnn()  # reused when present; not part of either side's time
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        settings = RunSettings(trials=args.trials, classic_epochs=args.classic_epochs, beyond=False)
        with EmbeddingStore(Path(tmp) / "cold.sqlite") as store:
            runner = ExperimentRunner(store, settings, trial_cache=TrialCache(Path(tmp) / "trials"))
            for name in args.experiments.split(","):
                experiment = EXPERIMENTS[name]
                transfer = dataclasses.replace(
                    experiment, methods=tuple(m for m in experiment.methods if m.kind in ("head", "classic")))
                timing = runner.run(transfer).details["timing"]
                results[name] = timing
                print(f"{name:10s} classic {timing['classic_full_table_seconds']:10.0f} s (extrapolated)   "
                      f"cached {timing['cached_full_table_seconds']:7.1f} s (embed {timing['cached_embed_seconds']:.1f}"
                      f" + train {timing['cached_train_seconds']:.1f})   ratio {timing['speedup']:6.0f}x", flush=True)
    path = write_results("classic_vs_cached", {"trials": args.trials, "classic_epochs_timed": args.classic_epochs,
                                               "experiments": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
