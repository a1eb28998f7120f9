"""`make run`'s job, timed whole: one cold run in a fresh cache, then two warm ones, with each run's phases.

Each run is `python -m classifiers run` in its own process (as `make run` starts it, installation apart),
against a temporary cache and store that the cold run fills; the phase seconds come from the report
each run writes. Results in benchmarks/results/make_run.json, with the targets: cold <= 300 s, warm <= 45 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_results  # noqa: E402

TARGETS = {"cold_seconds": 300, "warm_seconds": 45}


def timed_run(cache: Path, runs: Path, extra: list[str]) -> dict:
    """One `classifiers run` in its own process: wall seconds, and the phases its report records."""
    env = {**os.environ, "EXTRACTOR_CACHE_DIR": str(cache)}
    env.pop("EXTRACTOR_STORE", None)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "classifiers", "--runs-dir", str(runs), "run", *extra], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    report = json.loads((runs / "latest" / "report.json").read_text())
    return {"wall_seconds": round(wall, 1), "total_seconds": report["total_seconds"],
            "phase_seconds": report["phase_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm-runs", type=int, default=2, help="warm runs after the cold one (default 2)")
    parser.add_argument("--experiments", help="comma-separated experiments (default: all three)")
    args = parser.parse_args()
    extra = ["--experiments", args.experiments] if args.experiments else []
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        cache, reports = Path(tmp) / "cache", Path(tmp) / "runs"
        for kind in ["cold"] + ["warm"] * args.warm_runs:
            run = {"kind": kind, **timed_run(cache, reports, extra)}
            runs.append(run)
            phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in run["phase_seconds"].items())
            target = TARGETS[f"{kind}_seconds"]
            print(f"{kind:5s} {run['wall_seconds']:7.1f} s wall ({phases}); target <= {target} s: "
                  f"{'met' if run['wall_seconds'] <= target else 'missed'}", flush=True)
    path = write_results("make_run", {"targets": TARGETS, "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
