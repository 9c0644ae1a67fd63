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
from ..models.card import numbers_table
from . import contexts
from .config import TrainConfig
from .contexts import ALPHA
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
    final: bool = False,
    alpha: float = ALPHA,
) -> dict:
    """Train and test ``cfg`` on every fold; writes ``cv.json`` and ``cv.md`` under ``cfg.out``.

    Every test patient is scored three times: with its neighbours (as a whole patient),
    from a random share of its patches (as a few uploads, ``contexts.score_thinned``) and
    each patch alone (as a lone upload). Results are given for all patients and for each
    data folder, with the fold models' own calibration, with calibration fitted on the
    other folds' out-of-fold predictions (``training.oof``) and calibrated and called by
    scoring context (``training.contexts``, at error ``alpha`` among the decided). With
    ``final``, a last model trains on every patient and takes its calibration, calls and
    threshold from all of them.

    A fold already finished (its ``fold.json`` written) is read back, not retrained, so a
    killed cross-validation resumes at the fold it was in. ``fold_seed`` (default
    ``cfg.seed``) draws the folds: runs that differ only in ``cfg.seed`` but share it test
    the same patients, so their fold models can be ensembled. The test patients of a split
    file in ``cfg.split`` take no part (`locked_patients`).
    """
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_patch_data(cfg.data, cfg.cache_dir)
    fold_seed = cfg.seed if fold_seed is None else fold_seed
    per_fold, fold_dirs = [], {}
    pooled: dict = {"context": [], "thinned": [], "lone": []}
    table = data.table[data.ok]
    locked = locked_patients(cfg)
    if locked:
        logger.info("%d patients locked away (the test list of %s)", len(locked), cfg.split)
        table = table[~table["patient"].isin(locked)]
    for split in fold_splits(table, folds, fold_seed):
        fold_dir = fold_dirs[split["fold"]] = out / f"fold{split['fold']}"
        done = fold_dir / "fold.json"
        if done.exists() and json.loads(done.read_text())["key"] == _fold_key(cfg, split, tta):
            logger.info("fold %d: already done, read from %s", split["fold"], done)
            per_fold.append(json.loads(done.read_text())["result"])
        else:
            per_fold.append(_run_fold(cfg, split, fold_dir, tta))
        for mode in pooled:
            pooled[mode].append(
                _fold_predictions(cfg, fold_dir, tta, mode).assign(fold=split["fold"])
            )
    pooled = {mode: pd.concat(frames, ignore_index=True) for mode, frames in pooled.items()}
    result = summarize_folds(per_fold, pooled["context"], n_boot, cfg.seed)
    from .oof import fold_decisions, train_final

    result["cohorts"] = cohort_results(cfg, pooled, n_boot)
    every = pd.concat([f.assign(scored=m) for m, f in pooled.items()], ignore_index=True)
    every.to_csv(out / "oof_predictions.csv", index=False)  # what `calibrate` refits on
    result["contexts"] = contexts.cohorts(every, cfg.threshold_rule, alpha, n_boot, cfg.seed)[0]
    per_patient_table(pooled).to_csv(out / "per_patient.csv", index=False, float_format="%.4f")
    result.update(config=dataclasses.asdict(cfg), folds=folds, fold_seed=fold_seed, tta=tta)
    if final:
        decided = fold_decisions(fold_dirs)
        result["final"] = train_final(cfg, every, decided, locked, result["contexts"], alpha)
    (out / "cv.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    text = markdown_table([result], [cfg.recipe]) + "\n\n" + cohort_table(result["cohorts"])
    text += "\n\nCalibrated and called by context, cross-fitted over the folds:\n\n"
    text += numbers_table(result["contexts"])
    (out / "cv.md").write_text(text + "\n")
    return result


def locked_patients(cfg: TrainConfig) -> set[str]:
    """Patients no fold may use: the "test" list of ``cfg.split`` when it names a split
    file (a lockbox kept from every recipe decision, or a demo patient kept unseen)."""
    if cfg.split in ("patient", "random"):
        return set()
    return set(splitting.load_splits(cfg.split)["test"])


def selection_bias(scores: np.ndarray, chosen: int | None = None) -> float:
    """How much choosing the best of several recipes on the same folds flatters it.

    Tibshirani & Tibshirani (Ann. Appl. Stat. 2009): with ``scores`` (folds, recipes),
    higher better, the recipe ``chosen`` (default: the best mean) was picked; in each fold
    the best recipe there beats it by some margin, and the mean margin estimates the
    optimism of the chosen recipe's cross-validated score. Subtract it for a
    selection-corrected score.
    """
    scores = np.asarray(scores, dtype=np.float64)
    chosen = int(np.argmax(scores.mean(0))) if chosen is None else chosen
    return float(np.mean(scores.max(1) - scores[:, chosen]))


def _fold_predictions(cfg: TrainConfig, fold_dir: Path, tta: bool, mode: str) -> pd.DataFrame:
    """The fold model's test predictions, with context or every patch alone (scored now
    if a fold finished before lone scoring existed, or before the predictions had the
    ``margin`` that ``training.oof`` fits on: their rounded probabilities lose it)."""
    where = fold_dir / {"context": "eval", "thinned": "eval_thinned", "lone": "eval_lone"}[mode]
    path = where / "predictions.csv"
    if mode == "thinned":
        if not path.exists():
            contexts.score_thinned(fold_dir / "best.pt", cfg.data, where, cfg.seed, tta)
        return pd.read_csv(path, dtype={"patient": str})
    stale = path.exists() and "margin" not in pd.read_csv(path, nrows=0).columns
    if stale:
        logger.warning("%s: written before margins were, scoring its patients again", path)
    if stale or not path.exists():
        evaluate(
            fold_dir / "best.pt", cfg.data, where, split="test", tta=tta, n_boot=0,
            context=mode == "context",
        )  # fmt: skip
    return pd.read_csv(path, dtype={"patient": str})


def cohort_results(cfg: TrainConfig, pooled: dict, n_boot: int) -> dict:
    """Pooled metrics per scoring mode ("context", "lone") and calibration ("fold": each
    fold model's own; "oof": cross-fitted on the other folds' margins in the same mode,
    thresholded as the scores with neighbours are, as the final model is calibrated), for
    all patients and for each data folder (several folders are told apart by the first
    part of the path)."""
    from .oof import cross_fitted

    out: dict = {}
    margins = {mode: pred["margin"].to_numpy(np.float64) for mode, pred in pooled.items()}
    context = (pooled["context"], margins["context"])
    for mode, pred in pooled.items():
        oof = cross_fitted(pred, margins[mode], cfg, None if mode == "context" else context)
        for calibration, frame in (("fold", pred), ("oof", oof)):
            cohorts = {"all": frame}
            if isinstance(cfg.data, list) and len(cfg.data) > 1:
                folder = frame["path"].str.split("/").str[0]
                cohorts |= {name: frame[folder == name] for name in sorted(folder.unique())}
            out[f"{mode}/{calibration}"] = {
                name: pooled_metrics(f, n_boot, cfg.seed) for name, f in cohorts.items()
            }
    return out


def per_patient_table(pooled: dict) -> pd.DataFrame:
    """One row per test patient and scoring mode: its patches, IDC share, AUC,
    sensitivity and specificity at its fold model's threshold."""
    rows = []
    for mode, pred in pooled.items():
        for patient, g in pred.groupby("patient"):
            y, decided = g["label"].to_numpy(), g["pred"].to_numpy().astype(bool)
            auc = metrics.binary_metrics(y, g["prob_idc"].to_numpy())["auc"]
            rows.append({
                "patient": patient, "folder": g["path"].iloc[0].split("/")[0], "scored": mode,
                "fold": int(g["fold"].iloc[0]), "n": len(g), "idc_share": y.mean(), "auc": auc,
                "sensitivity": decided[y == 1].mean() if (y == 1).any() else None,
                "specificity": (~decided[y == 0]).mean() if (y == 0).any() else None,
            })  # fmt: skip
    return pd.DataFrame(rows)


def pooled_metrics(pred: pd.DataFrame, n_boot: int, seed: int) -> dict:
    """AUC, balanced accuracy, F1 (of the decisions in ``pred["pred"]``) and ECE of pooled
    predictions, with patient-clustered bootstrap 95% CIs, and the mean AUC within a
    patient (against the pooled AUC, it shows how far scores fail to line up)."""
    y, prob, pred_ = (pred[c].to_numpy() for c in ("label", "prob_idc", "pred"))
    patients = pred["patient"].to_numpy()
    result = {
        "auc": metrics.binary_metrics(y, prob)["auc"],
        **_decision_metrics(y, pred_),
        "ece": metrics.expected_calibration_error(y, prob),
        "n": len(y),
        "n_patients": len(set(patients)),
    }
    within = metrics.per_patient_metrics(y, prob, patients, 0.5)
    aucs = [p["auc"] for p in within if p.get("auc") is not None]
    result["within_patient_auc"] = float(np.mean(aucs)) if aucs else None
    result["ci95"] = _cis(y, prob, pred_, patients, n_boot, seed)
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
    _fold_predictions(cfg, fold_dir, tta, "lone")
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
    ci = _cis(y, prob, pred, patients, n_boot, seed)
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


def _cis(y, prob, pred, patients, n_boot: int, seed: int) -> dict:
    """Patient-clustered bootstrap 95% CIs of AUC (of ``prob``) and of balanced accuracy
    and F1 (of the decisions ``pred``)."""
    if n_boot <= 0 or len(set(patients)) < 3:
        return {}

    ci = {
        "auc": list(
            metrics.bootstrap_ci(y, prob, patients, metrics.rank_auc, n_boot=n_boot, seed=seed)
        )
    }
    for key in ("balanced_accuracy", "f1"):
        ci[key] = list(
            metrics.bootstrap_ci(
                y, pred.astype(float), patients,
                lambda yy, pp, k=key: _decision_metrics(yy, pp)[k], n_boot=n_boot, seed=seed,
            )
        )  # fmt: skip
    return ci


def _decision_metrics(y: np.ndarray, pred: np.ndarray) -> dict:
    """Metrics of 0/1 decisions (counted directly: they run in every bootstrap resample)."""
    y, pred = np.asarray(y) == 1, np.asarray(pred) >= 0.5
    tp, fp = int((y & pred).sum()), int((~y & pred).sum())
    fn, tn = int((y & ~pred).sum()), int((~y & ~pred).sum())
    recall, specificity = tp / max(tp + fn, 1), tn / max(tn + fp, 1)
    return {
        "balanced_accuracy": (recall + specificity) / 2,
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "recall": recall,
        "specificity": specificity,
        "accuracy": (tp + tn) / max(y.size, 1),
    }


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


def cohort_table(cohorts: dict) -> str:
    """One row per scoring mode, calibration and cohort: pooled metrics [95% CI] and ECE."""
    head = (
        "| scored | calibrated on | patients | AUC [95% CI] | balanced acc. [95% CI] "
        "| F1 [95% CI] | ECE | AUC within a patient |"
    )
    lines = [head, "|" + "---|" * 8]
    for key, rows in cohorts.items():
        mode, calibration = key.split("/")
        for name, m in rows.items():
            cells = [
                "with neighbours" if mode == "context" else "each patch alone",
                "fold's validation" if calibration == "fold" else "other folds (OOF)",
                f"{name} ({m['n_patients']})",
            ]
            for k in ("auc", "balanced_accuracy", "f1"):
                lo, hi = m["ci95"].get(k, (None, None))
                cells.append(f"{_f(m[k])} [{_f(lo)}, {_f(hi)}]")
            cells += [_f(m["ece"]), _f(m["within_patient_auc"])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pm(s: dict) -> str:
    return f"{_f(s['mean'])} ± {_f(s['std'])}"


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"
