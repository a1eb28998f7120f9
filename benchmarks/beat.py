"""Results to beat from few training images: CIFAR-10 from 100 per class, MNIST 1,3,5,7,9 from 100 in all.

A recipe is a set of shipped backbones whose embeddings are concatenated, a set of views of each training
image (the image itself, and augmented copies computed with the backbones: horizontal flips for CIFAR-10,
shifts of 1-2 pixels and rotations of 5-15 degrees for digits) and a standardised logistic regression. Every choice is
made on the training images of each trial only: one 5-fold cross-validation (folds over the original
images; a fold's views train with it, only originals validate) scores every (recipe, C) pair, the pair with
the best mean accuracy over the trials is chosen, and each trial's regression is refitted at it on all its
views. An "averaged" recipe instead gives each image one row, its vectors averaged over its views, and so
treats test images the same way (their flips are embedded too); otherwise test images are never augmented.
Only the chosen recipe (and a reference: the task's baseline recipe) is scored on the test set. Every vector
goes through the project's store, so a rerun embeds nothing; the seconds of embedding are those measured
when the vectors were computed (images per second of each backbone, over the images this script computed).

    python benchmarks/beat.py --task cifar10 --trials 3       # the README's figures
    python benchmarks/beat.py --task mnist --trials 5 --recipes 1,2,3,4
    [--test SPEC] [--recipes 0,1,...] [--store PATH]; --embed-only [--backbones A,B] fills the store only

Results in benchmarks/results/beat_<task>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, write_results  # noqa: E402

log = logging.getLogger("beat")

CS = tuple(10.0 ** k for k in range(-4, 2))   # logistic regression's inverse regularisation, picked by CV
FOLDS = 5


@dataclass(frozen=True)
class Recipe:
    name: str
    backbones: tuple[str, ...]
    views: tuple[str, ...]   # "identity" first; the rest are augmented copies of the training images
    average: bool = False    # one row per image, its vectors averaged over `views`: test images alike


@dataclass(frozen=True)
class Task:
    train: str             # trial t's training set, with {seed}
    test: str              # default test set
    target: float          # accuracy to reach, a fraction
    best_so_far: float
    views: tuple[str, ...]
    recipes: tuple[Recipe, ...]
    baseline: str          # the recipe named here is scored on the test set beside the pick, as a reference


# The TFLite runtimes of EfficientNet-Lite0 and -Lite2: the same networks as the Keras entries (cosine >= 0.9999
# to them); Lite0's shipped file ran 1.6-2.5x the Keras entry in benchmarks/runtimes.py. Lite0's is shipped;
# Lite2's is made once by `extractor models optimize efficientnet_lite2 --runtime tflite` into the user's
# repository (see `ensure_entry`).
LITE0, LITE2, MOBILENET, MNIST_CNN = "efficientnet_lite0_tflite", "efficientnet_lite2_tflite_fp32", "mobilenet_v1", \
    "mnist_cnn"
CONVERTED = {LITE2: ("efficientnet_lite2", "tflite")}   # entry made by `models optimize` -> (its source, runtime)
DIGIT_VIEWS = ("identity", "shift+2x", "shift-2x", "shift+2y", "shift-2y", "rotate+10", "rotate-10")
MORE_DIGIT_VIEWS = DIGIT_VIEWS + ("shift+1x", "shift-1x", "shift+1y", "shift-1y", "rotate+5", "rotate-5", "rotate+15",
                                  "rotate-15")
MANY_DIGIT_VIEWS = MORE_DIGIT_VIEWS + tuple(f"shift{dx:+d}x{dy:+d}y" for dx in (-2, -1, 1, 2) for dy in (-2, -1, 1, 2)
                                            if abs(dx) == abs(dy))
TASKS = {
    "cifar10": Task(
        "cifar10:small?per_class=100&seed={seed}", "cifar10:test?per_class=100&seed=0", 0.80, 0.746,
        ("identity", "hflip"),
        (Recipe("EfficientNet-Lite0", (LITE0,), ("identity",)),
         Recipe("EfficientNet-Lite2", (LITE2,), ("identity",)),
         Recipe("EfficientNet-Lite2, flips", (LITE2,), ("identity", "hflip")),
         Recipe("EfficientNet-Lite2 + Lite0", (LITE2, LITE0), ("identity",)),
         Recipe("EfficientNet-Lite2 + Lite0, flips", (LITE2, LITE0), ("identity", "hflip")),
         Recipe("EfficientNet-Lite2 + Lite0 + MobileNet, flips", (LITE2, LITE0, MOBILENET), ("identity", "hflip")),
         Recipe("EfficientNet-Lite2 + Lite0, averaged with the flip", (LITE2, LITE0), ("identity", "hflip"), True),
         Recipe("EfficientNet-Lite2 + Lite0 + MobileNet, averaged with the flip", (LITE2, LITE0, MOBILENET),
                ("identity", "hflip"), True)),
        "EfficientNet-Lite0"),
    "mnist": Task(
        "mnist:small?n=100&seed={seed}", "mnist:small-test", 0.97, 0.960, MANY_DIGIT_VIEWS,
        (Recipe("pretrained CNN + MobileNet", (MNIST_CNN, MOBILENET), ("identity",)),
         Recipe("pretrained CNN", (MNIST_CNN,), ("identity",)),
         Recipe("pretrained CNN, shifts and rotations", (MNIST_CNN,), DIGIT_VIEWS),
         Recipe("pretrained CNN, more shifts and rotations", (MNIST_CNN,), MORE_DIGIT_VIEWS),
         Recipe("pretrained CNN, more shifts (diagonal too) and rotations", (MNIST_CNN,), MANY_DIGIT_VIEWS),
         Recipe("pretrained CNN + MobileNet, shifts and rotations", (MNIST_CNN, MOBILENET), DIGIT_VIEWS),
         Recipe("pretrained CNN + EfficientNet-Lite0, shifts and rotations", (MNIST_CNN, LITE0), DIGIT_VIEWS),
         Recipe("pretrained CNN + MobileNet + EfficientNet-Lite0, shifts and rotations", (MNIST_CNN, MOBILENET, LITE0),
                DIGIT_VIEWS)),
        "pretrained CNN"),
}


def view(images, name: str):
    """(n, H, W, C) uint8 images seen as `name`: identity, hflip, shift+Nx / shift-Ny (zero fill), rotate+D."""
    import numpy as np
    from scipy import ndimage

    if name == "identity":
        return images
    if name == "hflip":
        return images[:, :, ::-1]
    if name.startswith("shift"):   # shift+Nx, shift-Ny, or both: shift+Nx-My
        shifted = images
        for amount, axis in re.findall(r"([+-]\d+)([xy])", name):
            amount, axis = int(amount), {"y": 1, "x": 2}[axis]
            shifted = np.roll(shifted, amount, axis=axis)
            edge = [slice(None)] * 4
            edge[axis] = slice(0, amount) if amount > 0 else slice(amount, None)
            shifted[tuple(edge)] = 0
        return shifted
    if name.startswith("rotate"):
        return ndimage.rotate(images, float(name[6:]), axes=(1, 2), reshape=False, order=1, mode="constant")
    raise ValueError(f"unknown view {name!r}")


class Vectors:
    """Embeddings of image arrays by backbone through the project's store; seconds of what was computed."""

    def __init__(self, store):
        self.store, self.seconds, self.computed, self._embedders = store, {}, {}, {}

    def __call__(self, images, backbone: str):
        """(n, d) float32 vectors of (n, H, W, C) uint8 images, as `extractor.api.embed` gives them."""
        import numpy as np

        from extractor import api
        from extractor.embedder import Embedder

        if backbone not in self._embedders:
            self._embedders[backbone] = Embedder(api.backbone_spec(backbone), self.store)
        start, computed, vectors = time.perf_counter(), 0, []
        for batch in api.as_dataset(images).batches(256):
            resolved = self._embedders[backbone].embed([batch.pixels(j) for j in range(len(batch.images))])
            vectors.append(resolved.vectors)
            computed += int((~resolved.cached).sum())
        if computed:
            self.seconds[backbone] = self.seconds.get(backbone, 0.0) + time.perf_counter() - start
            self.computed[backbone] = self.computed.get(backbone, 0) + computed
        return np.concatenate(vectors)


