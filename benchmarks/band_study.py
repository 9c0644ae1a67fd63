"""Band study: each class's conformal level held out apart, against one share for both.

    python benchmarks/band_study.py runs/cv/default-s0 runs/cv/default-s1 runs/cv/default-s2

The uncertain band of each scoring context is split conformal prediction, class-conditional,
at levels held out over the folds' patients (``training.contexts``). Two ways to hold them
out, each cross-fitted over the folds of every ``idcscope cv`` run given (its
``oof_predictions.csv``: whole, thinned and lone rows):

- **one share**: one share of alpha for both classes (:data:`contexts.PAIRS` on its
  diagonal), the largest keeping each class's error among the decided within alpha;
- **apart**: a share for each class, the pair deciding most within alpha (the shipped rule).

Printed per run, scoring mode and data folder: the share decided and sensitivity and
specificity among the decided, then the mean over runs of the difference (apart - one
share) and each run's summed shortfall of both below 0.95.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from idcscope.evaluation import metrics
from idcscope.training import contexts

RULE = ("youden", None)  # the threshold does not touch the band
KEYS = ("coverage", "sensitivity_decided", "specificity_decided")


def measure(pooled: pd.DataFrame, pairs: tuple) -> pd.DataFrame:
    """Coverage and errors among the decided per scoring mode and data folder, with the
    bands' levels held out over ``pairs``, cross-fitted over the folds."""
    kept, contexts.PAIRS = contexts.PAIRS, pairs
    try:
        decided = contexts.cross_fitted(pooled, RULE)
    finally:
        contexts.PAIRS = kept
    folder = decided["path"].str.split("/").str[0]
    rows = []
    for (mode, name), frame in decided.groupby([decided["scored"], folder]):
        m = metrics.call_metrics(frame["label"].to_numpy(), frame["call"].to_numpy())
        rows.append({"scored": mode, "folder": name, **{k: m[k] for k in KEYS}})
    return pd.DataFrame(rows).set_index(["scored", "folder"])


def shortfall(frame: pd.DataFrame) -> float:
    """How far sensitivity and specificity among the decided fall below 0.95, summed."""
    decided = frame[["sensitivity_decided", "specificity_decided"]].to_numpy(np.float64)
    return float(np.clip(0.95 - decided, 0, None).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="idcscope cv folders")
    args = parser.parse_args()
    one = tuple((s, s) for s in contexts.SHARES)
    diffs, shortfalls = [], []
    print("| run | scored | folder | decided: one share / apart | sens. decided | spec. decided |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        pooled = pd.read_csv(run / "oof_predictions.csv", dtype={"patient": str})
        before, after = measure(pooled, one), measure(pooled, contexts.PAIRS)
        for (mode, name), a in after.iterrows():
            b = before.loc[(mode, name)]
            cells = " | ".join(f"{b[k]:.3f} / {a[k]:.3f}" for k in KEYS)
            print(f"| {run.name} | {mode} | {name} | {cells} |")
        diffs.append(after - before)
        shortfalls.append([shortfall(f) for f in (before, after)])
    mean = sum(diffs) / len(diffs)
    print(f"\nMean over {len(diffs)} runs, apart - one share:\n")
    print("| scored | folder | decided | sens. decided | spec. decided |\n|---|---|---|---|---|")
    for (mode, name), d in mean.iterrows():
        print(f"| {mode} | {name} | " + " | ".join(f"{d[k]:+.3f}" for k in KEYS) + " |")
    print("\nSensitivity and specificity among the decided short of 0.95, summed over rows:")
    for run, (b, a) in zip(args.runs, shortfalls, strict=True):
        print(f"- {run.name}: one share {b:.3f}, apart {a:.3f}")


if __name__ == "__main__":
    main()
