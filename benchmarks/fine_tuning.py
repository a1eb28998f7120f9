"""Fine-tuning VGG16's block 5 with a head: the classic way (the whole model on pixels) vs cached activations.

One trial of each experiment's training set (mnist_vgg: 100 MNIST images, linear head, batch 4; cifar_vgg:
1,000 CIFAR-10 images, dropout-mlp512-tanh-dropout head, batch 32), both ways on the same epochs of each
stage, in one run. Per-epoch seconds are steady-state medians (each stage's first
epoch, which traces and compiles, left out). Cached: the activations at block4_pool computed once (one
forward pass over the images, counted once), block 5's output once per trial for the head stage, the
head stage in the fast trainer (timed over all its epochs after a warm-up call), the block stage by Keras
on the activations. The ratio is given per stage's epoch and for the whole recipe at its full epochs
(the cached side's one-off passes included).

    python benchmarks/fine_tuning.py [--workloads mnist_vgg,cifar_vgg] [--epochs 4] [--full-block-epochs 10]
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


# name -> (training set, head, batch size, the recipe's head epochs): the explored rows' settings
WORKLOADS = {
    "mnist_vgg": ("mnist:small?n=100&seed=0", "linear", 4, 100),
    "cifar_vgg": ("cifar10:small?per_class=100&seed=0", "dropout-mlp512-tanh-dropout", 32, 50),
}


def measure(data: str, head: str, batch_size: int, epochs: int, full_head_epochs: int, full_block_epochs: int) -> dict:
    """Both ways on one training set; per-epoch seconds, one-off seconds and the ratios."""
    import numpy as np

    from classifiers.fine_tuning import FineTuning, classic_fine_tuning, fine_tune_trials, remaining_block
    from extractor.datasets import open_dataset
    from extractor.models import get_backbone_spec, load_backbone

    activations_spec, full_spec = get_backbone_spec("vgg16_block4"), get_backbone_spec("vgg16")
    images, labels = [], []
    for batch in open_dataset(data).batches(4096):  # a list: a few CIFAR-10 JPEGs decode to other shapes
        images.extend(batch.images)
        labels.append(batch.labels)
    y = np.concatenate(labels)
    setup = FineTuning(head, epochs, epochs, batch_size)

    classic_times: dict = {}
    pixels = full_spec.preprocessing.apply(images, full_spec.input_size, full_spec.channels)
    classic_fine_tuning(activations_spec, full_spec, pixels, y, 0, setup, epoch_seconds=classic_times)

    lower = load_backbone(activations_spec)
    lower.embed(images[:8])  # warm-up
    start = time.perf_counter()
    activations = lower.embed(images)
    embed_seconds = time.perf_counter() - start
    block = remaining_block(activations_spec, full_spec)
    fine_tune_trials(block, activations[None], y[None], [0], FineTuning(head, 1, 0, batch_size))  # warm-up
    cached_times: dict = {}
    (trial,) = fine_tune_trials(block, activations[None], y[None], [0], setup, epoch_seconds=cached_times)

    per_epoch = {
        "classic": {"head": steady(classic_times["head"]), "block": steady(classic_times["block"])},
        "cached": {"head": cached_times["head"][0], "block": steady(cached_times["block"])},
    }
    full = {"classic": full_head_epochs * per_epoch["classic"]["head"] + full_block_epochs * per_epoch["classic"]["block"],
            "cached": embed_seconds + trial.seconds["block_forward"] + full_head_epochs * per_epoch["cached"]["head"]
            + full_block_epochs * per_epoch["cached"]["block"]}
    ratios = {stage: per_epoch["classic"][stage] / per_epoch["cached"][stage] for stage in ("head", "block")}
    ratios["recipe"] = full["classic"] / full["cached"]
    for stage in ("head", "block"):
        print(f"  {stage} stage, per epoch: classic {per_epoch['classic'][stage]:.3f} s, cached "
              f"{per_epoch['cached'][stage]:.4f} s: {ratios[stage]:.1f}x", flush=True)
    print(f"  recipe ({full_head_epochs} head + {full_block_epochs} block epochs, {len(y)} images): classic "
          f"{full['classic']:.1f} s, cached {full['cached']:.1f} s (activations {embed_seconds:.2f} s, block 5 once "
          f"{trial.seconds['block_forward']:.2f} s): {ratios['recipe']:.1f}x faster", flush=True)
    return {
        "data": data, "head": head, "batch_size": batch_size, "epochs_timed_per_stage": epochs,
        "full_head_epochs": full_head_epochs, "full_block_epochs": full_block_epochs,
        "seconds_per_epoch": {side: {k: round(v, 4) for k, v in stages.items()} for side, stages in per_epoch.items()},
        "epoch_seconds": {"classic": classic_times, "cached": cached_times},
        "cached_one_off_seconds": {"activations": round(embed_seconds, 3),
                                   "block_forward": round(trial.seconds["block_forward"], 3)},
        "recipe_seconds": {k: round(v, 2) for k, v in full.items()},
        "ratio": {k: round(v, 1) for k, v in ratios.items()},
        "final_training_accuracy": float(np.mean(trial.predict(activations) == y)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="mnist_vgg,cifar_vgg", help=f"of {', '.join(WORKLOADS)}")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of each stage timed, both ways (default 4)")
    parser.add_argument("--full-block-epochs", type=int, default=10, help="the recipe's block epochs (default 10)")
    args = parser.parse_args()

    results = {}
    for name in args.workloads.split(","):
        if name not in WORKLOADS:
            parser.error(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
        data, head, batch_size, head_epochs = WORKLOADS[name]
        print(f"{name}: {data}, {head}, batch {batch_size}", flush=True)
        results[name] = measure(data, head, batch_size, args.epochs, head_epochs, args.full_block_epochs)
    print(f"wrote {write_results('fine_tuning', results)}")


if __name__ == "__main__":
    main()
