"""Scoring at the machine's limit: decode, preprocessing and the model run at once.

Work is cut into buckets: runs of consecutive patients (or slides) holding at least a few
hundred patches. Stain statistics, the neighbourhood and the spatial context all stay
within a patient, so a bucket is scored completely on its own, and the same buckets are
scored the same way however the work is shared out (one process, or many under
torchrun). The process's worker threads (``workers``: one per core; libpng and ONNX
Runtime release the GIL) decode each bucket's files, prepare it (stain, neighbourhood)
and run the model on its batches, the earliest bucket's most advanced stage first, a few
buckets ahead of the one being written: the cores are never idle nor oversubscribed,
and only those few buckets are ever in memory.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

import numpy as np

from ..data import PATCH_SIZE
from ..data.decode import decode_into
from ..data.grid import group_order
from .workers import DECODE, PREPARE, Workers

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
    launched: object = None  # what ``launch`` returned: handles of its forward passes


def run_pipeline(
    buckets: list[Bucket],
    source,
    prepare: Callable[[Loaded], object],
    launch: Callable[[Loaded], object],
    pool: Workers,
    ahead: int = 3,
) -> Iterator[Loaded]:
    """Yield each bucket, decoded, prepared and launched, in order, while the next
    ``ahead`` are decoded and prepared by the same worker threads.

    A bucket's files are decoded in chunks; when the last chunk is in, its preparation is
    queued; when that is done, ``launch`` starts its forward passes (queuing them on the
    pool too) and returns the calls that wait for them. Every stage is queued only once
    the one before it is done, so no worker ever waits for another.

    When the caller stops early (an error, a closed generator, Ctrl-C), the buckets ahead
    start no further stage and the ones already launched are waited for: no worker is
    left inside ONNX Runtime when the interpreter exits (which aborts the process).

    numpy's BLAS is held to one thread meanwhile: its idle workers spin for a while after
    every small product of the stain normalisation, and on 2 cores that spinning took a
    quarter of the machine from the model (2,000 patches/s end to end instead of 2,700).
    And Python's cyclic garbage collector only sweeps the objects made since the last
    bucket: its full sweeps walk every object of torch, ONNX and the rest (half a million)
    and cost 10% of the run.
    """
    from threadpoolctl import threadpool_limits

    queue = iter(buckets)
    pending: deque[Future] = deque()
    stop = threading.Event()

    def submit() -> None:
        bucket = next(queue, None)
        if bucket is not None:
            pending.append(_start(bucket, source, prepare, launch, pool, stop))

    try:
        with threadpool_limits(limits=1, user_api="blas"), young_garbage_only():
            for _ in range(1 + ahead):
                submit()
            while pending:
                loaded = pending.popleft().result()
                submit()
                gc.collect(1)  # what this bucket left behind; the old objects are not walked
                yield loaded
    finally:
        stop.set()
        _settle(pending)


def _settle(pending: deque[Future]) -> None:
    """Wait for the buckets in flight (their stages stopped, see ``_start``), and for the
    forward passes of those already launched."""
    for future in pending:
        try:
            loaded = future.result()
        except BaseException:  # stopped, or failed: nothing of it runs any more
            continue
        for wait in loaded.launched or ():
            with contextlib.suppress(Exception):
                wait()


@contextlib.contextmanager
def young_garbage_only():
    """The cyclic collector off (its full sweeps walk every object of torch, ONNX and the
    rest: half a million); the caller sweeps the young generations by hand."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class Stopped(Exception):
    """A bucket's stages were not run: the caller stopped before it."""


def _start(bucket: Bucket, source, prepare, launch, pool: Workers, stop: threading.Event) -> Future:
    """Queue a bucket's decoding; the future is done once it is prepared and launched
    (or failed, or ``Stopped`` once ``stop`` is set)."""
    done: Future = Future()
    chunks = [bucket.rows[s : s + CHUNK] for s in range(0, len(bucket.rows), CHUNK)]
    parts: list = [None] * len(chunks)
    left = [len(chunks)]
    lock = threading.Lock()

    def load(rows: np.ndarray):
        if stop.is_set():
            raise Stopped
        return source.load(rows)

    def finish() -> None:
        try:
            if stop.is_set():
                raise Stopped
            loaded = _assemble(bucket, parts)
            loaded.prepared = prepare(loaded)
            loaded.launched = launch(loaded)
            done.set_result(loaded)
        except BaseException as e:  # raised where the bucket is awaited
            _fail(done, e)

    def decoded(i: int, future: Future) -> None:
        try:
            parts[i] = future.result()
        except BaseException as e:
            _fail(done, e)
            return
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            pool.submit((PREPARE, bucket.index), finish)

    if not chunks:
        pool.submit((PREPARE, bucket.index), finish)
    for i, rows in enumerate(chunks):
        future = pool.submit((DECODE, bucket.index), load, rows)
        future.add_done_callback(functools.partial(decoded, i))
    return done


def _fail(done: Future, error: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):  # another chunk failed first
        done.set_exception(error)


def _assemble(bucket: Bucket, loads: list) -> Loaded:
    ok = np.concatenate([o for _, o, _ in loads]) if loads else np.zeros(0, bool)
    patches = [p[o] for p, o, _ in loads]
    empty = np.zeros((0, PATCH_SIZE, PATCH_SIZE, 3), np.uint8)
    reasons = [r for *_, part in loads for r in part]
    return Loaded(bucket, np.concatenate(patches) if patches else empty, ok, reasons)
