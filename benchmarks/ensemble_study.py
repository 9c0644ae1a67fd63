"""Fold models of several cv runs on the same folds, ensembled fold by fold.

    idcscope cv ../shared/data/idc-sample ../shared/data/idc-scatter --folds 3 --seed 1 \
        --fold-seed 0 --out runs/cv/seed1          # the same folds as a --seed 0 run
    python benchmarks/ensemble_study.py runs/idc-default runs/cv/seed1

Each fold's test patients are scored by each run's fold model alone and by all of them
together (``idcscope.inference.Predictor``: the mean of the members' calibrated P(IDC)),
with neighbours; printed: AUC per fold and pooled, balanced accuracy and F1 pooled at
each model's own threshold (each fold model's calibration: the "fold's validation" rows
of cv.md), and the scoring cost.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from idcscope.evaluation import metrics
from idcscope.evaluation.evaluate import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="idcscope cv output folders")
    ap.add_argument("--out", type=Path, default=Path("runs/ensemble_study"))
    args = ap.parse_args()
    data = json.loads((args.runs[0] / "cv.json").read_text())["config"]["data"]
    n_folds = len(sorted(args.runs[0].glob("fold*/best.pt")))
    members = {run.name: [run] for run in args.runs} | {"ensemble": list(args.runs)}
    print("| model | " + " | ".join(f"fold {i} AUC" for i in range(n_folds))
          + " | pooled AUC | balanced acc. | F1 | scoring s |")  # fmt: skip
    print("|---" * (n_folds + 5) + "|")
    for name, runs in members.items():
        ys, ps, calls, aucs, seconds = [], [], [], [], 0.0
        for i in range(n_folds):
            ckpts = [str(run / f"fold{i}" / "best.pt") for run in runs]
            start = time.perf_counter()
            out = args.out / name / f"fold{i}"
            result = evaluate(ckpts, data, out, split="test", n_boot=0)
            seconds += time.perf_counter() - start
            table = pd.read_csv(out / "predictions.csv")
            ys.append(table["label"].to_numpy())
            ps.append(table["prob_idc"].to_numpy())
            calls.append(table["pred"].to_numpy())
            aucs.append(result["auc"])
        y, p, call = map(np.concatenate, (ys, ps, calls))
        pooled = metrics.binary_metrics(y, p, 0.5)
        at = metrics.binary_metrics(y, call.astype(float), 0.5)
        cells = " | ".join(f"{a:.4f}" for a in aucs)
        print(f"| {name} | {cells} | {pooled['auc']:.4f} | {at['balanced_accuracy']:.4f} "
              f"| {at['f1']:.4f} | {seconds:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
