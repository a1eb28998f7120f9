"""Runtimes by measurement: one network through Keras, TFLite and ONNX Runtime, images/s and vector deviation, in one run.

Forward: VGG16 at 32x32 (the `vgg16` entry) and EfficientNet-Lite0 at 224 (the `efficientnet_lite0` `.keras`
entry, and the shipped `efficientnet_lite0_tflite` file), each converted by `models optimize` into a scratch
repository; every variant runs the same CIFAR-10 test images, preprocessed by its own entry, at batch 32 and
128 (rounds taken in turn, medians); ratios against the exact float32 Keras entry measured in the same run,
and the deviation of the vectors from it (max abs, min cosine).

Embed path (the targets): the exact VGG16 entry and its optimised entries through `run_embed_job` (read,
decode, preprocess, forward, store) over CIFAR-10 100 per class (train) and a fixed 2,000-image test sample,
each into a fresh store; a logistic-regression probe (C swept by 5-fold CV on the training images) trained
on the train vectors, scored on the test ones.

    python benchmarks/runtimes.py [--images N] [--rounds 5] [--embed-rounds 3] [--networks vgg16,efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402

# network -> (exact Keras entry, [(runtime, precision) converted by models optimize], [shipped entries of it],
# images timed per round). ONNX Runtime's dynamic int8 is left out: its ConvInteger kernels ran VGG16 at
# 0.1-0.2x the Keras entry.
NETWORKS = {
    "vgg16": ("vgg16", [("keras", "bfloat16"), ("tflite", "none"), ("tflite", "float16"), ("tflite", "dynamic-int8"),
                        ("onnx", "none")], [], 256),
    "efficientnet_lite0": ("efficientnet_lite0", [("keras", "bfloat16"), ("tflite", "none"),
                                                  ("tflite", "dynamic-int8"), ("onnx", "none")],
                           ["efficientnet_lite0_tflite"], 128),
}
BATCH_SIZES = (32, 128)
EMBED_VARIANTS = (("keras", "bfloat16"), ("tflite", "dynamic-int8"))  # the optimised entries held to the targets
TRAIN_SPEC, TEST_SPEC = "cifar10:train?per_class=100&seed=0", "cifar10:test?per_class=200&seed=0"
EXACT_TARGET, SPEEDUP_TARGET, ACCURACY_TOLERANCE = 350.0, 3.0, 0.5


def sample_images(n: int) -> list:
    from extractor.datasets import open_dataset

    return [image for batch in open_dataset("cifar10:test").batches(n, n) for image in batch.images]


def forward_table(network: str, repository, images: list, rounds: int) -> dict:
    """Every variant of `network`: images/s per batch size (interleaved medians), ratio, deviation."""
    from extractor.models import load_backbone
    from extractor.models.optimize import interleaved_rates, optimize_entry, vector_deviation

    exact_name, conversions, shipped, _ = NETWORKS[network]
    rows = [{"entry": exact_name, "runtime": "keras", "precision": "float32",
             "spec": repository.spec(exact_name)}]
    for runtime, precision in conversions:
        try:
            result = optimize_entry(repository, exact_name, runtime=runtime, quantize=precision,
                                    images=images[:16], sample="cifar10:test", rounds=1)
        except Exception as e:  # a network the converter cannot take is a row saying so, not the end of the run
            logging.getLogger(__name__).exception("%s to %s %s failed", exact_name, runtime, precision)
            rows.append({"entry": None, "runtime": runtime, "precision": precision, "error": str(e)[:300]})
            continue
        rows.append({"entry": result.spec.name, "runtime": runtime, "precision": precision, "spec": result.spec})
    rows += [{"entry": name, "runtime": repository.spec(name).runtime, "precision": "shipped file",
              "spec": repository.spec(name)} for name in shipped]
    measured = [row for row in rows if "spec" in row]
    backbones = [load_backbone(row["spec"]) for row in measured]
    reference = backbones[0].embed(images)
    for row, backbone in zip(measured, backbones):
        row["max_abs_deviation"], row["min_cosine"] = vector_deviation(reference, backbone.embed(images))
        row["fingerprint"] = row.pop("spec").fingerprint
        row["images_per_second"], row["ratio"] = {}, {}
    for size in BATCH_SIZES:
        for backbone in backbones:
            backbone.max_batch = size
        rates = interleaved_rates(backbones, images, rounds=rounds)
        for row, rate in zip(measured, rates):
            row["images_per_second"][str(size)] = round(rate, 1)
            row["ratio"][str(size)] = round(rate / rates[0], 3)
    return {"exact_entry": exact_name, "input_size": backbones[0].spec.input_size, "images": len(images),
            "rounds": rounds, "rows": rows}


def print_forward(network: str, table: dict) -> None:
    print(f"\n{network} at {table['input_size']}x{table['input_size']}: forward on {table['images']} CIFAR-10 test "
          f"images, medians of {table['rounds']} rounds; ratio against {table['exact_entry']} (Keras, float32)")
    head = "".join(f"{'batch ' + str(s):>19}" for s in BATCH_SIZES)
    print(f"  {'runtime':<8}{'precision':<14}{head}{'max abs':>11}{'min cosine':>12}  entry")
    for row in table["rows"]:
        if "error" in row:
            print(f"  {row['runtime']:<8}{row['precision']:<14}conversion failed: {row['error'][:80]}")
            continue
        rates = "".join(f"{row['images_per_second'][str(s)]:>11.1f} {row['ratio'][str(s)]:>5.2f}x "
                        for s in BATCH_SIZES)
        print(f"  {row['runtime']:<8}{row['precision']:<14}{rates}{row['max_abs_deviation']:>11.4g}"
              f"{row['min_cosine']:>12.6f}  {row['entry']}")
    if any(row["runtime"] == "tflite" for row in table["rows"]):
        print("  (the TFLite runtime invokes one image at a time: its batch size only cuts the call)")


def embed_once(spec, data_spec: str, folder: str) -> tuple[object, dict]:
    """One embed job into a fresh store; (store path, job summary)."""
    from extractor.datasets import open_dataset
    from extractor.embedder import Embedder
    from extractor.jobs import run_embed_job
    from extractor.models import load_backbone
    from extractor.store import EmbeddingStore

    path = Path(tempfile.mkdtemp(dir=folder)) / "store.sqlite"
    with EmbeddingStore(path) as store:
        summary = run_embed_job(open_dataset(data_spec), Embedder(spec, store, load_backbone(spec)), "set")
    return path, summary.as_dict()


def embed_path(specs: dict, rounds: int, folder: str) -> dict:
    """Each entry's train and test sets through the whole embed path, `rounds` times in turn (fresh stores);
    the median images/s, the deviation of its stored vectors from the exact entry's, and the probe."""
    import numpy as np

    from classifiers.baselines import SweptLogisticRegression
    from extractor.datasets import open_dataset
    from extractor.models.optimize import vector_deviation

    for data_spec in (TRAIN_SPEC, TEST_SPEC):  # the JPEGs into the page cache before anything is timed
        for _ in open_dataset(data_spec).batches(512):
            pass
    rates = {name: [] for name in specs}
    stores = {}
    for _ in range(rounds):
        for name, spec in specs.items():
            jobs = [embed_once(spec, data_spec, folder) for data_spec in (TRAIN_SPEC, TEST_SPEC)]
            images, seconds = sum(job["images"] for _, job in jobs), sum(job["seconds"] for _, job in jobs)
            rates[name].append(images / seconds)
            stores[name] = [path for path, _ in jobs]
    results, exact_name = {}, next(iter(specs))
    vectors = {}
    for name in specs:
        (train_x, train_y, _), (test_x, test_y, _) = (_feature_set(path) for path in stores[name])
        vectors[name] = np.concatenate([train_x, test_x])
        probe = SweptLogisticRegression(random_state=0).fit(train_x, train_y)
        max_abs, min_cosine = vector_deviation(vectors[exact_name], vectors[name])
        results[name] = {"images": len(vectors[name]), "images_per_second": round(statistics.median(rates[name]), 1),
                         "rounds": [round(r, 1) for r in rates[name]],
                         "probe_accuracy": round(100 * probe.score(test_x, test_y), 2), "probe_C": probe.C_,
                         "max_abs_deviation": max_abs, "min_cosine": min_cosine}
    exact = results[exact_name]
    for row in results.values():
        row["speedup"] = round(row["images_per_second"] / exact["images_per_second"], 3)
        row["accuracy_delta"] = round(row["probe_accuracy"] - exact["probe_accuracy"], 2)
    return {"train": TRAIN_SPEC, "test": TEST_SPEC, "rows": results}


