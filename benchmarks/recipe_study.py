"""Recipe study: candidate recipes under the same patient-level cross-validation.

    python benchmarks/recipe_study.py ../shared/data/idc-sample --folds 5 \
        --recipes report default default_tta default_reinhard default_macenko

Each recipe trains K fold models (TTA variants re-evaluate the models of the recipe they
extend). Writes ``<out>/<recipe>/cv.json`` and a markdown table ``<out>/RESULTS.md`` with
fold mean ± std, pooled metrics with patient-clustered bootstrap 95% CIs, and training
minutes per fold on this machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from pathlib import Path

import pandas as pd

from idcscope.config import make_config
from idcscope.cv import HEADLINE, cross_validate, markdown_table, summarize_folds
from idcscope.evaluate import evaluate

# name -> (recipe preset, config overrides, TTA at evaluation, recipe whose models it reuses)
CANDIDATES: dict[str, tuple[str, dict, bool, str | None]] = {
    "report": ("report", {}, False, None),
    "default": ("default", {}, False, None),
    "default_tta": ("default", {}, True, "default"),
    "default_reinhard": ("default", {"stain": "reinhard"}, False, None),
    "default_reinhard_tta": ("default", {"stain": "reinhard"}, True, "default_reinhard"),
    "default_macenko": ("default", {"stain": "macenko"}, False, None),
    "balanced_sampler": ("default", {"imbalance": "balanced_sampler"}, False, None),
    "no_imbalance": ("default", {"imbalance": "none"}, False, None),
    "dihedral_only": ("default", {"augment": "dihedral"}, False, None),
    "resnet18": ("default", {"model": "resnet18"}, False, None),
    "efficientnet_b0": ("default", {"model": "efficientnet_b0"}, False, None),
}


def reevaluate(base: Path, data: str, folds: int, tta: bool, seed: int) -> dict:
    """Evaluate the fold models of an earlier run again (e.g. with TTA): no retraining."""
    base_cv = json.loads((base / "cv.json").read_text())
    per_fold, pooled = [], []
    for f in base_cv["per_fold"]:
        fold_dir = base / f"fold{f['fold']}"
        out = fold_dir / ("eval_tta" if tta else "eval")
        m = evaluate(fold_dir / "best.pt", data, out, split="test", tta=tta, n_boot=0)
        per_fold.append({**f, **{k: m[k] for k in HEADLINE}, "threshold": m["threshold"]})
        pooled.append(pd.read_csv(out / "predictions.csv", dtype={"patient": str}))
    return summarize_folds(per_fold, pd.concat(pooled, ignore_index=True), 1000, seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data")
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", nargs="+", default=["report", "default", "default_tta"])
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    results, names = [], []
    for name in args.recipes:
        preset, overrides, tta, reuse = CANDIDATES[name]
        run = out / name
        if reuse:
            result = reevaluate(out / reuse, args.data, args.folds, tta, args.seed)
        else:
            cfg = make_config(
                preset,
                data=args.data,
                out=str(run),
                epochs=args.epochs,
                seed=args.seed,
                **overrides,
            )
            result = cross_validate(cfg, folds=args.folds, tta=tta)
        run.mkdir(parents=True, exist_ok=True)
        (run / "cv.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        results.append(result)
        names.append(name)
        table = markdown_table(results, names)
        header = (
            f"Patient-level {args.folds}-fold CV on {args.data} "
            f"({platform.processor() or platform.machine()}, seed {args.seed}).\n\n"
        )
        (out / "RESULTS.md").write_text(header + table + "\n")
        print(table, flush=True)


if __name__ == "__main__":
    main()
