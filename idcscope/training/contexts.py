"""Calibration and calls by scoring context, fitted on out-of-fold predictions.

The same patch scores differently with its neighbours and without them: the model sees its
3x3 block and smooths its logits over the grid only where neighbours are there. So how a
score is calibrated, and where a call is safe, depends on how many of its 8 neighbours a
patch had (``data.grid.neighbour_counts``; alone counts as none). Each context of
:data:`CONTEXTS` gets its own temperature and logit bias (``calibration.fit_platt``) and its
own uncertain band, fitted on the cross-validation's out-of-fold predictions in which
neighbour availability varies as it does in use: whole patients, patients scored from a
random share of their patches (``thinned``, as a few uploaded patches are), and every patch
alone. One threshold rule, chosen on all of them calibrated, gives ``pred``.

The band is split conformal prediction, class-conditional (Mondrian by class) within each
context: a class enters a patch's prediction set when its non-smoothed conformal p-value
(Vovk et al. 2005; as ``crepes`` computes it, which the tests check) is at least that class's
level; a patch is decided when its set holds one class, and is uncertain otherwise. At a
level ``a_k`` at most ``a_k`` of class k's patches lose their class, so with ``a_k`` set to
``alpha`` times the share of class k that is decided (found by iterating), at most ``alpha``
of the decided patches of each class are called wrong: sensitivity and specificity among
the decided are at least 1 - alpha, on the patients it was fitted on. New patients differ
from those (a tumour-rich one scores low throughout), so each class's level aimed at is
the share of alpha that keeps the error within alpha on patients each fit did not see,
over the folds (`held_out_levels`). The two are held out apart: a carcinoma scored near 0
is missed whatever the IDC level, and a narrower no-IDC level, raising the edge where IDC
is called, only takes right IDC calls away (on the CV of the shipped recipe, one share for
both decided 16-40% of the scattered patches, one for each 36-43%). Patients are the unit
of exchange: every estimate of how the fit does is cross-fitted over the folds (patients),
never over patches.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..evaluation import metrics
from ..inference.calibration import probabilities
from ..models.schema import ModelMeta, call_codes
from .calibration import choose_threshold, fit_platt

# (name, fewest, most neighbours present); a patch scored alone counts as none.
CONTEXTS = (("alone", 0, 0), ("1-3 neighbours", 1, 3), ("4-6 neighbours", 4, 6),
            ("7-8 neighbours", 7, 8))  # fmt: skip
ALPHA = 0.05  # the largest share of each class's decided patches called wrong
# The other alphas a model's bands are fitted at too, so that a user picks one when scoring
# (``Predictor(alpha=)``, ``--alpha``) without the out-of-fold predictions to refit from.
ALPHAS = (0.01, 0.02, 0.05, 0.1, 0.2)
NEVER = (-1.0, 2.0)  # a band edge no probability crosses (finite: models store plain JSON)


def context_index(neighbours) -> np.ndarray:
    """The :data:`CONTEXTS` entry of each patch (NaN, scored alone, is "alone")."""
    n = np.nan_to_num(np.asarray(neighbours, dtype=np.float64), nan=0.0)
    return np.searchsorted([lo for _, lo, _ in CONTEXTS], n, side="right") - 1


def conformal_bound(scores: np.ndarray, level: float) -> float:
    """The largest non-conformity score whose non-smoothed conformal p-value,
    ``(#{calibration scores >= s} + 1) / (n + 1)``, is at least ``level``: a class is in a
    patch's set when its score is at most this (inf: always)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    m = math.ceil(level * (len(s) + 1) - 1 - 1e-9)  # calibration scores at least as large
    return float(s[m - 1]) if m >= 1 else math.inf


def conformal_band(prob: np.ndarray, y: np.ndarray, alpha: float | tuple = ALPHA) -> dict:
    """The uncertain band on calibrated P(IDC) of one context (see the module notes).

    IDC enters the set from ``1 - bound(1 - p of IDC patches)``, no IDC up to
    ``bound(p of benign patches)``; a patch is called IDC where only IDC is in its set,
    no IDC where only no IDC is. ``alpha``: the share of each class's decided patches
    called wrong, one for both or ``(no IDC, IDC)``. Returns ``{"band": [no_idc_below,
    idc_from], "levels": [level of no IDC, of IDC]}``; without both classes, no patch is
    decided (:data:`NEVER`).
    """
    prob, y = np.asarray(prob, dtype=np.float64), np.asarray(y)
    if not ((y == 1).any() and (y == 0).any()):
        return {"band": [NEVER[0], NEVER[1]], "levels": [0.0, 0.0]}
    alphas = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (2,))
    levels = [float(a) for a in alphas]
    for _ in range(100):  # each level shrinks with the share it decides: a fixed point
        idc_in = 1.0 - conformal_bound(1.0 - prob[y == 1], levels[1])
        benign_in = np.nextafter(conformal_bound(prob[y == 0], levels[0]), math.inf)
        band = [min(idc_in, benign_in), max(idc_in, benign_in)]
        decided = (prob < band[0]) | (prob >= band[1])
        new = [alphas[k] * decided[y == k].mean() for k in (0, 1)]
        if np.allclose(new, levels, rtol=0, atol=1e-9):
            break
        levels = new
    band = np.clip(band, *NEVER)  # a class always in the set: the other is never called
    return {"band": [float(band[0]), float(band[1])], "levels": [float(v) for v in levels]}


