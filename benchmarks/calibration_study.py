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

Then two levers, each compared with the shipped way by ``training.selection.compare``,
paired run by run:

- **alone / with neighbours**: every patch scored with neighbours calibrated as one
  context (alone kept apart) instead of four;
- **own network**: each fold model's patients calibrated and called by a fit on the other
  half of that same model's patients (halves drawn per data folder): a network calibrated
  on its own scale, on patients the fit did not see, from fewer patients. The bands skip
  the held-out level there (half a fold is too few patients for it), so their share
  decided is not comparable; AUC, ECE, balanced accuracy and F1 are.
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


def decided(run: Path, how: str) -> pd.DataFrame:
    """A run decided as :func:`selection.load_run` does ("as shipped"), or by one of the
    levers of the module notes; paired by its folder's name."""
    pooled, rule, _ = selection.read_oof(run)
    if how == "alone / with neighbours":
        pooled = pooled.assign(neighbours=pooled["neighbours"].mask(pooled["neighbours"] >= 1, 8))
    if how == "own network":
        frame = own_network(pooled, rule)
    else:
        frame = selection.decide_oof(pooled, rule, contexts.ALPHA)
    frame.attrs["seeds"] = (run.name,)
    return frame


def own_network(pooled: pd.DataFrame, rule: tuple, seed: int = 0) -> pd.DataFrame:
    """Each fold's patients decided by a fit on the other half of the same fold's."""
    rng, parts = np.random.default_rng(seed), []
    for _, mine in pooled.groupby("fold"):
        folder = mine.groupby("patient")["path"].first().str.split("/").str[0]
        half = {}
        for _, patients in folder.groupby(folder):
            for i, patient in enumerate(rng.permutation(patients.index.to_numpy())):
                half[patient] = i % 2
        side = mine["patient"].map(half).to_numpy()
        for s in (0, 1):
            fit = contexts.fit_decisions(mine[side != s].drop(columns="fold"), rule)
            parts.append(contexts.decide(fit["contexts"], mine[side == s], fit["threshold"]))
    frame = pd.concat(parts).loc[pooled.index]
    return frame.assign(cohort=frame["scored"] + "/" + frame["path"].str.split("/").str[0])


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
    shipped = [decided(run, "as shipped") for run in args.runs]
    for lever in ("alone / with neighbours", "own network"):
        runs = [decided(run, lever) for run in args.runs]
        cmp = selection.compare(shipped, runs, n_boot=args.n_boot)
        cmp = cmp[cmp["cohort"].isin(COHORTS)].assign(cohort=lambda t: t["cohort"].map(COHORTS))
        print(f"\n## calibration: {lever} against as shipped\n")
        print(selection.markdown(cmp, ("as shipped", lever)))


if __name__ == "__main__":
    main()
