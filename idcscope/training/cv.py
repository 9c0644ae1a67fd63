"""Patient-level cross-validation: the protocol every recipe claim is measured with.

Patients are cut into K folds with similar IDC fractions; each fold is the test set once,
validation patients are drawn from the others, and no patient ever crosses sides. Results
are reported per fold (mean ± std) and pooled over all test patients, with
patient-clustered bootstrap 95% confidence intervals.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import splits as splitting
from ..data.dataset import load_patch_data
from ..evaluation import metrics
from ..evaluation.evaluate import evaluate
from .config import TrainConfig
from .train import train

logger = logging.getLogger(__name__)

HEADLINE = ("auc", "balanced_accuracy", "f1", "pr_auc", "recall", "specificity")


def fold_splits(table: pd.DataFrame, k: int, seed: int = 0) -> list[dict]:
    """One split per fold: that fold is the test set, validation patients come from the rest."""
    folds = splitting.patient_folds(table, k, seed)
    out = []
    for i, test in enumerate(folds):
        rest = table[~table["patient"].isin(test)]
        inner = splitting.patient_split(rest, val_fraction=0.15, test_fraction=0.0, seed=seed + i)
        out.append(
            {
                "method": "patient",
                "seed": seed,
                "fold": i,
                "train": inner["train"],
                "val": inner["val"],
                "test": sorted(test),
            }
        )
    return out


def cross_validate(
    cfg: TrainConfig,
    folds: int = 5,
    n_boot: int = 1000,
    tta: bool = False,
    fold_seed: int | None = None,
) -> dict:
    """Train and test ``cfg`` on every fold; writes ``cv.json`` and ``cv.md`` under ``cfg.out``.

    A fold already finished (its ``fold.json`` written) is read back, not retrained, so a
    killed cross-validation resumes at the fold it was in. ``fold_seed`` (default
    ``cfg.seed``) draws the folds: runs that differ only in ``cfg.seed`` but share it test
    the same patients, so their fold models can be ensembled.
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_patch_data(cfg.data, cfg.cache_dir)
    fold_seed = cfg.seed if fold_seed is None else fold_seed
    per_fold, pooled = [], []
    for split in fold_splits(data.table[data.ok], folds, fold_seed):
        fold_dir = out / f"fold{split['fold']}"
        done = fold_dir / "fold.json"
        if done.exists() and json.loads(done.read_text())["key"] == _fold_key(cfg, split, tta):
            logger.info("fold %d: already done, read from %s", split["fold"], done)
            per_fold.append(json.loads(done.read_text())["result"])
        else:
            per_fold.append(_run_fold(cfg, split, fold_dir, tta))
        pooled.append(pd.read_csv(fold_dir / "eval" / "predictions.csv", dtype={"patient": str}))
    result = summarize_folds(per_fold, pd.concat(pooled, ignore_index=True), n_boot, cfg.seed)
    result.update(config=dataclasses.asdict(cfg), folds=folds, fold_seed=fold_seed, tta=tta)
    (out / "cv.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "cv.md").write_text(markdown_table([result], [cfg.recipe]) + "\n")
    return result


def _run_fold(cfg: TrainConfig, split: dict, fold_dir: Path, tta: bool) -> dict:
    """Train and evaluate one fold; its summary is also written to ``fold_dir/fold.json``."""
    fold_dir.mkdir(exist_ok=True)
    split_path = splitting.save_splits(split, fold_dir / "fold_split.json")
    fold_cfg = dataclasses.replace(cfg, out=str(fold_dir), split=str(split_path))
    start = time.perf_counter()
    summary = train(fold_cfg)
    minutes = (time.perf_counter() - start) / 60
    m = evaluate(
        fold_dir / "best.pt",
        cfg.data,
        fold_dir / "eval",
        split="test",
        tta=tta,
        n_boot=0,
    )
    result = {
        "fold": split["fold"],
        "test_patients": split["test"],
        "train_minutes": minutes,
        "best_epoch": summary["best_epoch"],
        **{k: m[k] for k in HEADLINE},
        "threshold": m["threshold"],
    }
    logger.info(
        "fold %d: AUC %.4f, balanced accuracy %.4f, F1 %.4f (%.1f min)",
        split["fold"],
        m["auc"] or float("nan"),
        m["balanced_accuracy"],
        m["f1"],
        minutes,
    )
    done = {"key": _fold_key(cfg, split, tta), "result": result}
    (fold_dir / "fold.json").write_text(json.dumps(done, indent=2) + "\n")
    return result


def _fold_key(cfg: TrainConfig, split: dict, tta: bool) -> dict:
    """What a finished fold must match to be reused: the config, its patients, TTA."""
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "threads")}
    return json.loads(json.dumps({"config": config, "split": split, "tta": tta}, default=str))


def summarize_folds(per_fold: list[dict], pooled: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """Mean ± std over folds, and pooled test predictions with patient-clustered CIs."""
    y, prob = pooled["label"].to_numpy(), pooled["prob_idc"].to_numpy()
    patients = pooled["patient"].to_numpy()
    # Each fold's predictions were thresholded by that fold's model: keep those decisions.
    pred = pooled["pred"].to_numpy()

    pooled_m = metrics.binary_metrics(y, prob)
    decided = _decision_metrics(y, pred)
    ci = {
        "auc": list(
            metrics.bootstrap_ci(
                y,
                prob,
                patients,
                lambda yy, pp: metrics.binary_metrics(yy, pp)["auc"],
                n_boot=n_boot,
                seed=seed,
            )
        )
    }
    for key in ("balanced_accuracy", "f1"):
        ci[key] = list(
            metrics.bootstrap_ci(
                y,
                pred.astype(float),
                patients,
                lambda yy, pp, k=key: _decision_metrics(yy, pp)[k],
                n_boot=n_boot,
                seed=seed,
            )
        )
    return {
        "per_fold": per_fold,
        "mean": {k: metrics.summarize([f[k] for f in per_fold]) for k in HEADLINE},
        "pooled": {
            "auc": pooled_m["auc"],
            "pr_auc": pooled_m["pr_auc"],
            **decided,
            "n": len(y),
            "n_patients": len(set(patients)),
        },
        "ci95": ci,
        "train_minutes": metrics.summarize([f["train_minutes"] for f in per_fold]),
    }


def _decision_metrics(y: np.ndarray, pred: np.ndarray) -> dict:
    m = metrics.binary_metrics(y, pred.astype(float), threshold=0.5)
    return {k: m[k] for k in ("balanced_accuracy", "f1", "recall", "specificity", "accuracy")}


def markdown_table(results: list[dict], names: list[str]) -> str:
    """One row per recipe: fold mean ± std, pooled value [95% CI], training minutes."""
    head = (
        "| recipe | AUC (folds) | AUC pooled [95% CI] | balanced acc. pooled [95% CI] "
        "| F1 pooled [95% CI] | train min/fold |"
    )
    lines = [head, "|" + "---|" * 6]
    for name, r in zip(names, results, strict=True):
        mean, pooled, ci = r["mean"], r["pooled"], r["ci95"]
        cells = [name, _pm(mean["auc"])]
        for key in ("auc", "balanced_accuracy", "f1"):
            lo, hi = ci.get(key, (None, None))
            cells.append(f"{_f(pooled[key])} [{_f(lo)}, {_f(hi)}]")
        cells.append(_f(r["train_minutes"]["mean"], 1))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(s: dict) -> str:
    return f"{_f(s['mean'])} ± {_f(s['std'])}"


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"
