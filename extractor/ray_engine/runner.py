"""Runner: the embed job on Ray Data: plan shards, skip finished ones, read -> embed -> write, then import."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from extractor import paths
from extractor.models import BackboneSpec
from extractor.datasets import Dataset
from extractor.errors import InvalidInputError, MissingDependencyError
from extractor.jobs import EmbedSummary
from extractor.ray_engine.mapper import ShardEmbedder
from extractor.ray_engine.reader import read_shards
from extractor.ray_engine.writer import write_shards
from extractor.shards import MANIFEST_NAME, Manifest, ShardRecord, import_shards, resume_manifest
from extractor.store import EmbeddingStore

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'frozen-features[ray]' (or `make setup-ray` in a checkout)"
# A shard whose map task raised (a flaky shared disk, say) runs again this many times.
MAP_RETRIES = 2
# A shard whose actor died (killed for memory, a lost node) runs again on a new actor this many
# times; Ray Data's default is forever, which would loop on a shard that kills every actor.
ACTOR_TASK_RETRIES = 3
# Actors that die while building the backbone, in a row, before the job gives up.
ACTOR_INIT_DEATHS = 3


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the job runs."""

    address: str | None = None  # None: start Ray in this process
    num_workers: int = 2        # backbone actors, one CPU each
    shard_size: int = 1024      # dataset items per Parquet shard: the unit of work, retry and resume

    def check(self) -> None:
        if self.num_workers < 1:
            raise InvalidInputError(f"--num-workers must be at least 1, got {self.num_workers}")
        if self.shard_size < 1:
            raise InvalidInputError(f"--shard-size must be at least 1, got {self.shard_size}")


def import_ray():
    """The `ray` module, or an error that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the `data` extra)
    except ImportError as exc:
        raise MissingDependencyError(f"the Ray engine needs Ray Data, which is not installed ({exc}): "
                                     f"{INSTALL_HINT}") from None
    return ray


@contextmanager
def ray_session(options: RayOptions) -> Iterator[None]:
    """Join the cluster at `options.address`, or start Ray in this process; leave a session the caller opened."""
    ray = import_ray()
    if ray.is_initialized():
        yield
        return
    # Workers run the driver's copy of the package, whatever is installed on the nodes.
    runtime_env = {"py_modules": [str(Path(__file__).resolve().parents[1])]}
    if options.address:
        ray.init(address=options.address, runtime_env=runtime_env, logging_level=logging.WARNING)
    else:
        # One CPU per actor plus one for the reader and writer tasks, even on a smaller machine:
        # otherwise the actors hold every CPU and no shard is ever read.
        ray.init(num_cpus=max(os.cpu_count() or 1, options.num_workers + 1), runtime_env=runtime_env,
                 include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


def run_ray_embed_job(dataset: Dataset, spec: BackboneSpec, store: EmbeddingStore, feature_set: str,
                      shards_dir: str | os.PathLike, options: RayOptions = RayOptions(), *, batch_size: int = 256,
                      limit: int | None = None, data_dir: str | os.PathLike | None = None, progress: bool = False,
                      mapper: type = ShardEmbedder) -> EmbedSummary:
    """Embed `dataset` (its first `limit` items) on Ray into Parquet shards in `shards_dir`, then import them.

    Ends with the same feature set, in the same order, that `run_embed_job` writes. Shards an earlier
    run finished (listed in the manifest, sha256 intact) are not redone. `mapper` is the actor class.
    """
    options.check()
    import_ray()
    total = len(dataset) if limit is None else min(limit, len(dataset))
    shards_dir = Path(shards_dir)
    shards_dir.mkdir(parents=True, exist_ok=True)
    manifest = resume_manifest(shards_dir, Manifest(
        feature_set, dataset.spec, spec.fingerprint, spec.describe(), dataset.class_names, total, options.shard_size,
        source_root=dataset.root))
    done = {(s.start, s.stop) for s in manifest.shards}
    pending = [r for r in manifest.ranges() if r not in done]
    summary = EmbedSummary(feature_set, dataset.spec, spec.name, spec.fingerprint, reused=manifest.rows)
    log.info("%d of %d shards of %s to embed on Ray (%d finished earlier)", len(pending), len(manifest.ranges()),
             feature_set, len(done))
    started = time.perf_counter()
    if pending:
        with ray_session(options):
            for record in _embed_shards(pending, manifest, spec, shards_dir, options, batch_size,
                                        str(paths.data_dir(data_dir).absolute()), progress, mapper):
                manifest.add(record)
                manifest.save(shards_dir / MANIFEST_NAME)
                summary.computed += record.rows
    manifest.save(shards_dir / MANIFEST_NAME)
    imported = import_shards(store, [shards_dir / MANIFEST_NAME], feature_set)
    summary.images, summary.skipped = imported.rows, imported.skipped
    summary.seconds = time.perf_counter() - started
    log.info("feature set %s: %d images (%d embedded now, %d from earlier shards, %d skipped) in %.1f s",
             feature_set, summary.images, summary.computed, summary.reused, len(summary.skipped), summary.seconds)
    return summary


def _embed_shards(pending: list[tuple[int, int]], manifest: Manifest, spec: BackboneSpec, shards_dir: Path,
                  options: RayOptions, batch_size: int, data_dir: str, progress: bool,
                  mapper: type) -> Iterator[ShardRecord]:
    """The Ray Data pipeline over the pending item ranges; yields each shard's record as it is written."""
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = progress
    context.retried_map_errors = True
    context.max_map_retries = MAP_RETRIES
    context.max_consecutive_actor_init_deaths = ACTOR_INIT_DEATHS
    # One row per shard, one block per row, so shards spread over the actors from the start.
    plan = ray.data.from_items([{"start": start, "stop": stop} for start, stop in pending],
                               override_num_blocks=len(pending))
    packed = plan.map_batches(read_shards, batch_size=1, batch_format="pyarrow",
                              fn_kwargs={"data_spec": manifest.data_spec, "data_dir": data_dir})
    with warnings.catch_warnings():
        # Ray 2.60 takes the actor retry limits only as `ray_remote_args`, deprecated for 2.64
        # (hence the extra's `<2.64`); the named options that replace them are not there yet.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        embedded = packed.map_batches(mapper, batch_size=1, batch_format="pyarrow",
                                      compute=ray.data.ActorPoolStrategy(size=options.num_workers),
                                      fn_constructor_kwargs={"spec": spec, "batch_size": batch_size},
                                      max_restarts=-1, max_task_retries=ACTOR_TASK_RETRIES)
    written = embedded.map_batches(write_shards, batch_size=1, batch_format="pyarrow",
                                   fn_kwargs={"directory": str(shards_dir.resolve()),
                                              "shard_size": options.shard_size, "metadata": manifest.metadata})
    for row in written.iter_rows():
        yield ShardRecord(row["file"], row["start"], row["stop"], row["rows"], row["sha256"],
                          json.loads(row["skipped"]))
