"""Recipe study: candidate recipes under the same patient-level cross-validation.

    python benchmarks/recipe_study.py ../shared/data/idc-sample --folds 5 \
        --recipes report default default_tta default_reinhard default_macenko

Each recipe trains K fold models (TTA, patches-alone and ensemble variants re-evaluate the
fold models of the recipes they name; an ensemble's training time is the sum of its
members'). All recipes share the folds drawn by ``--seed``; a recipe with a ``cv.json`` is
read back, not rerun (``--force`` reruns it), and an interrupted one resumes at its
unfinished fold. Writes ``<out>/<recipe>/cv.json`` and a markdown table ``<out>/RESULTS.md``
with fold mean ± std, pooled metrics with patient-clustered bootstrap 95% CIs, and training
minutes per fold on this machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from pathlib import Path

import pandas as pd

from idcscope.evaluation.evaluate import evaluate
from idcscope.training.config import make_config
from idcscope.training.cv import HEADLINE, cross_validate, markdown_table, summarize_folds

# The model sees the patch alone: the candidates from before the neighbourhood input.
ALONE = {"neighbourhood": 0}
# Reinhard, spatial context, the last epoch, and the 3x3 neighbourhood as model input.
NBHD1 = {"stain": "reinhard", "context": "grid", "keep": "last", "neighbourhood": 1}
NBHD1_DROP20 = {**NBHD1, "drop_neighbours": 0.2}
# The default recipe, pinned here so its rows keep their meaning if RECIPES["default"] moves.
DEFAULT = {**NBHD1_DROP20, "imbalance": "balanced_sampler"}

# name -> (recipe preset, config overrides, scoring, recipes whose fold models it
# re-evaluates instead of training: one for TTA or alone, several for an ensemble). Scoring:
# "" as the model was fitted, "tta" with the 8 dihedral views, "alone" every patch without
# its place (no neighbours, no smoothing), as a patch without coordinates is scored.
SCORING = {"": {}, "tta": {"tta": True}, "alone": {"context": False}}
CANDIDATES: dict[str, tuple[str, dict, str, tuple[str, ...]]] = {
    "report": ("report", {}, "", ()),
    # Stain and context options are explicit, whatever the default recipe holds today.
    "default": ("default", {**ALONE, "stain": "none", "context": "none"}, "", ()),
    "default_tta": ("default", {**ALONE, "stain": "none", "context": "none"}, "tta", ("default",)),
    "default_reinhard": ("default", {**ALONE, "stain": "reinhard", "context": "none"}, "", ()),
    "default_reinhard_tta": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "none"},
        "tta",
        ("default_reinhard",),
    ),
    "default_reinhard_seed1": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "none", "seed": 1},
        "",
        (),
    ),
    "default_reinhard_ens2": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "none"},
        "",
        ("default_reinhard", "default_reinhard_seed1"),
    ),
    "default_macenko": ("default", {**ALONE, "stain": "macenko", "context": "none"}, "", ()),
    "reinhard_balanced_sampler": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "none", "imbalance": "balanced_sampler"},
        "",
        (),
    ),
    "context_epochs24": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "grid", "epochs": 24},
        "",
        (),
    ),
    "reinhard_focal": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "none", "imbalance": "focal"},
        "",
        (),
    ),
    "reinhard_no_imbalance": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "none", "imbalance": "none"},
        "",
        (),
    ),
    "reinhard_dihedral_only": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "none", "augment": "dihedral"},
        "",
        (),
    ),
    "reinhard_resnet18": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "none", "model": "resnet18"},
        "",
        (),
    ),
    "reinhard_efficientnet_b0": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "none", "model": "efficientnet_b0"},
        "",
        (),
    ),
    # Spatial context: each patch's logits averaged with its neighbours' on the patient grid.
    "reinhard_context": ("default", {**ALONE, "stain": "reinhard", "context": "grid"}, "", ()),
    "reinhard_context_seed1": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "grid", "seed": 1},
        "",
        (),
    ),
    "reinhard_context_ens2": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "grid"},
        "",
        ("reinhard_context", "reinhard_context_seed1"),
    ),
    "reinhard_context_strong_aug": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "grid", "augment": "strong"},
        "",
        (),
    ),
    "reinhard_context_keep_last": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "grid", "keep": "last"},
        "",
        (),
    ),
    "reinhard_context_strong_last": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "grid", "augment": "strong", "keep": "last"},
        "",
        (),
    ),
    # The model also sees each patch's 3x3 block of neighbours (three more input channels).
    "reinhard_context_last_nbhd1": ("default", {**NBHD1}, "", ()),
    "nbhd1_tta": ("default", NBHD1, "tta", ("reinhard_context_last_nbhd1",)),
    "nbhd1_alone": ("default", NBHD1, "alone", ("reinhard_context_last_nbhd1",)),
    # ... and a fifth of the training patches shown without their neighbours.
    "nbhd1_drop20": ("default", NBHD1_DROP20, "", ()),
    "nbhd1_drop20_tta": ("default", NBHD1_DROP20, "tta", ("nbhd1_drop20",)),
    "nbhd1_drop20_alone": ("default", NBHD1_DROP20, "alone", ("nbhd1_drop20",)),
    "keep_last_alone": ("default", {}, "alone", ("reinhard_context_keep_last",)),
    "nbhd1_drop20_seed1": ("default", {**NBHD1_DROP20, "seed": 1}, "", ()),
    "nbhd1_drop20_ens2": ("default", NBHD1_DROP20, "", ("nbhd1_drop20", "nbhd1_drop20_seed1")),
    "nbhd1_drop20_balanced_sampler": (
        "default",
        DEFAULT,
        "",
        (),
    ),
    "nbhd1_drop20_balanced_sampler_alone": (
        "default",
        {},
        "alone",
        ("nbhd1_drop20_balanced_sampler",),
    ),
    "nbhd1_drop20_balanced_sampler_seed1": (
        "default",
        {**DEFAULT, "seed": 1},
        "",
        (),
    ),
    "nbhd1_drop20_focal": ("default", {**NBHD1_DROP20, "imbalance": "focal"}, "", ()),
    "nbhd1_drop20_no_imbalance": ("default", {**NBHD1_DROP20, "imbalance": "none"}, "", ()),
    "nbhd2_drop20": ("default", {**NBHD1_DROP20, "neighbourhood": 2}, "", ()),
    "default_resnet18": ("default", {**DEFAULT, "model": "resnet18"}, "", ()),
    # The default on ResNet-18 from scratch, in the 15-minute training budget: 4 epochs take
    # 13 minutes per fold on 2 AVX2 cores (56 patches/s against cancernet's 300).
    "default_resnet18_e4": ("default", {**DEFAULT, "model": "resnet18", "epochs": 4}, "", ()),
    "default_efficientnet_b0": ("default", {**DEFAULT, "model": "efficientnet_b0"}, "", ()),
    # ... and EfficientNet-B0, whose training step is a little faster than ResNet-18's here.
    "default_efficientnet_b0_e4": (
        "default",
        {**DEFAULT, "model": "efficientnet_b0", "epochs": 4},
        "",
        (),
    ),
    # ... and the original study's ResNet-50 (its pool-dense-dropout head) unfrozen and from
    # scratch: 26 patches/s here, so the budget allows 2 epochs (about 14 minutes per fold).
    "default_resnet50_e2": (
        "default",
        {**DEFAULT, "model": "resnet50", "model_kwargs": {"fine_tune": True}, "epochs": 2},
        "",
        (),
    ),
    "reinhard_context_tta": (
        "default",
        {**ALONE, "stain": "reinhard", "context": "grid"},
        "tta",
        ("reinhard_context",),
    ),
}


def reevaluate(bases: list[Path], data: str, scoring: str, seed: int) -> dict:
    """Evaluate earlier fold models again, scored otherwise or as an ensemble: no retraining."""
    per_fold, pooled = [], []
    for f in json.loads((bases[0] / "cv.json").read_text())["per_fold"]:
        members = [b / f"fold{f['fold']}" / "best.pt" for b in bases]
        out = bases[0] / f"fold{f['fold']}" / "_".join(["eval", *[b.name for b in bases[1:]]])
        out = out.with_name(out.name + (f"_{scoring}" if scoring else ""))
        m = evaluate(members, data, out, split="test", n_boot=0, **SCORING[scoring])
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
        preset, overrides, scoring, reuse = CANDIDATES[name]
        run = out / name
        if (run / "cv.json").exists() and not args.force:
            result = json.loads((run / "cv.json").read_text())
        elif reuse:
            result = reevaluate([out / r for r in reuse], args.data, scoring, args.seed)
        else:
            cfg = make_config(
                preset,
                data=args.data,
                out=str(run),
                **{"seed": args.seed, "epochs": args.epochs, **overrides},
            )
            tta = scoring == "tta"
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