def fit_contexts(margin, y, neighbours, alpha: float = ALPHA, groups=None) -> list[dict]:
    """Per context: temperature and bias fitted on its logit margins, and its band at
    ``alpha`` (``band``), and at each of :data:`ALPHAS` (``bands``: ``{"alpha", "band"}``).

    With ``groups`` (each row's patient fold), the band's own targets, one per class
    (``target``: no IDC, IDC), are the shares of ``alpha`` that keep each class's error
    among the decided within ``alpha`` on the groups it was not fitted on
    (`held_out_levels`): patients differ, and a band exact on the ones it saw errs more
    on new ones.
    """
    margin, y = np.asarray(margin, dtype=np.float64), np.asarray(y)
    groups = None if groups is None else np.asarray(groups)
    where = context_index(neighbours)
    out = []
    for i, (name, lo, hi) in enumerate(CONTEXTS):
        rows = where == i
        t, b = fit_platt(margin[rows], y[rows])
        prob = probabilities(margin[rows], t, b)
        fits = {}
        for a in sorted({alpha, *ALPHAS}):
            levels = (a, a)
            if groups is not None and len(np.unique(groups[rows])) > 1:
                levels = held_out_levels(margin[rows], y[rows], groups[rows], a)
            fits[a] = {**conformal_band(prob, y[rows], levels), "target": list(levels)}
        out.append({
            "name": name, "neighbours": [lo, hi], "temperature": t, "logit_bias": b,
            **fits[alpha], "alpha": alpha, "n": int(rows.sum()), "n_idc": int(y[rows].sum()),
            "bands": [{"alpha": a, "band": f["band"]} for a, f in fits.items()],
        })  # fmt: skip
    return out


SHARES = (1.0, 0.8, 0.65, 0.5, 0.4, 0.3, 0.2)  # of alpha: each class's targets tried
PAIRS = tuple(itertools.product(SHARES, SHARES))  # (no IDC's, IDC's): `held_out_levels`


def held_out_levels(
    margin: np.ndarray, y: np.ndarray, groups: np.ndarray, alpha: float
) -> tuple[float, float]:
    """``alpha`` times the shares (of :data:`PAIRS`: no IDC's, IDC's) whose bands, each
    fitted on all groups but one (calibration included) and applied to that one, decide
    the most patches while calling at most ``alpha`` of each class's decided patches
    wrong, pooled over the groups; where no pair does, the pair that falls short of
    ``1 - alpha`` least (sensitivity's and specificity's shortfalls summed)."""
    held = []
    for g in np.unique(groups):
        mine = groups == g
        t, b = fit_platt(margin[~mine], y[~mine])
        held.append((mine, probabilities(margin[~mine], t, b), probabilities(margin[mine], t, b)))
    best = None
    for shares in PAIRS:
        call = np.full(len(y), -1.0)
        for mine, fitted_on, applied_to in held:
            fit = conformal_band(fitted_on, y[~mine], (alpha * shares[0], alpha * shares[1]))
            call[mine] = call_codes(applied_to, *fit["band"])
        m = metrics.call_metrics(y, call)
        short = sum(max(0.0, 1 - alpha - (1.0 if v is None else v))
                    for v in (m["sensitivity_decided"], m["specificity_decided"]))  # fmt: skip
        if best is None or (short, -m["coverage"]) < best[0]:
            best = ((short, -m["coverage"]), shares)
    return alpha * best[1][0], alpha * best[1][1]