def _feature_set(path):
    from extractor.store import EmbeddingStore

    with EmbeddingStore(path, readonly=True) as store:
        return store.load_feature_set("set")


def print_embed_path(table: dict, exact_name: str) -> dict:
    """The table and the targets; returns whether each target is met."""
    rows = table["rows"]
    exact = rows[exact_name]
    print(f"\nembed path (read, decode, preprocess, forward, store) over {exact['images']} CIFAR-10 images "
          f"({table['train']} + {table['test']}), medians of {len(exact['rounds'])} rounds; probe: logistic "
          "regression trained on the 1,000, tested on the 2,000")
    print(f"  {'entry':<22}{'images/s':>10}{'speed-up':>10}{'probe':>9}{'delta':>8}{'min cosine':>12}")
    for name, row in rows.items():
        print(f"  {name:<22}{row['images_per_second']:>10.1f}{row['speedup']:>9.2f}x{row['probe_accuracy']:>8.2f}%"
              f"{row['accuracy_delta']:>+8.2f}{row['min_cosine']:>12.6f}")
    targets = {"exact_images_per_second": {"measured": exact["images_per_second"], "target": EXACT_TARGET,
                                           "met": exact["images_per_second"] >= EXACT_TARGET}}
    print(f"  target: exact entry >= {EXACT_TARGET:.0f} images/s: {exact['images_per_second']:.1f} "
          f"({'met' if targets['exact_images_per_second']['met'] else 'missed'})")
    for name, row in rows.items():
        if name == exact_name:
            continue
        met = row["speedup"] >= SPEEDUP_TARGET and abs(row["accuracy_delta"]) <= ACCURACY_TOLERANCE
        targets[name] = {"speedup": row["speedup"], "accuracy_delta": row["accuracy_delta"], "met": met}
        print(f"  target: {name} >= {SPEEDUP_TARGET:.0f}x the exact entry with the probe within "
              f"{ACCURACY_TOLERANCE} points: {row['speedup']:.2f}x, {row['accuracy_delta']:+.2f} points "
              f"({'met' if met else 'missed'})")
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, help="CIFAR-10 test images timed per round (default 256 for VGG16, "
                                                   "128 for EfficientNet-Lite0)")
    parser.add_argument("--rounds", type=int, default=5, help="timed forward rounds per variant (default 5)")
    parser.add_argument("--embed-rounds", type=int, default=3, help="embed-path runs per entry (default 3)")
    parser.add_argument("--networks", default=",".join(NETWORKS), help=f"of {', '.join(NETWORKS)}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from extractor.models import ModelRepository

    networks = [n.strip() for n in args.networks.split(",") if n.strip()]
    unknown = sorted(set(networks) - set(NETWORKS))
    if unknown:
        parser.error(f"unknown network(s) {', '.join(unknown)}; known: {', '.join(NETWORKS)}")
    results = {"forward": {}, "load_average_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="runtimes-") as scratch:
        repository = ModelRepository(Path(scratch) / "repository")
        for network in networks:
            images = sample_images(args.images or NETWORKS[network][3])
            results["forward"][network] = forward_table(network, repository, images, args.rounds)
            print_forward(network, results["forward"][network])
        if "vgg16" in networks:
            converted = {(row["runtime"], row["precision"]): row["entry"]
                         for row in results["forward"]["vgg16"]["rows"] if row["entry"]}
            specs = {name: repository.spec(name) for name in
                     ["vgg16"] + [converted[v] for v in EMBED_VARIANTS if v in converted]}
            results["embed_path"] = embed_path(specs, args.embed_rounds, scratch)
            results["targets"] = print_embed_path(results["embed_path"], "vgg16")
    results["load_average_at_end"] = os.getloadavg()  # other work on the cores shows in every absolute figure
    print(f"\nwrote {write_results('runtimes', results)}")


if __name__ == "__main__":
    main()
