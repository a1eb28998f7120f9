"""Fine-tuning VGG16's block 5 with a head: the classic way (the whole model on pixels) vs cached activations.

One trial of an experiment's training set (default mnist_vgg's: 100 MNIST images, batch 4), both ways on
the same epochs of each stage, in one run. Per-epoch seconds are steady-state medians (each stage's first
epoch, which traces and compiles, left out). Cached: the activations at block4_pool computed once (one
forward pass over the images, counted once), block 5's output once per trial for the head stage, the
head stage in the fast trainer (timed over all its epochs after a warm-up call), the block stage by Keras
on the activations. The ratio is given per stage's epoch and for the whole recipe at its full epochs
(the cached side's one-off passes included).

    python benchmarks/fine_tuning.py [--data SPEC] [--head linear] [--epochs 4] [--full-head-epochs 100]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402


def steady(seconds: list[float]) -> float:
    """Median of the epochs after the first (the first one traces and compiles)."""
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="mnist:small?n=100&seed=0", help="training set (default mnist_vgg's trial 0)")
    parser.add_argument("--head", default="linear")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each stage timed, both ways (default 4)")
    parser.add_argument("--full-head-epochs", type=int, default=100, help="the recipe's head epochs (default 100)")
    parser.add_argument("--full-block-epochs", type=int, default=10, help="the recipe's block epochs (default 10)")
    args = parser.parse_args()

    import numpy as np

    from classifiers.fine_tuning import FineTuning, classic_fine_tuning, fine_tune_trials, remaining_block
    from extractor.datasets import open_dataset
    from extractor.models import get_backbone_spec, load_backbone

    activations_spec, full_spec = get_backbone_spec("vgg16_block4"), get_backbone_spec("vgg16")
    images, y = open_dataset(args.data).arrays()
    images = list(images)
    setup = FineTuning(args.head, args.epochs, args.epochs, args.batch_size)

    classic_times: dict = {}
    pixels = full_spec.preprocessing.apply(images, full_spec.input_size, full_spec.channels)
    classic_fine_tuning(activations_spec, full_spec, pixels, y, 0, setup, epoch_seconds=classic_times)

    lower = load_backbone(activations_spec)
    lower.embed(images[:8])  # warm-up
    start = time.perf_counter()
    activations = lower.embed(images)
    embed_seconds = time.perf_counter() - start
    block = remaining_block(activations_spec, full_spec)
    fine_tune_trials(block, activations[None], y[None], [0], FineTuning(args.head, 1, 0, args.batch_size))  # warm-up
    cached_times: dict = {}
    (trial,) = fine_tune_trials(block, activations[None], y[None], [0], setup, epoch_seconds=cached_times)

    per_epoch = {
        "classic": {"head": steady(classic_times["head"]), "block": steady(classic_times["block"])},
        "cached": {"head": cached_times["head"][0], "block": steady(cached_times["block"])},
    }
    full = {"classic": args.full_head_epochs * per_epoch["classic"]["head"]
            + args.full_block_epochs * per_epoch["classic"]["block"],
            "cached": embed_seconds + trial.seconds["block_forward"] + args.full_head_epochs * per_epoch["cached"]["head"]
            + args.full_block_epochs * per_epoch["cached"]["block"]}
    ratios = {stage: per_epoch["classic"][stage] / per_epoch["cached"][stage] for stage in ("head", "block")}
    ratios["recipe"] = full["classic"] / full["cached"]
    for stage in ("head", "block"):
        print(f"{stage} stage, per epoch: classic {per_epoch['classic'][stage]:.3f} s, cached "
              f"{per_epoch['cached'][stage]:.4f} s: {ratios[stage]:.1f}x")
    print(f"recipe ({args.full_head_epochs} head + {args.full_block_epochs} block epochs, {len(y)} images): classic "
          f"{full['classic']:.1f} s, cached {full['cached']:.1f} s (activations {embed_seconds:.2f} s, block 5 once "
          f"{trial.seconds['block_forward']:.2f} s): {ratios['recipe']:.1f}x faster")
    path = write_results("fine_tuning", {
        "data": args.data, "head": args.head, "batch_size": args.batch_size, "epochs_timed_per_stage": args.epochs,
        "full_head_epochs": args.full_head_epochs, "full_block_epochs": args.full_block_epochs,
        "seconds_per_epoch": {side: {k: round(v, 4) for k, v in stages.items()} for side, stages in per_epoch.items()},
        "epoch_seconds": {"classic": classic_times, "cached": cached_times},
        "cached_one_off_seconds": {"activations": round(embed_seconds, 3),
                                   "block_forward": round(trial.seconds["block_forward"], 3)},
        "recipe_seconds": {k: round(v, 2) for k, v in full.items()},
        "ratio": {k: round(v, 1) for k, v in ratios.items()},
        "final_training_accuracy": float(np.mean(trial.predict(activations) == y)),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
