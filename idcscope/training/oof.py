"""Out-of-fold decisions: calibration and threshold from every patient, and the final model.

Cross-validation scores each patient once, by a model that never saw it. Those out-of-fold
(OOF) predictions of all patients decide what a few validation patients decide otherwise:
the temperature, the logit bias and the threshold, fitted as on validation patients
(``calibration.fit_posthoc``) on the uncalibrated logit margins the fold models wrote (the
``margin`` column of ``predictions.csv``), never on their rounded probabilities. Their own
honest estimate is cross-fitted: each fold's patients are calibrated by a fit on the other
folds' patients.
The final model then trains on every patient, validation patients included, and takes the
OOF fit (`train_final`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..data import splits as splitting
from ..data.grid import STEP
from ..evaluation import metrics
from ..inference.calibration import probabilities
from ..models.checkpoint import read_meta, update_checkpoint
from . import contexts
from .calibration import fit_posthoc
from .config import TrainConfig
from .contexts import ALPHA

logger = logging.getLogger(__name__)


def fold_decisions(fold_dirs: dict[int, Path]) -> dict[int, dict]:
    """What each fold model's validation patients decided, read once from its checkpoint:
    the context ``sigma`` and the ``epoch`` kept."""
    out = {}
    for fold, fold_dir in fold_dirs.items():
        meta = read_meta(fold_dir / "best.pt")
        out[fold] = {
            "sigma": float(meta.context.get("sigma", 0.0)),
            "epoch": int(meta.epoch),
        }
    return out


def fit_decision(margin: np.ndarray, y: np.ndarray, cfg: TrainConfig) -> dict:
    """Temperature, logit bias and threshold fitted on OOF margins by `fit_posthoc`, the
    fit ``posthoc`` makes on validation patients, with the calibration before and after."""
    return fit_posthoc(margin, y, cfg, f"out-of-fold predictions of {len(y)} patches")[0]


def cross_fitted(
    pred: pd.DataFrame, margin: np.ndarray, cfg: TrainConfig, threshold_from: tuple | None = None
) -> pd.DataFrame:
    """``pred`` with each fold's patients calibrated and thresholded by `fit_decision` on
    the other folds: an honest estimate of deciding on OOF predictions.

    ``threshold_from`` (``(pred, margin)`` of another scoring of the same folds) takes the
    threshold from that scoring's fit instead: lone patches have a calibration of their own
    (``lone_calibration``) but share the threshold on P(IDC) with patches scored with
    their neighbours, as the Predictor applies them.
    """
    out = pred.copy()
    y, folds = pred["label"].to_numpy(), pred["fold"].to_numpy()
    for fold in np.unique(folds):
        mine = folds == fold
        fit = fit_decision(margin[~mine], y[~mine], cfg)
        threshold = fit["threshold"]
        if threshold_from is not None:
            t_pred, t_margin = threshold_from
            others = t_pred["fold"].to_numpy() != fold
            threshold = fit_decision(t_margin[others], t_pred["label"].to_numpy()[others], cfg)[
                "threshold"
            ]
        prob = probabilities(margin[mine], fit["temperature"], fit["logit_bias"])
        out.loc[mine, "prob_idc"] = prob
        out.loc[mine, "pred"] = (prob >= threshold).astype(int)
    return out


def train_final(
    cfg: TrainConfig,
    pooled: pd.DataFrame,
    folds: dict[int, dict],
    locked=(),
    reports: dict | None = None,
    alpha: float = ALPHA,
) -> dict:
    """Train on every patient into ``cfg.out/final``; decisions come from the OOF fit.

    ``pooled`` holds the OOF predictions (with their ``margin`` and ``neighbours``) of
    every scoring mode (its ``scored`` column): all of them give the calibration and call
    of each context and the threshold (``contexts.fit_decisions``), with what
    ``reports`` (``contexts.cohorts``, cross-fitted) measured of each context; "context"
    ones (with neighbours) the model-wide temperature and bias, "lone" ones the
    ``lone_calibration``, for an idcscope that reads no contexts.
    The context width is the median of the fold models' (``folds``, `fold_decisions`; each
    chosen on its validation patients). ``locked`` patients (kept out of the folds) are its
    test patients. A finished final model is not trained again (its decisions are refitted,
    which costs a second), a killed one resumes.
    """
    from .train import train

    out = Path(cfg.out) / "final"
    out.mkdir(parents=True, exist_ok=True)
    pred = pooled[pooled["scored"] == "context"]
    patients = sorted(pred["patient"].astype(str).unique())
    test = sorted(map(str, locked))
    split = {"method": "patient", "seed": cfg.seed, "train": patients, "val": [], "test": test}
    split_path = splitting.save_splits(split, out / "final_split.json")
    epochs = cfg.epochs
    if cfg.keep == "val_loss":  # nothing to watch: stop where the folds were best
        epochs = int(np.median([f["epoch"] for f in folds.values()])) + 1
    final_cfg = dataclasses.replace(
        cfg, out=str(out), split=str(split_path), keep="last", epochs=epochs
    )
    done = out / "final.json"
    key = json.loads(json.dumps([dataclasses.asdict(final_cfg), split], default=str))
    before = json.loads(done.read_text()) if done.exists() else {}
    if before.get("config") == key:
        logger.info("final model: already trained (%s)", done)
    else:  # a killed final run resumes; one finished under another config starts again
        train(final_cfg, resume=(out / "last.pt").exists() and not done.exists())
        before = {}
    margin, y = pred["margin"].to_numpy(np.float64), pred["label"].to_numpy()
    sigmas = [f["sigma"] for f in folds.values()]
    fit = fit_decision(margin, y, cfg)
    prob = probabilities(margin, fit["temperature"], fit["logit_bias"])
    fields = fit | {
        "context": {"sigma": float(np.median(sigmas)), "step": STEP, "fold_sigmas": sigmas},
        "oof_metrics": {"with_neighbours": metrics.binary_metrics(y, prob, fit["threshold"])},
    }
    lone = pooled[pooled["scored"] == "lone"]
    if len(lone):
        lone_margin = lone["margin"].to_numpy(np.float64)
        lone_fit = fit_decision(lone_margin, lone["label"].to_numpy(), cfg)
        fields["lone_calibration"] = {
            k: lone_fit[k] for k in ("temperature", "logit_bias", "calibration")
        }
    fields |= _context_fields(cfg.threshold_rule, pooled, reports or {}, alpha)
    fields["oof_metrics"] |= reports or {}
    fields["input_check"] = before.get("fields", {}).get("input_check") or _input_check(
        cfg, patients
    )  # fitted once per trained model: refitting the decisions must stay quick
    for name in ("best.pt", "last.pt"):
        update_checkpoint(out / name, **fields)
    done.write_text(json.dumps({"config": key, "fields": fields}, indent=2) + "\n")
    logger.info(
        "final model on %d patients: temperature %.3f, bias %.3f, threshold %.3f (OOF)",
        len(patients), fields["temperature"], fields["logit_bias"], fields["threshold"],
    )  # fmt: skip
    return fields


def _context_fields(rule: tuple, pooled: pd.DataFrame, reports: dict, alpha: float) -> dict:
    """``contexts`` (each with what the cross-fitted ``reports`` measured of it) and the
    threshold chosen by ``rule`` (``TrainConfig.threshold_rule``) on every scoring mode
    calibrated."""
    fit = contexts.fit_decisions(pooled, rule, alpha)
    measured = reports.get("by_context", {})
    keep = ("auc", "ece", "coverage", "sensitivity_decided", "specificity_decided", "n_patients")
    for c in fit["contexts"]:
        c["measured"] = {k: measured[c["name"]][k] for k in keep} if c["name"] in measured else {}
    method = "youden" if rule[0] == "youden" else f"sensitivity {rule[1]}"
    return {
        "contexts": fit["contexts"],
        "threshold": fit["threshold"],
        "threshold_method": f"{method} on out-of-fold predictions of every context, calibrated",
    }


def refit(oof_csv: str | Path, rule: tuple, alpha: float = ALPHA, n_boot: int = 1000) -> dict:
    """The fields that calibrate and call by context (``contexts``, ``threshold``,
    ``threshold_method``, ``oof_metrics``) fitted on a cross-validation's out-of-fold
    predictions (its ``oof_predictions.csv``, every scoring mode), with the threshold
    chosen by ``rule`` (``(method, target sensitivity)``), and measured cross-fitted."""
    path = Path(oof_csv)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no out-of-fold predictions (written by `idcscope cv`)")
    pooled = pd.read_csv(path, dtype={"patient": str})
    missing = {"label", "margin", "neighbours", "fold", "scored", "patient", "path"} - set(pooled)
    if missing:
        raise ValueError(
            f"{path}: not out-of-fold predictions of idcscope cv (no {sorted(missing)})"
        )
    reports = contexts.cohorts(pooled, rule, alpha, n_boot, 0)[0]
    return _context_fields(rule, pooled, reports, alpha) | {"oof_metrics": reports}


def _input_check(cfg: TrainConfig, patients: list[str]) -> dict:
    """The final model's input check, fitted on its training patients' patches."""
    from ..data.dataset import load_patch_data
    from .inputfit import fit_model_check

    data = load_patch_data(cfg.data, cfg.cache_dir)
    rows = data.rows(data.table["patient"].astype(str).isin(patients).to_numpy())
    return fit_model_check(data, rows, seed=cfg.seed)


def calibrate_model(
    model: str | Path,
    oof_csv: str | Path,
    alpha: float = ALPHA,
    card: str | None = None,
    spread: list[str | Path] = (),
) -> dict:
    """Refit a made model's calibration, calls and threshold by context (`refit`) on the
    out-of-fold predictions of a cross-validation of its recipe, and write them into it
    (``models.checkpoint.update_model``); its own threshold rule chooses the threshold.
    ``spread``: cv folders of the same recipe under other training seeds; with the
    cross-validation ``oof_csv`` is in, their range (``selection.seed_spread``) goes into
    ``oof_metrics["seed_spread"]``. ``card`` (a model folder's) is written again with the
    numbers (``models.card``)."""
    from ..models.bundle import is_bundle, write_card
    from ..models.card import fill_card
    from ..models.checkpoint import read_meta, update_model
    from .selection import seed_spread

    recipe = read_meta(model).config
    rule = (recipe.get("threshold", "youden"), recipe.get("target_sensitivity", 0.9))
    fields = refit(oof_csv, rule, alpha)
    if spread:
        runs = [Path(oof_csv).parent, *spread]
        fields["oof_metrics"]["seed_spread"] = seed_spread(runs, alpha)
    update_model(model, **fields)
    if card is not None:
        if not is_bundle(model):
            raise ValueError(f"{model}: only a model folder has a card")
        write_card(model, fill_card(card, read_meta(model)))
    return fields
