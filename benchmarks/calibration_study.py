"""Calibration study: where a training seed's luck on whole patients lives, and one lever on it.

    python benchmarks/calibration_study.py runs/cv/default-s0 runs/cv/default-s1 ...

For each `idcscope cv` folder, AUC on the whole patients of the first data folder scored
with their neighbours:

- **each fold model**: within the patients one fold model scored, on its raw logit margins
  (what one network ranks; the mean over folds);
- **cross-fitted**: pooled over the folds after calibration and calls by context fitted on
  the other folds' patients (``contexts.cross_fitted``: the shipped model's situation, a
  calibration fitted on other networks' margins);
- **own fold (oracle)**: pooled after each fold is calibrated on its own patients. Not an
  estimate (it sees the labels it is scored on); it shows how much of the pooled AUC is
  lost to the fold models' scales differing from the calibration they are given;
- **own validation first**: each fold model's margins first put on its own scale by the
  temperature and bias it fitted on its validation patients (in its checkpoint), then
  cross-fitted: a way to give each network its own scale without the oracle.

Then the lever: calibrating every patch scored with neighbours as one context (alone kept
apart) instead of four, compared with ``training.selection.compare`` paired run by run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from select_study import COHORTS

from idcscope.evaluation.metrics import rank_auc
from idcscope.models.checkpoint import read_meta
from idcscope.training import contexts, selection


def fold_aucs(run: Path, folder: str) -> dict[str, float]:
    """The three AUCs of the module notes for one run's whole patients of ``folder``."""
    pooled, rule, _ = selection.read_oof(run)
    whole = (pooled["scored"] == "context") & pooled["path"].str.startswith(folder + "/")
    own = []
    for fold in sorted(pooled["fold"].unique()):
        mine = pooled[pooled["fold"] == fold]
        fit = contexts.fit_decisions(mine, rule)
        own.append(contexts.decide(fit["contexts"], mine, fit["threshold"]))
    own = pd.concat(own).loc[pooled.index]
    crossed = contexts.cross_fitted(pooled, rule)
    rescaled = contexts.cross_fitted(own_scale(run, pooled), rule)
    per_fold = [rank_auc(f["label"], f["margin"]) for _, f in pooled[whole].groupby("fold")]
    return {
        "each fold model": float(np.mean(per_fold)),
        "cross-fitted": rank_auc(crossed.loc[whole, "label"], crossed.loc[whole, "prob_idc"]),
        "own fold (oracle)": rank_auc(own.loc[whole, "label"], own.loc[whole, "prob_idc"]),
        "own validation first": rank_auc(
            rescaled.loc[whole, "label"], rescaled.loc[whole, "prob_idc"]
        ),
    }


def own_scale(run: Path, pooled: pd.DataFrame) -> pd.DataFrame:
    """``pooled`` with each fold's margins mapped by its model's own validation fit
    (``margin / T + bias``; the lone fit for rows scored alone)."""
    margin = pooled["margin"].to_numpy(np.float64).copy()
    for fold in pooled["fold"].unique():
        meta = read_meta(run / f"fold{fold}" / "best.pt")
        for lone in (False, True):
            fit = (meta.lone_calibration if lone else None) or vars(meta)
            rows = ((pooled["fold"] == fold) & ((pooled["scored"] == "lone") == lone)).to_numpy()
            margin[rows] = margin[rows] / fit["temperature"] + fit["logit_bias"]
    return pooled.assign(margin=margin)


def decided(run: Path, merge: bool) -> pd.DataFrame:
    """A run decided as :func:`selection.load_run` does, with every patch that had
    neighbours put in one context when ``merge``; paired by its folder's name."""
    pooled, rule, _ = selection.read_oof(run)
    if merge:
        pooled = pooled.assign(neighbours=pooled["neighbours"].mask(pooled["neighbours"] >= 1, 8))
    frame = selection.decide_oof(pooled, rule, contexts.ALPHA)
    frame.attrs["seeds"] = (run.name,)
    return frame


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="cv folders")
    ap.add_argument("--folder", default="idc-sample", help="whose whole patients")
    ap.add_argument("--n-boot", type=int, default=300)
    args = ap.parse_args()
    rows = {run.name: fold_aucs(run, args.folder) for run in args.runs}
    table = pd.DataFrame(rows).T
    print(f"## whole patients of {args.folder}: AUC\n\n| run | " + " | ".join(table.columns)
          + " |\n" + "|---" * (len(table.columns) + 1) + "|")  # fmt: skip
    for name, r in table.iterrows():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in r) + " |")
    four = [decided(run, merge=False) for run in args.runs]
    two = [decided(run, merge=True) for run in args.runs]
    cmp = selection.compare(four, two, n_boot=args.n_boot)
    cmp = cmp[cmp["cohort"].isin(COHORTS)].assign(cohort=lambda t: t["cohort"].map(COHORTS))
    names = ("4 contexts", "alone / with neighbours")
    print(f"\n## calibration by {names[1]} against {names[0]}\n")
    print(selection.markdown(cmp, names))


if __name__ == "__main__":
    main()
