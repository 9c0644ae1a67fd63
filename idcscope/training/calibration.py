"""Post-hoc calibration on validation patients: temperature scaling and operating thresholds.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar T fitted to minimise
the validation negative log-likelihood; `fit_platt` adds a logit bias (Platt scaling), which
undoes the prior of class-balanced training. Neither can change the ranking (AUC), only how
confident the probabilities are; models trained on few patients are typically overconfident
on new ones (T > 1). Apply them with ``probabilities(logits, temperature=T, bias=b)``.
`fit_posthoc` fits both with the threshold, the one fit of validation patients
(``posthoc``) and of out-of-fold predictions (``oof``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import expit

from ..data.grid import STEP, smooth
from ..evaluation.metrics import (
    expected_calibration_error,
    threshold_for_sensitivity,
    youden_threshold,
)
from ..inference.calibration import logit_margin, probabilities
from .config import TrainConfig

logger = logging.getLogger(__name__)

T_BOUNDS = (0.05, 20.0)
_EPS = 1e-12  # probability clip for the log-likelihood of hard 0/1 predictions


def fit_temperature(logits: Any, labels: Any, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """Temperature minimising the negative log-likelihood of ``softmax(logits / T)``.

    L-BFGS-B on log T within ``bounds``; the two-class likelihood depends only on the logit
    margin, so the loss and its gradient are exact closed forms.

    Args:
        logits: (N, 2) logits (array or tensor), or (N,) positive-class logits.
        labels: (N,) labels, 0 or 1.
        bounds: range of T.

    Returns:
        T; 1.0 when undefined (no samples, or a single class, where NLL falls without limit
        as T shrinks).
    """
    return _fit(logits, labels, bounds, with_bias=False)[0]


def fit_platt(
    logits: Any, labels: Any, bounds: tuple[float, float] = T_BOUNDS
) -> tuple[float, float]:
    """Temperature and logit bias minimising the NLL of ``sigmoid(margin / T + bias)``.

    Platt scaling in the temperature's terms. The bias is what a temperature cannot fix:
    a model trained on class-balanced batches believes IDC is as common as benign tissue,
    and its logits sit ``log(0.5 / 0.5) - log(p / (1 - p))`` too high where IDC makes up a
    share ``p`` of the tissue (about +0.9 at 28%). Arguments as `fit_temperature`; returns
    ``(1.0, 0.0)`` where that returns 1.0.
    """
    return _fit(logits, labels, bounds, with_bias=True)


def _fit(logits, labels, bounds, with_bias: bool) -> tuple[float, float]:
    d = logit_margin(logits)
    y = np.asarray(labels.cpu() if torch.is_tensor(labels) else labels).ravel()
    if d.size != y.size:
        raise ValueError(f"{d.size} logits but {y.size} labels")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0/1, got {np.unique(y)[:10].tolist()}")
    if not np.isfinite(d).all():
        raise ValueError("logits contain NaN or infinite values")
    if y.size == 0 or y.min() == y.max():
        logger.debug("calibration: %d samples of one class; using T = 1", y.size)
        return 1.0, 0.0
    sign = 2.0 * y - 1.0  # the margin, signed positive when right, is sign * (d / T + b)

    def nll_and_grad(u: np.ndarray) -> tuple[float, np.ndarray]:
        m = sign * (d * math.exp(-u[0]) + (u[1] if with_bias else 0.0))
        nll = np.logaddexp(0.0, -m).mean()  # mean softplus(-m) = -log sigmoid(m)
        g = expit(-m)
        grad = [float((g * sign * d * math.exp(-u[0])).mean()), float(-(g * sign).mean())]
        return float(nll), np.array(grad[: 1 + with_bias])  # d nll / d (log T, b)

    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    # Tight tolerances: few variables are cheap, and near-separable data has tiny gradients.
    res = minimize(
        nll_and_grad,
        np.zeros(1 + with_bias),
        jac=True,
        method="L-BFGS-B",
        bounds=[(lo, hi)] + [(None, None)] * with_bias,
        options={"ftol": 1e-14, "gtol": 1e-12},
    )
    t, b = float(np.exp(np.clip(res.x[0], lo, hi))), float(res.x[1]) if with_bias else 0.0
    logger.debug(
        "calibration T %.3f, bias %.3f: NLL %.4f -> %.4f",
        t,
        b,
        nll_and_grad(np.zeros(1 + with_bias))[0],
        res.fun,
    )
    return t, b


def _nll(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def calibration_report(
    y: Any, prob_before: Any, prob_after: Any, n_bins: int = 15
) -> dict[str, float]:
    """ECE, Brier score and NLL of P(IDC) before and after calibration.

    Args:
        y: labels, 0 or 1.
        prob_before: predicted probabilities before calibration.
        prob_after: the same after calibration.
        n_bins: equal-width bins of the ECE.

    Returns:
        ``{"n", "ece_before", "ece_after", "brier_before", "brier_after", "nll_before",
        "nll_after"}``, plain floats (NLL with probabilities clipped to [1e-12, 1 - 1e-12]).
    """
    report: dict[str, float] = {"n": int(np.asarray(y).size)}
    for when, prob in (("before", prob_before), ("after", prob_after)):
        # The ECE checks the inputs (shapes, 0/1 labels, finite probabilities).
        report[f"ece_{when}"] = expected_calibration_error(y, prob, n_bins=n_bins)
        yy, p = np.asarray(y, np.float64).ravel(), np.asarray(prob, np.float64).ravel()
        report[f"brier_{when}"] = float(np.mean((p - yy) ** 2))
        report[f"nll_{when}"] = _nll(yy, p)
    return report


def choose_threshold(
    y_val: Any, prob_val: Any, method: str = "youden", target: float | None = None
) -> float:
    """Decision threshold chosen on validation predictions.

    Args:
        y_val: validation labels, 0 or 1.
        prob_val: validation probabilities (after calibration, if any: thresholds are on
            the probabilities the model will output).
        method: "youden" (max sensitivity + specificity) or "sensitivity" (the highest
            threshold reaching ``target`` sensitivity).
        target: sensitivity to reach, for "sensitivity".

    Returns:
        The threshold; predict IDC when ``prob >= threshold``.
    """
    if method == "youden":
        return youden_threshold(y_val, prob_val)
    if method == "sensitivity":
        if target is None:
            raise ValueError('method "sensitivity" needs a target sensitivity, e.g. 0.95')
        return threshold_for_sensitivity(y_val, prob_val, target)
    raise ValueError(f"unknown threshold method {method!r}; choose from ['sensitivity', 'youden']")


def fit_posthoc(logits: Any, y: Any, cfg: TrainConfig, on: str) -> tuple[dict, np.ndarray]:
    """Temperature, logit bias (`fit_platt`) and threshold (`choose_threshold` with
    ``cfg.threshold`` and ``cfg.target_sensitivity``) fitted on logits and their labels.

    Args:
        logits: (N, 2) logits or (N,) logit margins, uncalibrated.
        y: labels, 0 or 1.
        cfg: how the threshold is chosen.
        on: what the scores are, for ``threshold_method`` ("validation patients").

    Returns:
        The checkpoint fields ``temperature``, ``logit_bias``, ``threshold``,
        ``threshold_method`` and ``calibration`` (`calibration_report`), and the calibrated
        probabilities. Without samples: T = 1, no bias, threshold 0.5, no report.
    """
    n = int(np.asarray(y).size)
    temperature, bias = fit_platt(logits, y)
    prob = probabilities(logits, temperature, bias)
    method = "youden" if cfg.threshold == "youden" else f"sensitivity {cfg.target_sensitivity}"
    fields = {
        "temperature": temperature,
        "logit_bias": bias,
        "threshold": choose_threshold(y, prob, cfg.threshold, cfg.target_sensitivity) if n else 0.5,
        "threshold_method": f"{method} on {on}",
        "calibration": calibration_report(y, probabilities(logits), prob) if n else {},
    }
    return fields, prob


# Spatial context: the width of the grid smoothing (``data.grid.smooth``) fitted as the
# temperature is, on the validation patients' logits.
SIGMAS = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)  # grid cells; the candidates fit_sigma tries


def fit_sigma(
    logits: np.ndarray,
    labels: np.ndarray,
    groups: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    step: int = STEP,
    sigmas: tuple[float, ...] = SIGMAS,
) -> tuple[float, dict[float, float]]:
    """The width whose smoothed, calibrated (`fit_platt`) logits give the lowest log-loss.

    Each candidate gets its own temperature and bias (smoothing changes how confident the logits
    are), so widths are compared at their best calibration. Returns the width and the
    log-loss of every candidate.
    """
    labels = np.asarray(labels, dtype=np.int64)
    losses = {}
    for sigma in sigmas:
        z = smooth(logits, groups, xs, ys, sigma, step)
        losses[float(sigma)] = _nll(labels, probabilities(z, *fit_platt(z, labels)))
    best = min(losses, key=lambda s: (losses[s], s))
    return best, losses