def decide(
    contexts: list[dict], frame: pd.DataFrame, threshold: float, alpha: float | None = None
) -> pd.DataFrame:
    """``frame`` (its ``margin`` and ``neighbours``) calibrated, thresholded and called as
    a model with these ``contexts`` does it (``ModelMeta.decisions``; ``alpha``: the band
    fitted at that alpha, None: their own)."""
    meta = ModelMeta({}, [], {}, contexts=contexts, threshold=threshold)
    d = meta.decisions(frame["neighbours"].to_numpy(np.float64), alpha)
    prob = probabilities(frame["margin"].to_numpy(np.float64), d.temperature, d.logit_bias)
    return frame.assign(
        prob_idc=prob, pred=(prob >= threshold).astype(int),
        call=call_codes(prob, d.no_idc_below, d.idc_from),
    )  # fmt: skip


def fit_decisions(pooled: pd.DataFrame, threshold_rule: tuple, alpha: float = ALPHA) -> dict:
    """``contexts`` and the ``threshold`` (``threshold_rule``: ``choose_threshold``'s
    method and target) fitted on OOF predictions of every scoring mode, ``pooled`` (with
    its ``fold`` column, each band's target is held out over the folds' patients)."""
    y = pooled["label"].to_numpy()
    groups = pooled["fold"].to_numpy() if "fold" in pooled else None
    contexts = fit_contexts(pooled["margin"], y, pooled["neighbours"], alpha, groups)
    calibrated = decide(contexts, pooled, 0.5)["prob_idc"].to_numpy()
    return {"contexts": contexts, "threshold": choose_threshold(y, calibrated, *threshold_rule)}


def cross_fitted(pooled: pd.DataFrame, threshold_rule: tuple, alpha: float = ALPHA):
    """Each fold's rows decided by :func:`fit_decisions` on the other folds' patients:
    how the fit does on patients it never saw."""
    return cross_fitted_at(pooled, threshold_rule, alpha, [None])[None]


def cross_fitted_at(
    pooled: pd.DataFrame, threshold_rule: tuple, alpha: float, alphas
) -> dict[float | None, pd.DataFrame]:
    """:func:`cross_fitted`, called with the band of each alpha of ``alphas`` (None: the
    fit's own, at ``alpha``) from the same fits: ``{alpha: decided frame}``."""
    parts: dict = {a: [] for a in alphas}
    for fold in sorted(pooled["fold"].unique()):
        mine = pooled["fold"] == fold
        fit = fit_decisions(pooled[~mine], threshold_rule, alpha)
        for a in alphas:
            parts[a].append(decide(fit["contexts"], pooled[mine], fit["threshold"], a))
    return {a: pd.concat(p).loc[pooled.index] for a, p in parts.items()}


def calls_by_alpha(by_alpha: dict) -> dict:
    """Per alpha of ``by_alpha`` (:func:`cross_fitted_at`'s frames), per scoring mode and
    data folder: the share decided and sensitivity and specificity among the decided (what
    choosing another ``--alpha`` does to patients the fit never saw)."""
    out = {}
    for a, decided in by_alpha.items():
        folder = decided["path"].str.split("/").str[0]
        out[f"{a:g}"] = {
            f"{mode}/{name}": metrics.call_metrics(f["label"].to_numpy(), f["call"].to_numpy())
            for (mode, name), f in decided.groupby([decided["scored"], folder])
        }
    return out


