"""Ray engine against the local engine: `embed` of CIFAR-10 test images with VGG16 32x32, in one run.

Each repeat runs both engines as a user would, `python -m extractor embed ... --json` in a fresh
process with a fresh store (so every vector is computed), alternating so that noise from other work
on the machine falls on both. Reported: medians of the whole command's wall time and of the job's
own time (the summary's seconds: for Ray that includes starting Ray, the actors and the import).

    python benchmarks/ray_embed.py [--images 2000] [--repeats 3] [--num-workers 2] [--shard-size 250]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ray_embed.json"

log = logging.getLogger("ray_embed")


def run_embed(engine: str, work: Path, args: argparse.Namespace) -> dict:
    """One `embed` command in a fresh process; its summary plus the command's wall time."""
    command = [sys.executable, "-m", "extractor", "embed", "--backbone", "vgg16", "--data", "cifar10:test",
               "--limit", str(args.images), "--feature-set", "bench", "--store", str(work / "store.sqlite"),
               "--json", "--no-progress"]
    if engine == "ray":
        command += ["--engine", "ray", "--num-workers", str(args.num_workers), "--shard-size", str(args.shard_size),
                    "--shards-dir", str(work / "shards")]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{engine} run failed:\n{done.stderr[-4000:]}")
    summary = json.loads(done.stdout)
    log.info("%-5s %d images: command %.1f s, job %.1f s", engine, summary["images"], wall, summary["seconds"])
    return {"command_s": round(wall, 2), "job_s": round(summary["seconds"], 2), "images": summary["images"],
            "computed": summary["computed"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=250)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if importlib.util.find_spec("ray") is None:
        print("ray_embed: skipped, Ray is not installed (make setup-ray)")
        return 0
    import ray

    runs = {"local": [], "ray": []}
    for repeat in range(args.repeats):
        for engine in ("local", "ray"):
            with tempfile.TemporaryDirectory(prefix=f"bench-{engine}-") as work:
                runs[engine].append(run_embed(engine, Path(work), args))
    medians = {engine: {measure: statistics.median(r[measure] for r in results)
                        for measure in ("command_s", "job_s")} for engine, results in runs.items()}
    images = runs["local"][0]["images"]
    ratio = {measure: round(medians["local"][measure] / medians["ray"][measure], 3)
             for measure in ("command_s", "job_s")}
    result = {
        "benchmark": "embed cifar10:test, vgg16 32x32 (lecture recipe), local engine vs --engine ray",
        "images": images, "repeats": args.repeats, "num_workers": args.num_workers, "shard_size": args.shard_size,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "ray": ray.__version__},
        "runs": runs, "medians": medians,
        "images_per_second": {engine: round(images / m["job_s"], 1) for engine, m in medians.items()},
        "ray_speed_vs_local": ratio,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for engine, m in medians.items():
        print(f"{engine:<6} median command {m['command_s']:.1f} s, job {m['job_s']:.1f} s "
              f"({result['images_per_second'][engine]:.0f} images/s)")
    print(f"ray / local speed: {ratio['job_s']:.2f}x by job time, {ratio['command_s']:.2f}x by command time "
          f"({images} images, {args.num_workers} workers, {os.cpu_count()} CPUs)")
    print(RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
