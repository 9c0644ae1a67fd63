"""One thread per core, each taking the most urgent task first.

Scoring has three kinds of work: decoding files, preparing a bucket (stain, neighbourhood)
and running the model on a batch. Given to separate thread pools they oversubscribe the
cores: the model's threads are preempted in the middle of a batch, and on 2 cores that
costs a quarter of their speed. Here the same few threads do all three, the model's
batches first, then preparation, then decoding, earlier buckets before later ones, so a
core never switches away from a batch half done, and decoding fills every gap. No task
ever waits for another inside a thread: a stage is queued when the one before it is
done (see ``stream``).
"""

from __future__ import annotations

import functools
import itertools
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

from ..cpus import usable_cpus

FORWARD, PREPARE, DECODE = 0, 1, 2  # task kinds, most urgent first


class Workers:
    """A fixed set of daemon threads draining one priority queue."""

    def __init__(self, n: int):
        self.n = max(1, n)
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # equal priorities run in the order queued
        self._threads = [
            threading.Thread(target=self._work, name=f"idcscope-worker-{i}", daemon=True)
            for i in range(self.n)
        ]
        for t in self._threads:
            t.start()

    def submit(self, priority: tuple, fn: Callable, *args) -> Future:
        """Queue ``fn(*args)``; the smallest ``priority`` (a tuple) runs first."""
        future: Future = Future()
        self._queue.put((priority, next(self._order), future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            _, _, future, fn, args = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to whoever waits for the result
                future.set_exception(e)


def workers(n: int | None = None) -> Workers:
    """The process's workers: ``n`` threads (default: one per core this process may use)."""
    return _pool(n or usable_cpus())


@functools.cache
def _pool(n: int) -> Workers:
    return Workers(n)


# A forked child has none of its parent's threads: it starts pools of its own.
os.register_at_fork(after_in_child=_pool.cache_clear)