def report(frame: pd.DataFrame, n_boot: int = 0, seed: int = 0) -> dict:
    """How decided predictions meet their labels: AUC, ECE, balanced accuracy and F1 at the
    threshold, and the calls (coverage, sensitivity and specificity among the decided),
    with patient-clustered 95% CIs when ``n_boot`` (ECE's too: a few whole patients hold most
    of a folder's patches, and how well they are calibrated varies from patient to patient)."""
    y, prob = frame["label"].to_numpy(), frame["prob_idc"].to_numpy()
    call, patients = frame["call"].to_numpy(np.float64), frame["patient"].to_numpy()
    at = metrics.binary_metrics(y, frame["pred"].to_numpy(np.float64), 0.5)
    out = {
        "n": len(frame), "n_patients": len(set(patients)),
        "auc": metrics.binary_metrics(y, prob)["auc"],
        "ece": metrics.expected_calibration_error(y, prob),
        "balanced_accuracy": at["balanced_accuracy"], "f1": at["f1"],
        **metrics.call_metrics(y, call),
    }  # fmt: skip
    if n_boot and len(set(patients)) >= 3:
        out["ci95"] = {
            key: list(metrics.bootstrap_ci(y, prob, patients, fn, n_boot, seed))
            for key, fn in (("auc", metrics.rank_auc), ("ece", metrics.expected_calibration_error))
        } | metrics.call_cis(y, call, patients, n_boot, seed)
    return out


def cohorts(pooled: pd.DataFrame, threshold_rule: tuple, alpha: float, n_boot: int, seed: int):
    """The cross-fitted decisions (:func:`cross_fitted`) of ``pooled`` (OOF predictions of
    every scoring mode, its ``scored`` column) reported per mode and data folder (the
    first part of each path), per context, and at every alpha of :data:`ALPHAS`
    (:func:`calls_by_alpha`, from the same fits); returns ``(reports, decided frame)``."""
    frames = cross_fitted_at(pooled, threshold_rule, alpha, [None, *ALPHAS])
    decided = frames.pop(None)
    folder = decided["path"].str.split("/").str[0]
    out: dict = {"by_mode": {}, "by_context": {}}
    for (mode, name), frame in decided.groupby([decided["scored"], folder]):
        out["by_mode"][f"{mode}/{name}"] = report(frame, n_boot, seed)
    for mode, frame in decided.groupby("scored"):
        out["by_mode"][f"{mode}/all"] = report(frame, n_boot, seed)
    where = context_index(decided["neighbours"])
    for i, (name, _, _) in enumerate(CONTEXTS):
        if (where == i).any():
            out["by_context"][name] = report(decided[where == i], n_boot, seed)
    out["by_alpha"] = calls_by_alpha(frames)
    return out, decided


THINNED = (0.05, 0.6)  # the share of each patient's patches kept, drawn per patient


def score_thinned(checkpoint, data, out_dir, seed: int = 0, tta: bool = False) -> Path:
    """The checkpoint's test patients scored from a random share of each one's patches
    (drawn per patient from :data:`THINNED`), as a few uploaded patches are: each patch
    with the neighbours that were kept. Writes ``predictions.csv`` as ``evaluate`` does."""
    from ..data import splits as splitting
    from ..data.manifest import index_datasets
    from ..inference.predictor import Predictor
    from ..inference.tables import PATCH_IDS, prediction_table

    predictor = Predictor(checkpoint, tta=tta)
    index = index_datasets(data, read_sizes=False)
    table = index.table[splitting.assign(index.table, predictor.models[0].splits) == "test"]
    rng = np.random.default_rng(seed)
    patients, which = np.unique(table["patient"].to_numpy(), return_inverse=True)
    share = rng.uniform(*THINNED, len(patients))[which]
    table = table[rng.random(len(table)) < share].reset_index(drop=True)
    scored = predictor.score_files(table, index.root, desc="thinned")
    ok = scored.ok
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label = table["label"].to_numpy()[ok]
    rows = prediction_table(table[PATCH_IDS][ok], scored.verdicts.take(ok), 0.5, label=label)
    rows.to_csv(out / "predictions.csv", index=False)
    return out / "predictions.csv"