def ensure_entry(name: str) -> None:
    """Make a converted entry (`CONVERTED`) in the user's model repository if it is not there yet."""
    from extractor.models.optimize import optimize_entry
    from extractor.models.repository import ModelRepository

    repository = ModelRepository()
    if name in CONVERTED and name not in repository.entries():
        source, runtime = CONVERTED[name]
        log.info("converting %s to %s once (as `extractor models optimize %s --runtime %s`)", source, runtime,
                 source, runtime)
        optimize_entry(repository, source, runtime=runtime, new_name=name, sample_images=16)


def grouped_splits(y, views: int, seed: int):
    """5 folds over the n original images (rows view-major: view v of image i is row v * n + i): a fold's
    training rows are all views of its training images, its validation rows the held-out originals."""
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    n = len(y)
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(np.zeros(n), y)
    return [(np.concatenate([v * n + fit for v in range(views)]), held) for fit, held in folds]


def cross_validate(X, y, views: int, seed: int):
    """(mean CV accuracy per C of CS, the regression refitted on all rows at the best C)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y_all = np.tile(y, views)
    model = make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=list(CS), cv=grouped_splits(y, views, seed), scoring="accuracy", max_iter=3000, random_state=seed,
        l1_ratios=(0.0,), use_legacy_attributes=False))
    model.fit(X, y_all)
    return np.asarray(model[-1].scores_).mean(axis=0)[0], model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--trials", type=int, default=3, help="training sets drawn (seeds 0..), default 3")
    parser.add_argument("--test", default=None, help="test set data spec (default: the task's)")
    parser.add_argument("--recipes", default=None, help="comma-separated recipe numbers to consider (default: all)")
    parser.add_argument("--embed-only", action="store_true", help="compute and store the vectors, score nothing")
    parser.add_argument("--backbones", default=None, help="with --embed-only: only these (comma-separated), so that "
                        "several processes can share the work")
    parser.add_argument("--store", default=None, help="embedding store (default: EXTRACTOR_STORE or the user cache)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import numpy as np

    from classifiers.baselines import single_threaded_blas
    from extractor import paths
    from extractor.datasets import open_dataset
    from extractor.store import EmbeddingStore

    task = TASKS[args.task]
    test_spec = args.test or task.test
    recipes = [task.recipes[int(i)] for i in args.recipes.split(",")] if args.recipes else list(task.recipes)
    backbones = list(dict.fromkeys(b for r in recipes for b in r.backbones))
    if args.backbones:
        if not args.embed_only:
            parser.error("--backbones goes with --embed-only")
        backbones = [b for b in backbones if b in args.backbones.split(",")]
    needed = [(b, v) for b in backbones for v in task.views if any(b in r.backbones and v in r.views for r in recipes)]
    out = RESULTS / f"beat_{args.task}.json"
    earlier = json.loads(out.read_text()).get("embedding", {}) if out.exists() else {}

    for backbone in backbones:
        ensure_entry(backbone)
    with EmbeddingStore(paths.store_path(args.store)) as store:
        vectors = Vectors(store)
        x_test, y_test = open_dataset(test_spec).arrays()
        trials = []
        for t in range(args.trials):
            x, y = open_dataset(task.train.format(seed=t)).arrays()
            trials.append({"y": y, "X": {(b, v): vectors(view(x, v), b) for b, v in needed}})
            log.info("trial %d embedded", t)
        test = {(b, v): vectors(view(x_test, v), b) for b, v in needed
                if v == "identity" or any(r.average and b in r.backbones and v in r.views for r in recipes)}
        log.info("test set embedded")
    embedding = {}
    for b in backbones:
        if b in vectors.computed:
            embedding[b] = {"images_computed": vectors.computed[b], "seconds": round(vectors.seconds[b], 1),
                            "images_per_second": round(vectors.computed[b] / vectors.seconds[b], 2)}
        elif b in earlier:
            embedding[b] = {**earlier[b], "measured": "in an earlier run of this script (reused here)"}
    if args.embed_only:   # the file's other figures kept, the rates merged with what others measured meanwhile
        now = json.loads(out.read_text()) if out.exists() else {"note": "vectors only; nothing scored yet"}
        now.pop("environment", None)
        write_results(f"beat_{args.task}", {**now, "embedding": {**now.get("embedding", {}), **embedding}})
        return

    def features(X, recipe):
        """Rows of `recipe` from vectors X[(backbone, view)]: views stacked (view-major), or averaged."""
        join = (lambda parts: np.mean(parts, axis=0)) if recipe.average else np.concatenate
        return np.concatenate([join([X[(b, v)] for v in recipe.views]) for b in recipe.backbones], axis=1)

    def rows_per_image(recipe):
        return 1 if recipe.average else len(recipe.views)

    scored, started = [], time.perf_counter()
    with single_threaded_blas():
        for recipe in recipes:
            start = time.perf_counter()
            per_trial = [cross_validate(features(trial["X"], recipe), trial["y"], rows_per_image(recipe), seed)[0]
                         for seed, trial in enumerate(trials)]
            curve = np.mean(per_trial, axis=0)
            scored.append({"recipe": recipe.name, "backbones": list(recipe.backbones), "views": list(recipe.views),
                           "views_averaged": recipe.average,
                           "cv_accuracy_by_C": {f"{c:g}": round(float(a), 4) for c, a in zip(CS, curve)},
                           "cv_best": round(float(curve.max()), 4), "C": CS[int(np.argmax(curve))],
                           "cv_seconds": round(time.perf_counter() - start, 1)})
            log.info("%s: CV %.1f%% at C=%g (%.0f s)", recipe.name, 100 * curve.max(), scored[-1]["C"],
                     scored[-1]["cv_seconds"])
        choice = max(scored, key=lambda s: s["cv_best"])
        tested = {}
        for label, name in (("pick", choice["recipe"]), ("baseline", task.baseline)):
            recipe = next((r for r in recipes if r.name == name), None)
            if recipe is None or name in [t["recipe"] for t in tested.values()]:
                continue
            entry = next(s for s in scored if s["recipe"] == name)
            from sklearn.linear_model import LogisticRegression
            from sklearn.pipeline import make_pipeline
            from sklearn.preprocessing import StandardScaler

            accuracies, fit_seconds = [], []
            X_test = features(test, recipe if recipe.average else Recipe(name, recipe.backbones, ("identity",)))
            for seed, trial in enumerate(trials):
                start = time.perf_counter()
                model = make_pipeline(StandardScaler(), LogisticRegression(C=entry["C"], max_iter=3000))
                model.fit(features(trial["X"], recipe), np.tile(trial["y"], rows_per_image(recipe)))
                fit_seconds.append(time.perf_counter() - start)
                accuracies.append(float(np.mean(model.predict(X_test) == y_test)))
            images = len(trials[0]["y"]) * len(recipe.views)
            embed_cost = sum(images / embedding[b]["images_per_second"] for b in recipe.backbones if b in embedding)
            tested[label] = {
                "recipe": name, "backbones": list(recipe.backbones), "views": list(recipe.views),
                "views_averaged": recipe.average, "C": entry["C"],
                "cv_accuracy": entry["cv_best"], "accuracies": [round(a, 4) for a in accuracies],
                "mean": round(float(np.mean(accuracies)), 4), "min": round(min(accuracies), 4),
                "max": round(max(accuracies), 4),
                "seconds_per_trial": {"embedding_training_views": round(embed_cost, 1),
                                      "cross_validation": round(entry["cv_seconds"] / len(trials), 1),
                                      "fit": round(float(np.mean(fit_seconds)), 2)},
                "seconds_embedding_test_set": round(sum(len(y_test) * (len(recipe.views) if recipe.average else 1)
                                                        / embedding[b]["images_per_second"]
                                                        for b in recipe.backbones if b in embedding), 1)}
            log.info("%s (%s): test %.1f%% (%.1f-%.1f) over %d trials", label, name, 100 * np.mean(accuracies),
                     100 * min(accuracies), 100 * max(accuracies), len(trials))

    results = {"task": args.task, "train": task.train, "test": test_spec, "test_images": len(y_test),
               "trials": args.trials, "target": task.target, "best_so_far": task.best_so_far, "Cs": list(CS),
               "folds": FOLDS, "recipes": scored, "chosen": choice["recipe"], "tested": tested,
               "reached": tested["pick"]["mean"] >= task.target, "embedding": embedding,
               "scoring_seconds": round(time.perf_counter() - started, 1),
               "command": " ".join(["python", "benchmarks/beat.py", *sys.argv[1:]])}
    print(f"wrote {write_results(f'beat_{args.task}', results)}")


if __name__ == "__main__":
    main()
