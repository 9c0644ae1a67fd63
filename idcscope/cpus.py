"""How many cores this process may use, on every platform."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """Cores this process may run on: its CPU affinity where the OS keeps one (Linux), else
    ``os.process_cpu_count`` (Python 3.13+) or ``os.cpu_count``; at least 1.

    ``os.sched_getaffinity`` exists on Linux alone: macOS and Windows fall through.
    """
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    count = getattr(os, "process_cpu_count", os.cpu_count)()
    return max(1, count or 1)
