"""Streaming a data set through a compiled model: batches read (images decoded on a thread pool) while the model
runs on the previous one, grouped into the shards of :mod:`.shards`.

The work is a list of *units*, one batch each: ``(shard, start, stop)``, a shard's batches never crossing into the
next shard, so a shard's results do not depend on what ran before it (resume gives the same bytes).  The local
engine (:func:`local_units`) runs them in this process; the Ray engine (:mod:`.ray_engine`) on a cluster; both
yield :class:`UnitResult` in unit order, and :func:`shard_results` groups them into shards.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from .batches import explain_batch
from .shards import ShardResult
from .sources import InputSpec, Loaded, Source

__all__ = ["DECODE_THREADS", "UnitResult", "default_batch_size", "default_shard_size", "explain_loaded",
           "local_units", "plan_units", "read_ahead", "shard_results"]

#: Input bytes per batch that the default batch size aims at (16 MiB: ResNet50 at 224x224 gets 16, MNIST 256).
BATCH_INPUT_BYTES = 16 * 2**20
MAX_DEFAULT_BATCH = 256
#: Relevance bytes per shard that the default shard size aims at, and the most samples a shard holds by default.
SHARD_BYTES = 32 * 2**20
MAX_DEFAULT_SHARD = 4096
#: Threads decoding images while the model runs.
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
#: Batches read ahead of the one the model runs on.
PREFETCH = 2


def default_batch_size(dims) -> int:
    """The largest power of two whose batch holds at most :data:`BATCH_INPUT_BYTES` of float32 input (1..256)."""
    per_sample = 4 * int(np.prod(dims))
    fits = max(1, BATCH_INPUT_BYTES // max(per_sample, 1))
    return int(min(MAX_DEFAULT_BATCH, 2 ** int(np.log2(fits))))


def default_shard_size(dims, batch_size: int) -> int:
    """A multiple of the batch size holding about :data:`SHARD_BYTES` of relevance (at most 4096 samples)."""
    per_sample = 4 * int(np.prod(dims))
    samples = min(MAX_DEFAULT_SHARD, max(1, SHARD_BYTES // max(per_sample, 1)))
    return max(batch_size, samples // batch_size * batch_size)


def plan_units(shards: Iterable[int], bounds, batch_size: int) -> list[tuple[int, int, int]]:
    """``(shard, start, stop)`` for every batch of the given shards, in order."""
    units = []
    for k in shards:
        a, b = bounds(k)
        units.extend((k, s, min(s + batch_size, b)) for s in range(a, b, batch_size))
    return units


@dataclass
class UnitResult:
    """One unit's explained samples (ids, relevance, classes, scores), its unreadable inputs and, for heatmaps,
    the raw images."""

    shard: int
    start: int
    stop: int
    ids: np.ndarray
    relevance: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    errors: list[tuple[int, str]] = field(default_factory=list)
    raw: np.ndarray | None = None
    finished: float = 0.0  # time.time() when it was explained (on the actor's machine with Ray)


def explain_loaded(explainer, prepared, spec: InputSpec, unit: tuple[int, int, int], loaded: Loaded,
                   target: int | None, keep_raw: bool) -> UnitResult:
    """Explain what a unit's read gave (nothing to run when every input failed)."""
    shard, start, stop = unit
    if len(loaded.ids):
        out = explain_batch(explainer, prepared, spec.to_model(loaded.raw), target, name=prepared.shown,
                            samples=[f"sample {i}" for i in loaded.ids],
                            ending="the finished shards are kept")
        relevance, classes, scores = out.relevance, out.classes, out.scores
    else:
        relevance = np.zeros((0, *spec.dims), np.float32)
        classes, scores = np.zeros(0, np.int64), np.zeros(0, np.float64)
    return UnitResult(shard, start, stop, loaded.ids, relevance, classes, scores, list(loaded.errors),
                      loaded.raw if keep_raw and loaded.images else None, time.time())


def read_ahead(source: Source, units) -> Iterator[tuple[tuple[int, int, int], Loaded]]:
    """Yield ``(unit, what source.read gave)`` in order, read by a thread (decoding images on
    :data:`DECODE_THREADS` threads) up to :data:`PREFETCH` units ahead of the consumer."""
    ready: queue.Queue = queue.Queue(maxsize=PREFETCH)
    stop = threading.Event()
    pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="onnxlrp-decode")

    def hand_over(item) -> None:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def read() -> None:
        try:
            for unit in units:
                if stop.is_set():
                    return
                hand_over((unit, source.read(unit[1], unit[2], pool), None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which raises it
            hand_over((None, None, err))

    reader = threading.Thread(target=read, name="onnxlrp-read", daemon=True)
    reader.start()
    try:
        for _ in units:
            unit, loaded, err = ready.get()
            if err is not None:
                raise err
            yield unit, loaded
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)


def local_units(source: Source, spec: InputSpec, prepared, explainer, units, *, target: int | None,
                keep_raw: bool) -> Iterator[UnitResult]:
    """Run the units in this process, reading ahead (:func:`read_ahead`) while onnxruntime runs."""
    for unit, loaded in read_ahead(source, units):
        yield explain_loaded(explainer, prepared, spec, unit, loaded, target, keep_raw)


def shard_results(results: Iterable[UnitResult], bounds) -> Iterator[tuple[ShardResult | None, UnitResult]]:
    """Pass every unit result on, together with its shard's :class:`ShardResult` once the shard's last unit is in
    (None before)."""
    parts: list[UnitResult] = []
    for unit in results:
        parts.append(unit)
        if unit.stop < bounds(unit.shard)[1]:
            yield None, unit
            continue
        raw = [p.raw for p in parts]
        yield ShardResult(
            unit.shard,
            np.concatenate([p.ids for p in parts]),
            np.concatenate([p.relevance for p in parts]),
            np.concatenate([p.classes for p in parts]),
            np.concatenate([p.scores for p in parts]),
            [e for p in parts for e in p.errors],
            np.concatenate(raw) if all(r is not None for r in raw) else None,
        ), unit
        parts = []
