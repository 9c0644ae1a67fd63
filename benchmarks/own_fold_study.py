"""Own-fold study: what shipping a network calibrated on its own held-out patients would give.

    python benchmarks/own_fold_study.py runs/cv/default-s0 runs/cv/default-s1 ... --out runs/own

The shipped network trains on every patient and is calibrated on other networks' margins
(the fold models' out-of-fold predictions); `calibration_study.py` shows that a network
calibrated on its own scale lines patients up better. The way to ship that is a network
with patients of its own held out: trained on two thirds of the patients, calibrated on
the last third. This prices it, inside each fold of each `idcscope cv` run given:

- **as shipped**: the fold model (trained on the fold's ~90 patients) on its test patients,
  calibrated and called by context from the other folds' margins (``contexts.cross_fitted``);
- **own third**: a network of the same recipe and seed trained on two thirds of the fold's
  ~90 patients (drawn per data folder; 15% of them its validation patients), calibrated and
  called by context on its margins on the last third (its bands' held-out level over three
  groups of those patients, as the folds are for the shipped fit), then on the same test
  patients.

Scored with neighbours and alone (no thinned rows in either), compared with
``training.selection.compare`` paired run by run. The networks it trains are kept in
``--out`` (a killed study resumes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
from select_study import COHORTS

from idcscope.data import splits as splitting
from idcscope.evaluation.evaluate import evaluate
from idcscope.training import contexts, selection
from idcscope.training.config import config_from_dict
from idcscope.training.train import train


def own_third(run: Path, fold: int, out: Path) -> pd.DataFrame:
    """The network of the module notes for one fold: its predictions (both modes) on its
    held-out third and the fold's test patients, with a ``held`` column; trained once."""
    cfg = config_from_dict(json.loads((run / "cv.json").read_text())["config"])
    outer = json.loads((run / f"fold{fold}" / "fold_split.json").read_text())
    where = out / run.name / f"fold{fold}"
    if not (where / "eval_lone" / "predictions.csv").exists():
        pool = pd.read_csv(run / "oof_predictions.csv", dtype={"patient": str})
        pool = pool[pool["patient"].isin(outer["train"] + outer["val"])]
        folder = pool.groupby("patient")["path"].first().str.split("/").str[0]
        rng = np.random.default_rng(cfg.seed * 10 + fold)
        held, val = [], []
        for _, patients in folder.groupby(folder):
            order = list(rng.permutation(patients.index.to_numpy()))
            third = len(order) // 3
            held += order[:third]
            val += order[third : third + max(1, round(0.15 * (len(order) - third)))]
        rest = sorted(set(folder.index) - set(held) - set(val))
        split = {"method": "patient", "seed": cfg.seed, "fold": fold, "train": rest,
                 "val": sorted(val), "test": sorted(held + outer["test"]), "held": sorted(held)}  # fmt: skip
        where.mkdir(parents=True, exist_ok=True)
        path = splitting.save_splits(split, where / "split.json")
        train(dataclasses.replace(cfg, out=str(where), split=str(path)))
        for name, context in (("eval", True), ("eval_lone", False)):
            evaluate(where / "best.pt", cfg.data, where / name, split="test", n_boot=0,
                     context=context)  # fmt: skip
    held = set(json.loads((where / "split.json").read_text())["held"])
    frames = []
    for name, scored in (("eval", "context"), ("eval_lone", "lone")):
        frame = pd.read_csv(where / name / "predictions.csv", dtype={"patient": str})
        frames.append(frame.assign(scored=scored, held=frame["patient"].isin(held)))
    return pd.concat(frames, ignore_index=True)


def decided_own(run: Path, out: Path) -> pd.DataFrame:
    """Every fold's test patients decided by its own-third network's own fit."""
    pooled, rule, _ = selection.read_oof(run)
    parts = []
    for fold in sorted(pooled["fold"].unique()):
        frame = own_third(run, int(fold), out)
        held = frame[frame["held"]]
        patients = np.random.default_rng(int(fold)).permutation(sorted(set(held["patient"])))
        groups = {p: i % 3 for i, p in enumerate(patients)}  # the bands' held-out level
        fit = contexts.fit_decisions(held.assign(fold=held["patient"].map(groups)), rule)
        parts.append(contexts.decide(fit["contexts"], frame[~frame["held"]], fit["threshold"]))
    frame = pd.concat(parts, ignore_index=True)
    frame = frame.assign(cohort=frame["scored"] + "/" + frame["path"].str.split("/").str[0])
    frame.attrs["seeds"] = (run.name,)
    return frame


def decided_shipped(run: Path) -> pd.DataFrame:
    pooled, rule, _ = selection.read_oof(run)
    frame = selection.decide_oof(pooled[pooled["scored"] != "thinned"], rule, contexts.ALPHA)
    frame.attrs["seeds"] = (run.name,)
    return frame


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="cv folders")
    ap.add_argument("--out", type=Path, required=True, help="where the networks are trained")
    ap.add_argument("--n-boot", type=int, default=300)
    args = ap.parse_args()
    own = [decided_own(run, args.out) for run in args.runs]
    shipped = [decided_shipped(run) for run in args.runs]
    table = selection.compare(shipped, own, n_boot=args.n_boot)
    table = table[table["cohort"].isin(COHORTS)].assign(cohort=lambda t: t["cohort"].map(COHORTS))
    print(selection.markdown(table, ("as shipped", "own third")))


if __name__ == "__main__":
    main()
