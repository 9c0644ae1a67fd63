"""Quality study: recipes cross-validated on the same patients, told apart honestly.

    idcscope cv ../shared/data/idc-sample ../shared/data/idc-scatter --folds 3 \
        --config A.yaml --out runs/cv/A          # and so on for each recipe
    python benchmarks/quality_study.py runs/cv/A runs/cv/B

For each recipe folder (an ``idcscope cv`` output), prints its pooled test metrics per
scoring mode (with neighbours; each patch alone), calibration (the fold's validation
patients; the other folds' out-of-fold predictions) and data folder, and, for the recipe
with the best mean fold AUC, the same less the optimism of having chosen it among these
recipes on these folds (``training.cv.selection_bias``, per metric). ``--chosen`` names the
recipe that was chosen when something other than fold AUC decided.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from idcscope.training.cv import cohort_table, selection_bias


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="idcscope cv output folders")
    ap.add_argument(
        "--chosen",
        help="the recipe folder's name that was chosen (default: the best mean fold AUC)",
    )
    args = ap.parse_args()
    results = {run.name: json.loads((run / "cv.json").read_text()) for run in args.runs}
    for name, r in results.items():
        if "cohorts" not in r:
            raise SystemExit(f"{name}: cv.json has no cohorts; run idcscope cv on it again")
        print(f"## {name}\n\n{cohort_table(r['cohorts'])}\n")
    folds = {len(r["per_fold"]) for r in results.values()}
    if len(folds) != 1 or len({tuple(map(tuple, _tests(r))) for r in results.values()}) != 1:
        raise SystemExit("the recipes were not cross-validated on the same folds")
    names = list(results)
    best = int(np.argmax([results[n]["mean"]["auc"]["mean"] for n in names]))
    best = names.index(args.chosen) if args.chosen else best
    chosen = names[best]
    print(f"## Selection-corrected: {chosen}, chosen among {len(names)} on these folds\n")
    print("| metric | pooled, with neighbours | optimism of the choice | corrected |")
    print("|---|---|---|---|")
    for key in ("auc", "balanced_accuracy", "f1"):
        scores = np.array([[f[key] for f in results[n]["per_fold"]] for n in names]).T
        bias = selection_bias(scores, best)
        pooled = results[chosen]["cohorts"]["context/oof"]["all"][key]
        print(f"| {key} | {pooled:.3f} | {bias:.3f} | {pooled - bias:.3f} |")


def _tests(result: dict) -> list[list[str]]:
    return [sorted(f["test_patients"]) for f in result["per_fold"]]


if __name__ == "__main__":
    main()
