"""What the input check costs the Predictor: ``score_files`` with a model's check and with none.

    python benchmarks/bench_inputcheck.py [MODEL] [--patches 3000] [--engine auto] [--repeat 3]
                                          [--threads N] [--quick]

MODEL (default: the shipped ``idc-default``) is copied twice into a temporary folder, once
with an input check and once with none (``input_check = {}``), the weights the same. The
check is the model's own, or, for a model without one, one fitted on the scatter patients
(``training.inputfit.fit_model_check``, 2,000 patches: what it costs does not depend on
what it learnt). Both score the same whole sample patients (the fewest, in sorted order,
that make ``--patches``) from their PNG files, everything included: decoding, stain,
neighbourhood, the forward pass, context, calibration and the check, on the same engine.
Rounds alternate which goes first; each figure is the best of ``--repeat``, per second of
wall time and per second of CPU time (every thread's: on a shared machine, what the cores
would give alone). Also the check alone (``check_patches``, one thread, as the Predictor
runs it beside the decoding).
The load average is printed before and after: a busy machine slows both columns alike.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import REPO, SAMPLE, machine, table

from idcscope.data import inputcheck as ic
from idcscope.data.dataset import load_patch_data
from idcscope.data.manifest import index_dataset
from idcscope.inference import Predictor
from idcscope.models.bundle import resolve_model
from idcscope.models.checkpoint import read_meta
from idcscope.training.inputfit import fit_model_check, write_input_check

SCATTER = REPO.parent / "shared" / "data" / "idc-scatter"
CACHE = "/tmp/idcscope-bench-cache"


def variants(model: Path, folder: Path) -> dict[str, Path]:
    """Two copies of ``model``: with its check (or one fitted) and with none."""
    params = read_meta(model).input_check
    if not params:
        scatter = load_patch_data(SCATTER, cache_dir=CACHE)
        params = fit_model_check(scatter, scatter.rows(), max_patches=2000)
    out = {}
    for name, check in (("with the check", params), ("no check", {})):
        copy = folder / name.replace(" ", "_") / model.name
        copy.parent.mkdir()
        (shutil.copytree if model.is_dir() else shutil.copy)(model, copy)
        out[name] = write_input_check(copy, check)
    return out


def whole_patients(n: int):
    """The manifest of the fewest sample patients, in sorted order, that hold ``n`` patches."""
    index = index_dataset(SAMPLE)
    t = index.table
    sizes = t.groupby("patient").size().sort_index()
    keep = sizes.index[: int(np.searchsorted(sizes.cumsum().to_numpy(), n)) + 1]
    return index.root, t[t["patient"].isin(keep)].reset_index(drop=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="idc-default")
    ap.add_argument("--patches", type=int, default=3000)
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="the Predictor's (default: cores)")
    ap.add_argument("--quick", action="store_true", help="500 patches, 1 round")
    args = ap.parse_args()
    if args.quick:
        args.patches, args.repeat = 500, 1
    logging.getLogger("idcscope").setLevel(logging.WARNING)
    load_before = os.getloadavg()
    root, patients = whole_patients(args.patches)
    with tempfile.TemporaryDirectory() as tmp:
        paths = variants(resolve_model(args.model), Path(tmp))
        # "auto" chooses once, for both
        first = Predictor(paths["no check"], args.engine, threads=args.threads)
        engine = first.members[0].backend.name
        predictors = {name: Predictor(p, engine, threads=args.threads) for name, p in paths.items()}
        for p in predictors.values():  # warm-up: threads, sessions, the file cache
            p.score_files(patients.iloc[:200], root, desc="warm-up")
        best, cpu, checks = dict.fromkeys(predictors, 0.0), dict.fromkeys(predictors, 0.0), {}
        for r in range(args.repeat):
            for name in list(predictors)[:: 1 if r % 2 == 0 else -1]:
                start, c0 = time.perf_counter(), time.process_time()
                checks[name] = predictors[name].score_files(patients, root, desc=name).check
                n = len(patients)
                best[name] = max(best[name], n / (time.perf_counter() - start))
                cpu[name] = max(cpu[name], n / (time.process_time() - c0))
        flagged = float((checks["with the check"] != "ok").mean())
        check = predictors["with the check"].input_check
    images = load_patch_data(SAMPLE, cache_dir=CACHE).images[:20480]
    start = time.perf_counter()
    ic.check_patches(check, images, workers=1)
    alone = len(images) / (time.perf_counter() - start)
    rows = [
        {
            "per second of": what,
            "no check (patches/s)": rate["no check"],
            "with the check (patches/s)": rate["with the check"],
            "cost": f"{100 * (1 - rate['with the check'] / rate['no check']):.1f}%",
        }
        for what, rate in (("wall time", best), ("CPU time, all threads", cpu))
    ]
    print(f"\n{table(rows)}\n")
    print(
        f"{len(patients):,} patches of {patients['patient'].nunique()} patients, engine "
        f"{first.engine}, best of {args.repeat}; check_patches alone, 1 thread: "
        f"{alone:,.0f} patches/s"
    )
    print(f"flagged by the check: {flagged:.1%} of the patches")
    print(f"load average before: {load_before[0]:.1f} (1 min), {load_before[1]:.1f} (5 min)")
    print(f"machine after: {machine()}")


if __name__ == "__main__":
    main()
