"""Ingest at full scale: index, decode and pack 277,524 PNG patches into the uint8 cache.

The first run writes a Kaggle-layout tree of N patches under ``--root`` (default
/tmp/idc-ingest): the real sample's PNG files, byte for byte, under new names, spread over
279 patients whose sizes and IDC fractions vary as in the real data. Later runs reuse it.
The decode cache goes to ``<root>-cache``; bench_memory.py trains on it.

Timed side by side: indexing alone, ``load_patch_data`` rebuilding the cache with every
core and with one worker, and ``load_patch_data`` on a cache hit. The files sit in the page
cache after generation, so disk reads are not part of the numbers.
Usage: ``python benchmarks/bench_ingest.py [--quick] [--n 277524] [--root DIR]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
from _common import CORES, SAMPLE, table

KAGGLE_N, KAGGLE_PATIENTS = 277_524, 279


def patient_sizes(n: int, patients: int, rng: np.random.Generator) -> np.ndarray:
    """Patch counts per patient that sum to n and vary several-fold, as in the real data."""
    w = rng.lognormal(0.0, 0.6, patients)
    counts = np.floor(w / w.sum() * n).astype(int)
    counts[: n - counts.sum()] += 1
    return counts


def generate(root: Path, n: int, patients: int, seed: int = 0) -> float:
    """Write the tree unless ``root`` already holds one of the same size; returns seconds."""
    marker = root / ".bench-ingest.json"
    spec = {"n": n, "patients": patients, "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return 0.0
    start = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    sources = {c: [p.read_bytes() for p in sorted(SAMPLE.glob(f"*/{c}/*.png"))] for c in (0, 1)}
    if not sources[0] or not sources[1]:
        raise SystemExit(f"real sample not found at {SAMPLE}; set IDC_SAMPLE")
    rng = np.random.default_rng(seed)
    cursor = {0: 0, 1: 0}
    for i, count in enumerate(patient_sizes(n, patients, rng)):
        pid = str(10_000 + i)
        n_pos = round(count * rng.beta(2, 5))  # about 28% IDC overall, as in Kaggle
        for label in (0, 1):
            (root / pid / str(label)).mkdir(parents=True, exist_ok=True)
        for j in range(count):
            label = int(j < n_pos)
            data = sources[label][cursor[label] % len(sources[label])]
            cursor[label] += 1
            x, y = 50 * (j % 64) + 1, 50 * (j // 64) + 1
            (root / pid / str(label) / f"{pid}_idx5_x{x}_y{y}_class{label}.png").write_bytes(data)
    marker.write_text(json.dumps(spec))
    return time.perf_counter() - start


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10,000 patches of 10 patients")
    ap.add_argument("--n", type=int, default=KAGGLE_N, help="patches to generate")
    ap.add_argument("--patients", type=int, default=KAGGLE_PATIENTS)
    ap.add_argument("--root", type=Path, default=None, help="default /tmp/idc-ingest[-quick]")
    ap.add_argument("--no-serial", action="store_true", help="skip the one-worker rebuild")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n, patients = (10_000, 10) if args.quick else (args.n, args.patients)
    root = args.root or Path("/tmp/idc-ingest-quick" if args.quick else "/tmp/idc-ingest")
    cache = Path(f"{root}-cache")

    from idcscope.data.dataset import load_patch_data
    from idcscope.data.manifest import index_dataset

    gen_s = generate(root, n, patients)
    print(f"tree: {root} ({'reused' if gen_s == 0 else f'written in {gen_s:.0f} s'})")
    index, index_s = timed(lambda: index_dataset(root))
    n_files = len(index.table)
    rows = [{"step": "index only (manifest of every file)", "seconds": index_s}]
    runs = [(f"load_patch_data, rebuild, {CORES} workers", True, CORES)]
    if not args.no_serial:
        runs.append(("load_patch_data, rebuild, 1 worker", True, 1))
    runs.append(("load_patch_data, cache hit", False, None))
    for label, rebuild, workers in runs:
        data, s = timed(lambda r=rebuild, w=workers: load_patch_data(root, cache, r, w))
        rows.append({"step": label, "seconds": s})
        print(f"{label}: {s:.1f} s", flush=True)
    for r in rows:
        r["patches/s"] = n_files / r["seconds"]
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    png = sum(f.stat().st_size for f in root.rglob("*.png"))
    print(f"\n### Ingest ({n_files:,} patches of {patients} patients, {CORES} cores)\n")
    print(table(rows, ["step", "seconds", "patches/s"]))
    print(
        f"\nPNG files: {png / 1e9:.2f} GB; cache: {size / 1e9:.2f} GB in {cache} "
        f"({data.n_padded:,} padded, {len(data.skipped)} skipped); target: rebuild with "
        f"every core <= 60 s for 277,524 patches"
    )


if __name__ == "__main__":
    main()
