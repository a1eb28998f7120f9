"""Batch embedding jobs: a dataset into a named feature set of the store, resumable and streaming."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

from extractor.datasets import Dataset, ImageBatch
from extractor.embedder import Embedder

log = logging.getLogger(__name__)


@dataclass
class EmbedSummary:
    feature_set: str
    data_spec: str
    backbone: str
    fingerprint: str
    images: int = 0
    computed: int = 0
    reused: int = 0
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "images_per_second": round(self.images_per_second, 1)}

    def lines(self) -> list[str]:
        return [
            f"feature set   {self.feature_set}  ({self.data_spec}, {self.backbone} {self.fingerprint[:12]})",
            f"images        {self.images}  computed {self.computed}, reused {self.reused}, "
            f"skipped as unreadable {len(self.skipped)}",
            f"time          {self.seconds:.2f} s  ({self.images_per_second:.0f} images/s)",
            *(f"  skipped {s['source']}: {s['reason']}" for s in self.skipped[:20]),
            *([f"  ... and {len(self.skipped) - 20} more"] if len(self.skipped) > 20 else []),
        ]


def prefetched(batches: Iterator[ImageBatch], depth: int = 2) -> Iterator[ImageBatch]:
    """Read and decode the next batches in a thread while the caller computes on the current one."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    try:
                        slots.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            slots.put(exc)

    reader = threading.Thread(target=produce, name="batch-reader", daemon=True)
    reader.start()
    try:
        while (item := slots.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join(timeout=5)


def run_embed_job(dataset: Dataset, embedder: Embedder, feature_set: str, *, batch_size: int = 256,
                  limit: int | None = None, progress: bool = False) -> EmbedSummary:
    """Embed `dataset` (its first `limit` images) into feature set `feature_set` of the embedder's store.

    Each batch's new vectors and its items land in one transaction; a rerun after a kill recomputes
    only what is missing. Unreadable images are skipped and listed in the summary and the feature set.
    Each item's source (see `Dataset.source`) is kept with it, so exports join back to the files.
    Image files unchanged (same size and mtime) since the store last read them are not decoded again:
    their remembered pixel digests give their keys.
    """
    store, spec = embedder.store, embedder.spec
    total = len(dataset) if limit is None else min(limit, len(dataset))
    summary = EmbedSummary(feature_set, dataset.spec, spec.name, embedder.fingerprint)
    store.begin_feature_set(feature_set, fingerprint=embedder.fingerprint, backbone=spec.describe(),
                            data_spec=dataset.spec, class_names=dataset.class_names, source_root=dataset.root)
    started = time.perf_counter()
    skipped_before = len(dataset.skipped)
    bar = _progress_bar(total, f"embed {feature_set}", progress)
    try:
        for batch in prefetched(dataset.batches(batch_size, limit, known_digests=store.known_file_digests)):
            resolved = embedder.resolve_digests(batch.digests, batch.pixels)
            store.append_batch(feature_set, summary.images, resolved.keys, batch.labels,
                               resolved.new_keys, resolved.new_vectors, batch.file_digests,
                               sources=[dataset.source(i) for i in batch.indices])
            summary.images += len(batch.images)
            summary.computed += len(resolved.new_keys)
            summary.reused += len(batch.images) - len(resolved.new_keys)
            if bar is not None:
                skipped = len(dataset.skipped) - skipped_before
                bar.update(summary.images + skipped - bar.n)
                bar.set_postfix(computed=summary.computed, reused=summary.reused, skipped=skipped)
    finally:
        if bar is not None:
            bar.close()
    summary.skipped = [asdict(s) for s in dataset.skipped[skipped_before:]]
    store.finish_feature_set(feature_set, summary.images, summary.skipped)
    summary.seconds = time.perf_counter() - started
    log.info("feature set %s: %d images (%d computed, %d reused, %d skipped) in %.1f s", feature_set,
             summary.images, summary.computed, summary.reused, len(summary.skipped), summary.seconds)
    return summary


def _progress_bar(total: int, description: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    # leave=False: the job's summary replaces the bar, and a run of many jobs does not stack bars
    return tqdm(total=total, desc=description, unit="img", dynamic_ncols=True, smoothing=0.1, leave=False)
