"""Helpers shared by the benchmark scripts: the sample, threads, timing, markdown tables."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from idcscope.cpus import usable_cpus

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("IDC_SAMPLE", REPO.parent / "shared" / "data" / "idc-sample"))
CORES = usable_cpus()


def setup_torch(threads: int | None = None) -> int:
    """Set torch's intra-op threads (default: every core) and return the number used."""
    import torch

    threads = threads or CORES
    torch.set_num_threads(threads)
    return threads


def sample_index(n: int, seed: int = 0, square_only: bool = True):
    """The real sample's manifest and a seeded subset of ``n`` of its rows, in sorted order.

    ``square_only`` keeps 50x50 patches: the naive baseline's default collate cannot stack
    the smaller edge patches, and every variant must see the same files.
    """
    from idcscope.data.manifest import index_dataset

    if not SAMPLE.is_dir():
        raise SystemExit(f"real sample not found at {SAMPLE}; set IDC_SAMPLE")
    index = index_dataset(SAMPLE)
    table = index.table
    pool = np.flatnonzero((table["width"] == 50) & (table["height"] == 50)) if square_only else None
    pool = np.arange(len(table)) if pool is None else pool
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False))
    return index, rows


def decoded_sample(n: int, cache_dir: Path, seed: int = 0):
    """``(uint8 model input (n, 3, 50, 50), read through the memory-mapped decode cache,
    labels, paths)``."""
    from idcscope.data.cache import load_or_build
    from idcscope.data.preprocess import Planes

    index, rows = sample_index(n, seed)
    table = index.table.iloc[rows].reset_index(drop=True)
    decoded = load_or_build(index.root, table, cache_dir)
    if not decoded.ok.all():
        raise SystemExit(f"{(~decoded.ok).sum()} sample patches failed to decode")
    paths = [str(index.root / p) for p in table["path"]]
    return Planes(decoded.images), table["label"].to_numpy(), paths


def rate(fn: Callable[[], int], min_seconds: float = 0.0) -> tuple[float, float]:
    """Run ``fn`` (which returns how many items it did) until ``min_seconds`` have passed.

    Returns ``(items per second, seconds)``.
    """
    done, start = 0, time.perf_counter()
    while True:
        done += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed, elapsed


def best_of(repeat: int, fn: Callable[[], float]) -> float:
    """The highest of ``repeat`` rates: other processes only ever make a run slower."""
    return max(fn() for _ in range(max(repeat, 1)))


def machine() -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.processor() or platform.machine()}, {CORES} cores available, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {load:.1f}"
    )


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table of ``rows``; floats get thousands separators and sensible digits."""
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "n/a"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"
    return f"{v:,}" if isinstance(v, int) else str(v)
