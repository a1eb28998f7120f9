"""Embed throughput: raw frozen VGG16 forward vs the full embed path, in one run, with their ratio.

The full path reads and decodes CIFAR-10 test JPEGs, preprocesses, runs the backbone and writes the
store; the raw figure runs the same compiled backbone on preprocessed pixels already in memory.
Also: a warm rerun (everything cached) and peak RSS for two dataset sizes (streaming keeps it flat).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import median_seconds, write_results  # noqa: E402


def raw_forward(images: int, batch_sizes: list[int]) -> dict:
    import numpy as np

    from extractor.models import get_backbone_spec, load_backbone
    from extractor.datasets import open_dataset

    backbone = load_backbone(get_backbone_spec("vgg16"))
    pixels = [img for batch in open_dataset("cifar10:test").batches(512, images) for img in batch.images]
    batch = backbone.preprocess(pixels)
    per_size = {}
    for size in batch_sizes:
        backbone.max_batch = size
        backbone.forward(batch[:size])  # warm-up at this size
        per_size[size] = len(batch) / median_seconds(lambda: backbone.forward(batch))
    best = max(per_size, key=per_size.get)
    backbone.max_batch = best
    return {"images_per_second": per_size[best], "best_batch_size": best,
            "by_batch_size": {str(k): round(v, 1) for k, v in per_size.items()},
            "check": float(np.abs(backbone.forward(batch[:2])).sum())}


def embed_job(store: str, images: int, batch_size: int) -> dict:
    """One embed job in this process (backbone already built); returns the job summary."""
    from extractor.models import get_backbone_spec
    from extractor.datasets import open_dataset
    from extractor.embedder import Embedder
    from extractor.jobs import run_embed_job
    from extractor.store import EmbeddingStore

    with EmbeddingStore(store) as handle:
        summary = run_embed_job(open_dataset("cifar10:test"), Embedder(get_backbone_spec("vgg16"), handle),
                                "bench", batch_size=batch_size, limit=images)
    return summary.as_dict()


def child_peak_rss(store: str, images: int, batch_size: int) -> dict:
    """Run an embed job in a fresh process and report its peak RSS (MiB)."""
    out = subprocess.run([sys.executable, __file__, "--child", store, str(images), str(batch_size)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000, help="images for the cold embed path (default 3000)")
    parser.add_argument("--warm-images", type=int, default=10_000, help="images for the warm rerun (default 10000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        store, images, batch_size = args.child
        summary = embed_job(store, int(images), int(batch_size))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"images": summary["images"], "computed": summary["computed"], "peak_rss_mib": peak}))
        return

    raw = raw_forward(min(args.images, 1024), [64, 128, 256])
    with tempfile.TemporaryDirectory() as tmp:
        cold = embed_job(f"{tmp}/cold.sqlite", args.images, args.batch_size)
        ratio = cold["images_per_second"] / raw["images_per_second"]
        print(f"raw VGG16 32x32 forward      {raw['images_per_second']:8.1f} images/s (batch {raw['best_batch_size']})")
        print(f"embed path (cold, {cold['images']} images) {cold['images_per_second']:8.1f} images/s")
        print(f"ratio embed / raw            {ratio:8.3f}   (target >= 0.9)")

        warm_store = f"{tmp}/warm.sqlite"
        embed_job(warm_store, args.warm_images, args.batch_size)
        start = time.perf_counter()
        warm = embed_job(warm_store, args.warm_images, args.batch_size)
        warm_seconds = time.perf_counter() - start
        print(f"warm rerun of {warm['images']} images   {warm_seconds:8.2f} s   (target <= 2 s; "
              f"{warm['computed']} computed)")

        small = child_peak_rss(f"{tmp}/rss_small.sqlite", 1000, args.batch_size)
        large = child_peak_rss(f"{tmp}/rss_large.sqlite", 4000, args.batch_size)
        growth = large["peak_rss_mib"] / small["peak_rss_mib"] - 1
        print(f"peak RSS: 1000 images {small['peak_rss_mib']:.0f} MiB, 4000 images {large['peak_rss_mib']:.0f} MiB "
              f"({growth:+.1%})")
    path = write_results("embed_throughput", {
        "raw_forward": raw, "embed_cold": cold, "ratio_embed_to_raw": ratio,
        "warm_rerun": {"images": warm["images"], "seconds": warm_seconds, "computed": warm["computed"]},
        "peak_rss_mib": {"1000": small["peak_rss_mib"], "4000": large["peak_rss_mib"], "growth": growth},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
