"""Input-check study: how many patches the check flags, on patients it was never fitted on.

    python benchmarks/inputcheck_study.py          # [--quick] [--threads N] [--flag-rate 0.01]

Protocol: the 14 whole patients of the sample are split (seeded) into two folds of 7. For
each fold, the check (``idcscope.data.inputcheck``) is fitted on the 122 scatter patients
and the other fold's 7 patients (their real patches, and what ``out_of_spec`` makes of
them; its threshold is set on half of those patients, unseen by the regression, to flag
``--flag-rate``), and measured on the fold's own patients: their real patches as they are, and the
same patches shown at 4x (centre 12x12 upsampled, bicubic), 2x (centre 25x25), 4x with
camera noise (Gaussian, sigma 3 grey levels), 0.5x (a 2x2 block of neighbours
downsampled), re-stained (optical density per channel scaled, 2x apart or more), grayscale,
channels swapped, haematoxylin-DAB, inverted, and synthetic glass. Each held-out patient
is measured once; the table pools both folds. Speed: ``check_patches`` on 20,480 real
patches, best of 3.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import CORES, REPO, SAMPLE, machine, table

from idcscope.data import inputcheck as ic
from idcscope.data.dataset import load_patch_data

SCATTER = REPO.parent / "shared" / "data" / "idc-scatter"
CACHE = "/tmp/idcscope-bench-cache"


def conditions(images, data, rows, rng) -> dict:
    """The held-out patients' patches as they are and made into each condition, with the
    reason the check should give."""
    t = data.table.iloc[rows]
    _, wide = ic.blocks(images, t["patient"].to_numpy(), t["x"].to_numpy(), t["y"].to_numpy())
    zoom4 = ic.zoom(images, 4.0)
    noisy = np.clip(zoom4 + rng.normal(0, 3, zoom4.shape), 0, 255).round().astype(np.uint8)
    out = {
        "real, 2.5x": (images, "ok"),
        "4x (centre 12x12 upsampled)": (zoom4, "magnification"),
        "2x (centre 25x25 upsampled)": (ic.zoom(images, 2.0), "magnification"),
        "4x plus camera noise": (noisy, "magnification"),
        "0.5x (2x2 block downsampled)": (ic.zoom(wide, 0.5), "magnification"),
        "re-stained (OD 2x apart or more)": (ic.restain(images, rng), "stain"),
    }
    for kind in ic.NOT_HE:
        out[kind] = (ic.not_he(images, rng, (kind,)), "not H&E")
    out["glass (synthetic)"] = (ic.glass(len(images), rng), "glass")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 held-out patients, fewer fit patches")
    ap.add_argument("--threads", type=int, default=CORES)
    ap.add_argument(
        "--flag-rate", type=float, default=ic.FLAG_RATE, help="share of real patches aimed at"
    )
    args = ap.parse_args()
    sample = load_patch_data(SAMPLE, cache_dir=CACHE)
    scatter = load_patch_data(SCATTER, cache_dir=CACHE)
    patients = np.array(sorted(set(sample.patients)))
    folds = np.array_split(np.random.default_rng(0).permutation(patients), 2)
    counts: dict[str, dict] = {}
    start = time.perf_counter()
    for k, fold in enumerate(folds):
        fold = fold[:1] if args.quick else fold
        params = fit_fold(sample, scatter, fold, k, args.quick, args.flag_rate)
        test = np.flatnonzero(np.isin(sample.patients, fold))
        rng = np.random.default_rng(100 + k)
        for name, (images, want) in conditions(sample.images[test], sample, test, rng).items():
            got = ic.check_patches(params, images, args.threads)
            c = counts.setdefault(name, {"n": 0, "flagged": 0, "right": 0, "reasons": {}})
            c["n"] += len(got)
            c["flagged"] += int((got != "ok").sum())
            c["right"] += int((got == want).sum())
            for r, m in zip(*np.unique(got, return_counts=True), strict=True):
                c["reasons"][r] = c["reasons"].get(r, 0) + int(m)
        print(f"fold {k}: threshold P(ok) < {params['threshold']:.4f}", flush=True)
    rows = [
        {
            "condition": name,
            "patches": c["n"],
            "flagged": f"{100 * c['flagged'] / c['n']:.1f}%",
            "with the right reason": f"{100 * c['right'] / c['n']:.1f}%"
            if name != "real, 2.5x"
            else "",
            "reasons given": ", ".join(
                f"{r} {m}" for r, m in sorted(c["reasons"].items(), key=lambda x: -x[1])
            ),
        }
        for name, c in counts.items()
    ]
    print(f"\n{table(rows)}\n")
    print(f"fit and measure: {time.perf_counter() - start:.0f} s")
    wall, cpu = speed(params, sample.images, args.threads)
    print(
        f"check_patches, {args.threads} threads: {wall:,.0f} patches/s of wall time, {cpu:,.0f} per CPU-second"
    )
    print(f"machine: {machine()}")


def fit_fold(sample, scatter, fold, k: int, quick: bool, flag_rate: float) -> dict:
    """The check fitted on the scatter patients and the sample patients not in ``fold``."""
    fit = np.flatnonzero(~np.isin(sample.patients, fold))
    t = sample.table.iloc[fit]
    rows, wide = ic.blocks(
        sample.images[fit], t["patient"].to_numpy(), t["x"].to_numpy(), t["y"].to_numpy()
    )
    images = np.concatenate([scatter.images, sample.images[fit]])
    groups = np.concatenate([scatter.patients, sample.patients[fit]]).astype(str)
    if quick:
        keep = np.random.default_rng(k).choice(len(images), 3000, replace=False)
        images, groups = images[keep], groups[keep]
    rng = np.random.default_rng(k)
    x, reasons, g = ic.out_of_spec(
        images, groups, rng, wide, t["patient"].to_numpy()[rows].astype(str)
    )
    t0 = time.perf_counter()
    params = ic.fit_input_check(x, reasons, g, flag_rate=flag_rate, seed=k)
    print(
        f"fold {k}: fitted on {len(x):,} patches of {params['n_patients']} patients in {time.perf_counter() - t0:.0f} s"
    )
    return params


def speed(params: dict, images: np.ndarray, threads: int) -> tuple[float, float]:
    """Best of 3: patches per second of wall time, and per second of CPU time (every
    thread's; on a machine shared with other work, what each core would give alone)."""
    batch = images[np.arange(20480) % len(images)]
    ic.check_patches(params, batch[:64], threads)  # load the compiled kernel
    wall = cpu = 0.0
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        ic.check_patches(params, batch, threads)
        wall = max(wall, len(batch) / (time.perf_counter() - t0))
        cpu = max(cpu, len(batch) / (time.process_time() - c0))
    return wall, cpu


if __name__ == "__main__":
    main()
