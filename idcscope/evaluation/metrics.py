"""Evaluation metrics as pure functions of numpy arrays.

Every function returns plain Python (floats, ints, lists, ``None``) so results go straight into
JSON. Undefined values are ``None``, never NaN: a NaN in ``metrics.json`` reads as a number to
most tools and silently poisons averages across folds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, classification_report, roc_auc_score, roc_curve

logger = logging.getLogger(__name__)

MetricFn = Callable[[np.ndarray, np.ndarray], float | None]


def _check(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).ravel()
    p = np.asarray(prob, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but prob has {p.size}")
    if y.size == 0:
        raise ValueError("cannot compute metrics on zero samples")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true must be binary 0/1, got values {np.unique(y)[:10].tolist()}")
    if not np.isfinite(p).all():
        raise ValueError("prob contains NaN or infinite values")
    return y.astype(np.int64), p


def _div(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def _auc(y: np.ndarray, p: np.ndarray) -> float | None:
    return float(roc_auc_score(y, p)) if 0 < y.sum() < y.size else None


def rank_auc(y_true: Any, prob: Any) -> float | None:
    """ROC AUC from ranks (Mann-Whitney U, ties averaged): equal to scikit-learn's, several
    times faster, for bootstraps. None with a single class."""
    y, p = np.asarray(y_true).ravel() == 1, np.asarray(prob, np.float64).ravel()
    n1 = int(y.sum())
    n0 = y.size - n1
    if not n1 or not n0:
        return None
    ranks = rankdata(p)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def binary_metrics(y_true: Any, prob: Any, threshold: float = 0.5) -> dict[str, Any]:
    """Threshold-free and thresholded metrics for a binary classifier.

    Args:
        y_true: Labels, 0 or 1.
        prob: Predicted probability of the positive class.
        threshold: A sample is predicted positive when ``prob >= threshold``.

    Returns:
        A JSON-serialisable dict. ``auc`` is ``None`` when only one class is present and
        ``pr_auc`` when there are no positives; ratios with a zero denominator are 0.0.
        ``balanced_accuracy`` averages recall over the classes present in ``y_true`` (as
        sklearn does). ``confusion_matrix`` is ``[[tn, fp], [fn, tp]]``.
    """
    y, p = _check(y_true, prob)
    pred = p >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    n, n_pos = int(y.size), tp + fn
    precision, recall, specificity = _div(tp, tp + fp), _div(tp, n_pos), _div(tn, tn + fp)
    per_class = [r for r, present in ((recall, n_pos > 0), (specificity, n_pos < n)) if present]
    return {
        "auc": _auc(y, p),
        "pr_auc": float(average_precision_score(y, p)) if n_pos else None,
        "accuracy": _div(tp + tn, n),
        "balanced_accuracy": float(np.mean(per_class)),
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "threshold": float(threshold),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "n": n,
        "n_positive": n_pos,
        "majority_baseline_accuracy": max(n_pos, n - n_pos) / n,
        "brier": float(np.mean((p - y) ** 2)),
    }


def call_metrics(y_true: Any, call: Any) -> dict[str, Any]:
    """How three-way calls (1 IDC, 0 no IDC, -1 uncertain) meet the labels: the share
    decided (``coverage``, of all patches and of each class) and, among the decided,
    sensitivity and specificity (each class's error is one minus it); None where a class
    has no decided patch."""
    y, c = _check(y_true, call)
    decided, pos = c >= 0, y == 1

    def share(hits: np.ndarray, of: np.ndarray) -> float | None:
        return float(hits[of].mean()) if of.any() else None

    return {
        "coverage": float(decided.mean()),
        "coverage_idc": share(decided, pos),
        "coverage_no_idc": share(decided, ~pos),
        "sensitivity_decided": share(c == 1, pos & decided),
        "specificity_decided": share(c == 0, ~pos & decided),
        "n_decided": int(decided.sum()),
        "n_uncertain": int((~decided).sum()),
    }


def call_cis(y_true, call, patients, n_boot: int, seed: int = 0) -> dict[str, list]:
    """Patient-clustered bootstrap 95% CIs (`bootstrap_ci`) of the share decided and of
    sensitivity and specificity among the decided (`call_metrics`)."""
    return {
        key: list(bootstrap_ci(
            y_true, call, patients, lambda y, c, k=key: call_metrics(y, c)[k], n_boot, seed
        ))
        for key in ("coverage", "sensitivity_decided", "specificity_decided")
    }  # fmt: skip


def per_patient_metrics(
    y_true: Any, prob: Any, patients: Any, threshold: float = 0.5
) -> list[dict[str, Any]]:
    """Metrics for each patient separately, sorted by patient id as a string.

    A pooled AUC can hide that a model fails on particular patients (staining, scanner), so
    this breaks the evaluation down. Values that a patient's labels leave undefined are
    ``None``: ``auc`` for a single class, ``sensitivity`` without positives, ``specificity``
    without negatives.
    """
    y, p = _check(y_true, prob)
    ids = np.asarray([str(g) for g in np.asarray(patients).ravel()])
    if ids.size != y.size:
        raise ValueError(f"patients has {ids.size} values but y_true has {y.size}")
    rows = []
    for pid in sorted(set(ids.tolist())):
        mask = ids == pid
        yp, pp = y[mask], p[mask]
        pred = pp >= threshold
        pos, neg = yp == 1, yp == 0
        rows.append(
            {
                "patient": pid,
                "n": int(yp.size),
                "n_positive": int(pos.sum()),
                "auc": _auc(yp, pp),
                "sensitivity": float(pred[pos].mean()) if pos.any() else None,
                "specificity": float((~pred[neg]).mean()) if neg.any() else None,
                "accuracy": float(np.mean(pred == pos)),
                "mean_prob_negative": float(pp[neg].mean()) if neg.any() else None,
                "mean_prob_positive": float(pp[pos].mean()) if pos.any() else None,
            }
        )
    return rows


def youden_threshold(y_true: Any, prob: Any) -> float:
    """Threshold maximising Youden's J (sensitivity + specificity - 1) on the ROC curve.

    Ties go to the highest threshold. Returns 0.5 when undefined (a single class), and clips
    sklearn's leading ``inf`` threshold to 1.0 so the result is always a usable probability.
    """
    y, p = _check(y_true, prob)
    if not 0 < y.sum() < y.size:
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, p)
    return float(np.clip(thresholds[int(np.argmax(tpr - fpr))], 0.0, 1.0))


def threshold_for_sensitivity(y_true: Any, prob: Any, target: float) -> float:
    """Highest threshold whose sensitivity (with ``prob >= threshold``) is at least ``target``.

    Raising the threshold only loses positives, so this is the operating point with the best
    specificity that still meets a screening requirement such as 95% sensitivity.

    Raises:
        ValueError: ``target`` is outside [0, 1] or there are no positives.
    """
    y, p = _check(y_true, prob)
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target sensitivity must be in [0, 1], got {target}")
    pos = np.sort(p[y == 1])[::-1]
    if pos.size == 0:
        raise ValueError("sensitivity is undefined without positive samples")
    if target <= 0:
        return 1.0
    # Comparing k / n with the target avoids float surprises of ceil(target * n).
    k = int(np.argmax(np.arange(1, pos.size + 1) / pos.size >= target))
    return float(pos[k])


def classification_report_text(
    y_true: Any, pred: Any, class_names: Sequence[str] = ("no_idc", "idc")
) -> str:
    """sklearn's text classification report; both classes are listed even when absent."""
    return classification_report(
        np.asarray(y_true).ravel(),
        np.asarray(pred).ravel().astype(np.int64),
        labels=[0, 1],
        target_names=list(class_names),
        digits=3,
        zero_division=0,
    )


def _bins(p: np.ndarray, n_bins: int) -> np.ndarray:
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    # prob == 1.0 belongs in the last bin, not an extra one.
    return np.minimum((np.clip(p, 0.0, 1.0) * n_bins).astype(np.int64), n_bins - 1)


def expected_calibration_error(y_true: Any, prob: Any, n_bins: int = 15) -> float:
    """ECE over equal-width bins of the positive-class probability, weighted by bin size."""
    y, p = _check(y_true, prob)
    idx = _bins(p, n_bins)
    gap = np.abs(np.bincount(idx, p - y, minlength=n_bins))  # per-bin sum of (prob - label)
    return float(gap.sum() / y.size)


def reliability_curve(y_true: Any, prob: Any, n_bins: int = 15) -> dict[str, list]:
    """Per-bin mean predicted probability and observed positive frequency.

    Returns:
        Dict of equal-length lists ``bin_centers``, ``mean_predicted``, ``observed_frequency``
        (``None`` for empty bins) and ``counts``, plus ``bin_edges`` (``n_bins + 1`` values).
    """
    y, p = _check(y_true, prob)
    idx = _bins(p, n_bins)
    counts = np.bincount(idx, minlength=n_bins)
    sum_p = np.bincount(idx, p, minlength=n_bins)
    sum_y = np.bincount(idx, y, minlength=n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {
        "bin_edges": edges.tolist(),
        "bin_centers": ((edges[:-1] + edges[1:]) / 2).tolist(),
        "mean_predicted": [float(s / c) if c else None for s, c in zip(sum_p, counts, strict=True)],
        "observed_frequency": [
            float(s / c) if c else None for s, c in zip(sum_y, counts, strict=True)
        ],
        "counts": counts.tolist(),
    }


def bootstrap_ci(
    y_true: Any,
    prob: Any,
    groups: Any,
    metric_fn: MetricFn,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float | None, float | None]:
    """Percentile confidence interval from a patient-clustered bootstrap.

    Patches of one patient are strongly correlated, so resampling patches would give far too
    narrow intervals; whole groups are drawn with replacement and their samples concatenated.

    Args:
        y_true: Labels, 0 or 1.
        prob: Predicted probability of the positive class.
        groups: Group (patient) id of each sample.
        metric_fn: ``metric_fn(y_true, prob)`` returning a float, or ``None`` when the
            resample leaves it undefined (such resamples are skipped).
        n_boot: Number of resamples.
        seed: Seed of the resampling generator.
        alpha: 1 - confidence level.

    Returns:
        ``(low, high)``, or ``(None, None)`` when no resample gave a value.
    """
    y, p = _check(y_true, prob)
    g = np.asarray(groups).ravel()
    if g.size != y.size:
        raise ValueError(f"groups has {g.size} values but y_true has {y.size}")
    members = [np.flatnonzero(g == u) for u in np.unique(g)]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        v = metric_fn(y[idx], p[idx])
        if v is not None and math.isfinite(v):
            values.append(v)
    if not values:
        logger.warning("bootstrap: metric undefined in all %d resamples", n_boot)
        return None, None
    if len(values) < n_boot:
        logger.debug("bootstrap: skipped %d undefined resamples", n_boot - len(values))
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def summarize(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean, sample std (ddof=1; 0.0 for one value), min and max, ignoring ``None`` and NaN.

    Returns:
        Dict with ``mean``, ``std``, ``min``, ``max`` (all ``None`` when nothing is left) and
        ``n``, the number of values used.
    """
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(v.size),
    }
