"""Recipe study: candidate recipes under the same patient-level cross-validation.

    python benchmarks/recipe_study.py ../shared/data/idc-sample --folds 5 \
        --recipes report default default_tta default_reinhard default_macenko

Each recipe trains K fold models (TTA and ensemble variants re-evaluate the fold models of
the recipes they name; an ensemble's training time is the sum of its members'). All recipes
share the folds drawn by ``--seed``; a recipe with a ``cv.json`` is read back, not rerun
(``--force`` reruns it), and an interrupted one resumes at its unfinished fold. Writes ``<out>/<recipe>/cv.json`` and a markdown table ``<out>/RESULTS.md`` with
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

# The model sees the patch alone: the candidates from before the neighbourhood input.
ALONE = {"neighbourhood": 0}
# Reinhard, spatial context, the last epoch, and the 3x3 neighbourhood as model input.
NBHD1 = {"stain": "reinhard", "context": "grid", "keep": "last", "neighbourhood": 1}

# name -> (recipe preset, config overrides, TTA at evaluation, recipes whose fold models it
# re-evaluates instead of training: one for TTA, several for an ensemble)
CANDIDATES: dict[str, tuple[str, dict, bool, tuple[str, ...]]] = {
    "report": ("report", {}, False, ()),
    # Stain and context options are explicit, whatever the default recipe holds today.
    "default": ("default", {**ALONE, "stain": "none", "context": "none"}, False, ()),
    "default_tta": ("default", {**ALONE, "stain": "none", "context": "none"}, True, ("default",)),
    "default_reinhard": ("default", {**ALONE, "stain": "reinhard", "context": "none"}, False, ()),
    "default_reinhard_tta": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "none"},
        True,
        ("default_reinhard",),
    ),
    "default_reinhard_seed1": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "none", "seed": 1},
        False,
        (),
    ),
    "default_reinhard_ens2": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "none"},
        False,
        ("default_reinhard", "default_reinhard_seed1"),
    ),
    "default_macenko": ("default", {**ALONE, "stain": "macenko", "context": "none"}, False, ()),
    "reinhard_balanced_sampler": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "none", "imbalance": "balanced_sampler"},
        False,
        (),
    ),
    "context_epochs24": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "grid", "epochs": 24},
        False,
        (),
    ),
    "reinhard_focal": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "none", "imbalance": "focal"},
        False,
        (),
    ),
    "reinhard_no_imbalance": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "none", "imbalance": "none"},
        False,
        (),
    ),
    "reinhard_dihedral_only": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "none", "augment": "dihedral"},
        False,
        (),
    ),
    "reinhard_resnet18": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "none", "model": "resnet18"},
        False,
        (),
    ),
    "reinhard_efficientnet_b0": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "none", "model": "efficientnet_b0"},
        False,
        (),
    ),
    # Spatial context: each patch's logits averaged with its neighbours' on the patient grid.
    "reinhard_context": ("default", {**ALONE, "stain": "reinhard", "context": "grid"}, False, ()),
    "reinhard_context_seed1": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "grid", "seed": 1},
        False,
        (),
    ),
    "reinhard_context_ens2": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "grid"},
        False,
        ("reinhard_context", "reinhard_context_seed1"),
    ),
    "reinhard_context_strong_aug": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "grid", "augment": "strong"},
        False,
        (),
    ),
    "reinhard_context_keep_last": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "grid", "keep": "last"},
        False,
        (),
    ),
    "reinhard_context_strong_last": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "grid", "augment": "strong", "keep": "last"},
        False,
        (),
    ),
    # The model also sees each patch's 3x3 block of neighbours (three more input channels).
    "reinhard_context_last_nbhd1": ("default", {**NBHD1}, False, ()),
    "nbhd1_seed1": ("default", {**NBHD1, "seed": 1}, False, ()),
    "nbhd1_ens2": ("default", NBHD1, False, ("reinhard_context_last_nbhd1", "nbhd1_seed1")),
    "nbhd1_tta": ("default", NBHD1, True, ("reinhard_context_last_nbhd1",)),
    "nbhd1_balanced_sampler": ("default", {**NBHD1, "imbalance": "balanced_sampler"}, False, ()),
    "nbhd1_focal": ("default", {**NBHD1, "imbalance": "focal"}, False, ()),
    "nbhd1_no_imbalance": ("default", {**NBHD1, "imbalance": "none"}, False, ()),
    "nbhd2": ("default", {**NBHD1, "neighbourhood": 2}, False, ()),
    "nbhd1_resnet18": ("default", {**NBHD1, "model": "resnet18"}, False, ()),
    "nbhd1_efficientnet_b0": ("default", {**NBHD1, "model": "efficientnet_b0"}, False, ()),
    "reinhard_context_tta": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "grid"},
        True,
        ("reinhard_context",),
    ),
}


def reevaluate(bases: list[Path], data: str, folds: int, tta: bool, seed: int) -> dict:
    """Evaluate earlier fold models again, with TTA or as an ensemble: no retraining."""
    per_fold, pooled = [], []
    for f in json.loads((bases[0] / "cv.json").read_text())["per_fold"]:
        members = [b / f"fold{f['fold']}" / "best.pt" for b in bases]
        out = bases[0] / f"fold{f['fold']}" / "_".join(["eval", *[b.name for b in bases[1:]]])
        out = out.with_name(out.name + ("_tta" if tta else ""))
        m = evaluate(members, data, out, split="test", tta=tta, n_boot=0)
        minutes = sum(_fold(b, f["fold"])["train_minutes"] for b in bases)
        per_fold.append({**f, **{k: m[k] for k in HEADLINE}, "train_minutes": minutes})
        per_fold[-1]["threshold"] = m["threshold"]
        pooled.append(pd.read_csv(out / "predictions.csv", dtype={"patient": str}))
    return summarize_folds(per_fold, pd.concat(pooled, ignore_index=True), 1000, seed)


def _fold(run: Path, fold: int) -> dict:
    return json.loads((run / "cv.json").read_text())["per_fold"][fold]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data")
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", nargs="+", default=["report", "default", "default_tta"])
    ap.add_argument("--force", action="store_true", help="rerun recipes that have a cv.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    results, names = [], []
    for name in args.recipes:
        preset, overrides, tta, reuse = CANDIDATES[name]
        run = out / name
        if (run / "cv.json").exists() and not args.force:
            result = json.loads((run / "cv.json").read_text())
        elif reuse:
            result = reevaluate([out / r for r in reuse], args.data, args.folds, tta, args.seed)
        else:
            cfg = make_config(
                preset,
                data=args.data,
                out=str(run),
                **{"seed": args.seed, "epochs": args.epochs, **overrides},
            )
            result = cross_validate(cfg, folds=args.folds, tta=tta, fold_seed=args.seed)
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
