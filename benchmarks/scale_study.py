"""Scale study: put a network on its calibration's scale through the patients both trained on.

    python benchmarks/scale_study.py runs/cv/default-s0 runs/cv/default-s1 runs/cv/default-s2

A model's calibration is fitted on the fold models' out-of-fold margins, and the shipped
network is another network: `calibration_study.py` shows that a seed's luck is mostly how
its margins' scale sits against that fit. Two networks of one recipe can be compared
without any patient either failed to see: on the patients both trained on, where both
margins are in-sample alike. The lever: map a network's margins onto each reference
network's by a least-squares line fitted there, average the maps, and calibrate the mapped
margins as before (folded into each context's temperature and bias, it ships as it is).

Measured cross-fitted over the folds of each `idcscope cv` run given: fold model k's test
patients, calibrated and called by context on the other folds' out-of-fold margins (the
shipped way), against the same with fold model k's margins first mapped onto fold model
j's (j != k) on fold m's patients, the one both trained on (with neighbours for the rows
scored with neighbours, alone for the lone ones). Each fold model scores every patient
once per mode; the margins are kept in ``--cache`` (a killed study resumes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from _common import table

from idcscope.data.manifest import index_datasets
from idcscope.inference.predictor import Predictor
from idcscope.training import contexts

MODES = {"context": True, "lone": False}  # scored with neighbours / each patch alone


def margins(run: Path, fold: int, mode: str, cache: Path) -> pd.Series:
    """Fold model ``fold``'s logit margin of every patch (by path), scored in ``mode``."""
    path = cache / run.name / f"fold{fold}_{mode}.csv"
    if not path.exists():
        index = index_datasets(["../shared/data/idc-sample", "../shared/data/idc-scatter"])
        predictor = Predictor(run / f"fold{fold}" / "best.pt", context=MODES[mode])
        scored = predictor.score_files(index.table, index.root, desc=f"{run.name} {fold} {mode}")
        path.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"path": index.table["path"], "margin": scored.margin}).to_csv(path)
    return pd.read_csv(path).set_index("path")["margin"]


def mapped(pooled: pd.DataFrame, run: Path, cache: Path, how: str) -> pd.DataFrame:
    """``pooled`` with each fold's margins mapped onto the mean of the other fold models'
    scales, fitted on the fold both trained on (context maps for context and thinned rows,
    lone maps for lone rows): ``how`` "line" (least squares of theirs on its) or "moments"
    (its mean and standard deviation onto theirs, which a weak correlation does not shrink)."""
    folds = sorted(pooled["fold"].unique())
    fold_of = pooled.drop_duplicates("path").set_index("path")["fold"]
    out = pooled.copy()
    for mode in MODES:
        z = {f: margins(run, f, mode, cache) for f in folds}
        rows = pooled["scored"].isin(["context", "thinned"] if mode == "context" else ["lone"])
        for k in folds:
            lines = []
            for j in (f for f in folds if f != k):
                (m,) = [f for f in folds if f not in (k, j)]
                mine, theirs = (z[f].loc[fold_of.index[fold_of == m]] for f in (k, j))
                if how == "line":
                    a, b = np.polyfit(mine, theirs, 1)
                else:
                    a = theirs.std() / mine.std()
                    b = theirs.mean() - a * mine.mean()
                lines.append((a, b))
            a, b = np.mean(lines, axis=0)
            here = rows & (pooled["fold"] == k)
            out.loc[here, "margin"] = a * pooled.loc[here, "margin"] + b
            print(f"{run.name} fold {k} {mode} {how}: margin x {a:.3f} {b:+.3f}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="idcscope cv folders (with fold models)")
    ap.add_argument("--cache", type=Path, default=Path("runs/scale_study"))
    args = ap.parse_args()
    rule = ("youden", None)
    keys = ("auc", "ece", "balanced_accuracy", "f1", "coverage")
    rows = []
    for run in args.runs:
        pooled = pd.read_csv(run / "oof_predictions.csv", dtype={"patient": str})
        frames = {"as shipped": pooled}
        frames |= {how: mapped(pooled, run, args.cache, how) for how in ("line", "moments")}
        for name, frame in frames.items():
            decided = contexts.cross_fitted(frame, rule)
            folder = decided["path"].str.split("/").str[0]
            for (mode, data), f in decided.groupby([decided["scored"], folder]):
                r = contexts.report(f)
                rows.append({"scored": mode, "data": data, "run": run.name, "how": name,
                             **{k: r[k] for k in keys}})  # fmt: skip
    results = pd.DataFrame(rows)
    print(table(rows))
    base = results[results["how"] == "as shipped"].set_index(["scored", "data", "run"])[list(keys)]
    summary = []
    for how in ("line", "moments"):
        d = results[results["how"] == how].set_index(["scored", "data", "run"])[list(keys)] - base
        for (mode, data), part in d.groupby(level=["scored", "data"]):
            summary.append({"how": how, "scored": mode, "data": data, **{
                k: f"{part[k].mean():+.3f} ({part[k].min():+.3f}, {part[k].max():+.3f})"
                for k in keys}})  # fmt: skip
    print("\nmapped - as shipped, mean over runs (min, max):\n")
    print(table(summary))


if __name__ == "__main__":
    main()
