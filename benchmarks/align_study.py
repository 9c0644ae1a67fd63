"""Does lining scores up across patients pay? A per-patient offset tried on cv's test scores.

    python benchmarks/align_study.py runs/idc-default

Some patients' benign tissue scores higher than others', which costs pooled AUC (the mean
AUC within a patient is above the pooled one). The lever tried: shift each patient's
logits by ``lam`` times a low quantile ``q`` of them (its benign baseline), for patients
of at least 5 patches. A shift per patient leaves the AUC within a patient as it is; only
the ranking across patients moves. Printed per fold (one model, one calibration: the
honest test) and pooled over the folds (where the folds' calibrations differ too), and
with (lam, q) chosen on two folds and tested on the third.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

GRID = [(lam, q) for lam in (0.0, 0.25, 0.5, 0.75, 1.0) for q in (0.02, 0.05, 0.1, 0.2)]


def shifted(scores: pd.DataFrame, lam: float, q: float, n_min: int = 5) -> np.ndarray:
    by = scores.groupby("patient").z
    baseline, n = by.transform(lambda z: np.quantile(z, q)), by.transform("size")
    return scores.z - lam * np.where(n >= n_min, baseline, 0.0)


def auc(scores: pd.DataFrame, lam: float = 0.0, q: float = 0.05) -> float:
    return roc_auc_score(scores.label, shifted(scores, lam, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="an idcscope cv output folder")
    args = ap.parse_args()
    folds = sorted(args.run.glob("fold*/eval/predictions.csv"))
    scores = pd.concat([pd.read_csv(f).assign(fold=i) for i, f in enumerate(folds)])
    p = scores.prob_idc.clip(1e-7, 1 - 1e-7)
    scores["z"] = np.log(p / (1 - p))
    print("| (lam, q) | " + " | ".join(f"fold {i}" for i in range(len(folds))) + " | pooled |")
    print("|---" * (len(folds) + 2) + "|")
    for lam, q in [(0.0, 0.05), (0.25, 0.05), (0.5, 0.05), (0.5, 0.1), (1.0, 0.05)]:
        per_fold = [auc(g, lam, q) for _, g in scores.groupby("fold")]
        cells = " | ".join(f"{a:.4f}" for a in per_fold)
        print(f"| ({lam}, {q}) | {cells} | {auc(scores, lam, q):.4f} |")
    print("\n| test fold | (lam, q) chosen on the others | AUC before | after |\n|---|---|---|---|")
    for i, test in scores.groupby("fold"):
        rest = [g for f, g in scores.groupby("fold") if f != i]
        best = max(GRID, key=lambda lq: np.mean([auc(g, *lq) for g in rest]))
        print(f"| {i} | {best} | {auc(test):.4f} | {auc(test, *best):.4f} |")


if __name__ == "__main__":
    main()
