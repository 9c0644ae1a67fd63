"""Scoring at the machine's limit: decode, preprocessing and the model run at once.

Work is cut into buckets: runs of consecutive patients (or slides) holding at least a few
hundred patches. Stain statistics, the neighbourhood and the spatial context all stay
within a patient, so a bucket is scored completely on its own, and the same buckets are
scored the same way however the work is shared out (one process, or many under
torchrun). Each bucket's files are decoded on every core (threads: libpng releases the
GIL), prepared (stain, neighbourhood) in one more thread, and forwarded in the calling
thread; every stage runs a few buckets ahead of the next, so the cores never wait for one
another, and only those few buckets are ever in memory.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..data.decode import PATCH_SIZE, decode_into, default_workers
from ..spatial.grid import group_order

BUCKET = 512  # patches: a bucket is whole patients, at least this many patches
CHUNK = 256  # files decoded per task


@dataclass(frozen=True)
class Bucket:
    """Whole patients of a table, scored together; ``index`` orders the buckets."""

    index: int
    rows: np.ndarray  # table rows, patient by patient, in table order within a patient


def make_buckets(groups: np.ndarray, size: int | None = None) -> list[Bucket]:
    """Consecutive patients (in order of first appearance) cut into buckets of at least
    ``size`` patches (default ``BUCKET``); a patient is never split."""
    size = BUCKET if size is None else size
    order, bounds = group_order(np.asarray(groups))
    buckets, start, ends = [], 0, np.append(bounds, len(order))
    for end in ends:
        if end - start >= size or (end == len(order) and end > start):
            buckets.append(Bucket(len(buckets), order[start:end]))
            start = end
    return buckets


class FileSource:
    """Patches decoded from files (one path per table row); counts the padded ones."""

    def __init__(self, paths):
        self.paths = np.asarray(paths, dtype=object)
        self.n_padded = 0
        self._lock = threading.Lock()

    def load(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(patches (n, 50, 50, 3), ok, reasons)`` of ``rows``."""
        out = np.empty((len(rows), PATCH_SIZE, PATCH_SIZE, 3), np.uint8)
        ok, hows, reasons = decode_into(list(self.paths[rows]), out)
        with self._lock:
            self.n_padded += hows.count("padded")
        return out, ok, reasons


class ArraySource:
    """Patches already decoded: uint8 (N, H, W, 3), one per table row."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def load(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        patches = np.asarray(self.images[rows])
        return patches, np.ones(len(rows), dtype=bool), [""] * len(rows)


@dataclass
class Loaded:
    """A bucket's patches: those that decoded (``ok``), and why the others did not."""

    bucket: Bucket
    patches: np.ndarray  # the ok rows' patches
    ok: np.ndarray  # per bucket row
    reasons: list[str]  # per bucket row, "" where ok
    prepared: object = None  # what ``prepare`` made of the patches


def run_pipeline(
    buckets: list[Bucket],
    source,
    prepare: Callable[[Loaded], object],
    workers: int | None = None,
    ahead: int = 3,
) -> Iterator[Loaded]:
    """Yield each bucket, loaded and prepared, in order, while the next ones are decoded
    (``workers`` threads) and prepared (one thread) in the background.

    numpy's BLAS is held to one thread meanwhile: its idle workers spin for a while after
    every small product of the stain normalisation, and on 2 cores that spinning took a
    quarter of the machine from the model (2,000 patches/s end to end instead of 2,700).
    """
    from threadpoolctl import threadpool_limits

    workers = workers or default_workers()
    with (
        threadpool_limits(limits=1, user_api="blas"),
        ThreadPoolExecutor(workers) as decoders,
        ThreadPoolExecutor(1) as preparer,
    ):
        pending: deque[Future] = deque()
        queue = iter(buckets)

        def submit() -> None:
            bucket = next(queue, None)
            if bucket is None:
                return
            parts = [
                decoders.submit(source.load, bucket.rows[s : s + CHUNK])
                for s in range(0, len(bucket.rows), CHUNK)
            ]
            pending.append(preparer.submit(_assemble, bucket, parts, prepare))

        for _ in range(ahead + workers):
            submit()
        while pending:
            loaded = pending.popleft().result()
            submit()
            yield loaded


def _assemble(bucket: Bucket, parts: list[Future], prepare) -> Loaded:
    loads = [p.result() for p in parts]
    ok = np.concatenate([o for _, o, _ in loads]) if loads else np.zeros(0, bool)
    patches = [p[o] for p, o, _ in loads]
    empty = np.zeros((0, PATCH_SIZE, PATCH_SIZE, 3), np.uint8)
    reasons = [r for *_, part in loads for r in part]
    loaded = Loaded(bucket, np.concatenate(patches) if patches else empty, ok, reasons)
    loaded.prepared = prepare(loaded)
    return loaded
