"""How much JPEG compression moves cifar_vgg's transfer row: our CIFAR-10 is itself a JPEG re-encoding
(quality about 75, 4:2:0 chroma) of the original arrays, which are not available here to compare.

Each quality re-encodes every image once more with Pillow (4:2:0 chroma), training and test images alike,
and trains the row's head (VGG16 with the lecture's preprocessing + dropout-mlp512-tanh-dropout, 50 epochs,
batch 32, Adam) on the first --trials trials' 1,000 images in the fast trainer, scored on a stratified test
sample. "as is" is the shared files as they are. The slope from "as is" to lower qualities says how far
compression of this kind moves the row; a re-encoding at the files' own quality is nearly idempotent and says
little about what the first encoding cost. Figures in benchmarks/results/cifar_jpeg_sensitivity.json.

    python benchmarks/cifar_jpeg_sensitivity.py [--qualities 90,50,30] [--trials 5]
        [--test 'cifar10:test?per_class=200&seed=0'] [--store PATH]
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, write_results  # noqa: E402

log = logging.getLogger("cifar_jpeg_sensitivity")

TRAIN = "cifar10:small?per_class=100&seed={seed}"
HEAD, EPOCHS, BATCH_SIZE = "dropout-mlp512-tanh-dropout", 50, 32


def reencode(images, quality: int | None):
    """(n, H, W, 3) uint8 images through one more JPEG encoding at `quality` (None: as they are)."""
    import numpy as np
    from PIL import Image

    if quality is None:
        return images
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling="4:2:0")
        out.append(np.asarray(Image.open(buffer).convert("RGB")))
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qualities", default="90,50,30", help="JPEG qualities of the extra encoding")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--test", default="cifar10:test?per_class=200&seed=0")
    parser.add_argument("--store", default=None, help="embedding store (default: EXTRACTOR_STORE or the user cache)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    import numpy as np

    from classifiers.trainer import train_trials
    from extractor import api, paths
    from extractor.datasets import open_dataset
    from extractor.store import EmbeddingStore

    test_x, test_y = open_dataset(args.test).arrays()
    trials = [open_dataset(TRAIN.format(seed=t)).arrays() for t in range(args.trials)]
    rows = []
    with EmbeddingStore(paths.store_path(args.store)) as store:
        for quality in [None, *(int(q) for q in args.qualities.split(","))]:
            start = time.perf_counter()
            X_test, _, _ = api.embed(reencode(test_x, quality), "vgg16", store=store)
            X_trials = np.stack([api.embed(reencode(x, quality), "vgg16", store=store)[0] for x, _ in trials])
            embed_seconds = time.perf_counter() - start
            results = train_trials(HEAD, X_trials, np.stack([y for _, y in trials]), list(range(args.trials)),
                                   EPOCHS, BATCH_SIZE)
            accuracies = [float(np.mean(r.predict(X_test) == test_y)) for r in results]
            rows.append({"quality": quality or "as is", "accuracies": [round(a, 4) for a in accuracies],
                         "mean": round(float(np.mean(accuracies)), 4), "min": round(min(accuracies), 4),
                         "max": round(max(accuracies), 4), "embed_seconds": round(embed_seconds, 1)})
            log.info("quality %s: %.1f%% (%.1f-%.1f)", quality or "as is", 100 * np.mean(accuracies),
                     100 * min(accuracies), 100 * max(accuracies))
    results = {"head": HEAD, "epochs": EPOCHS, "batch_size": BATCH_SIZE, "trials": args.trials, "test": args.test,
               "test_images": len(test_y), "rows": rows,
               "command": " ".join(["python", "benchmarks/cifar_jpeg_sensitivity.py", *sys.argv[1:]])}
    print(f"wrote {write_results('cifar_jpeg_sensitivity', results)}")


if __name__ == "__main__":
    main()
