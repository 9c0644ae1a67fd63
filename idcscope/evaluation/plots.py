"""Evaluation figures built on the matplotlib object API.

Every function draws into ``ax`` when given one (so figures compose into panels) or creates a
fresh :class:`~matplotlib.figure.Figure`, and returns the figure. Nothing touches
``matplotlib.pyplot``: no global state, no GUI backend, safe in workers and tests.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import auc as area_under
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

from idcscope.evaluation.metrics import expected_calibration_error, reliability_curve

logger = logging.getLogger(__name__)

_ACCENT = "#1f5f99"


def _prepare_ax(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is None:
        fig = Figure(figsize=figsize, layout="constrained")
        return fig, fig.add_subplot()
    return ax.figure.figure, ax  # .figure twice: ax may live in a SubFigure


def _arrays(y_true: Any, prob: Any) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(y_true).ravel().astype(np.int64), np.asarray(prob, dtype=float).ravel()


def _unit_square(ax: Axes) -> None:
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)


def _undefined(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4")


def plot_roc(
    y_true: Any,
    prob: Any,
    ax: Axes | None = None,
    label: str | None = None,
    threshold: float | None = None,
) -> Figure:
    """ROC curve with its AUC in the legend, the chance diagonal and an optional operating point.

    Args:
        y_true: Labels, 0 or 1.
        prob: Predicted probability of the positive class.
        ax: Axes to draw into; a new figure when ``None``.
        label: Curve name, prefixed to the AUC in the legend.
        threshold: Marks the point ``prob >= threshold`` lands on.
    """
    fig, ax = _prepare_ax(ax, (5, 5))
    y, p = _arrays(y_true, prob)
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="Chance")
    if 0 < y.sum() < y.size:
        fpr, tpr, _ = roc_curve(y, p)
        auc_text = f"AUC = {area_under(fpr, tpr):.3f}"
        ax.plot(fpr, tpr, lw=2, label=f"{label} ({auc_text})" if label else auc_text)
        if threshold is not None:
            pred = p >= threshold
            ax.plot(
                pred[y == 0].mean(),
                pred[y == 1].mean(),
                "o",
                ms=8,
                mfc="white",
                mew=2,
                color=ax.lines[-1].get_color(),
                label=f"Threshold {threshold:.2f}",
            )
    else:
        _undefined(ax, "ROC undefined: only one class present")
    _unit_square(ax)
    ax.set_xlabel("False positive rate (1 − specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title("ROC curve")
    ax.legend(loc="lower right", frameon=False)
    return fig


def plot_pr(
    y_true: Any,
    prob: Any,
    ax: Axes | None = None,
    label: str | None = None,
    threshold: float | None = None,
) -> Figure:
    """Precision-recall curve with average precision in the legend and the prevalence baseline.

    Args:
        y_true: Labels, 0 or 1.
        prob: Predicted probability of the positive class.
        ax: Axes to draw into; a new figure when ``None``.
        label: Curve name, prefixed to the AP in the legend.
        threshold: Marks the point ``prob >= threshold`` lands on.
    """
    fig, ax = _prepare_ax(ax, (5, 5))
    y, p = _arrays(y_true, prob)
    prevalence = float(y.mean()) if y.size else 0.0
    ax.axhline(prevalence, ls="--", color="0.6", lw=1, label=f"Prevalence = {prevalence:.3f}")
    if y.sum() > 0:
        precision, recall, _ = precision_recall_curve(y, p)
        ap = f"AP = {average_precision_score(y, p):.3f}"
        ax.step(recall, precision, where="post", lw=2, label=f"{label} ({ap})" if label else ap)
        if threshold is not None:
            pred = p >= threshold
            tp = int(np.sum(pred & (y == 1)))
            ax.plot(
                tp / y.sum(),
                tp / pred.sum() if pred.any() else 1.0,  # sklearn's convention for no predictions
                "o",
                ms=8,
                mfc="white",
                mew=2,
                color=ax.lines[-1].get_color(),
                label=f"Threshold {threshold:.2f}",
            )
    else:
        _undefined(ax, "PR curve undefined: no positives")
    _unit_square(ax)
    ax.set_xlabel("Recall (sensitivity)")
    ax.set_ylabel("Precision (PPV)")
    ax.set_title("Precision-recall curve")
    ax.legend(loc="lower left", frameon=False)
    return fig


def plot_confusion_matrix(
    cm: Any, class_names: Sequence[str] = ("no IDC", "IDC"), ax: Axes | None = None
) -> Figure:
    """Confusion matrix coloured by row fraction, each cell showing count and row percentage.

    Args:
        cm: Square matrix, rows true class, columns predicted (``[[tn, fp], [fn, tp]]``).
        class_names: Names in label order.
        ax: Axes to draw into; a new figure when ``None``.
    """
    fig, ax = _prepare_ax(ax, (4.5, 4))
    cm = np.asarray(cm, dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(cm):
        ax.text(
            j,
            i,
            f"{count:,}\n({frac[i, j]:.1%})",
            ha="center",
            va="center",
            color="white" if frac[i, j] > 0.5 else "black",
        )
    ticks = range(len(class_names))
    ax.set_xticks(ticks, labels=class_names)
    ax.set_yticks(ticks, labels=class_names)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title("Confusion matrix")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Fraction of true class")
    return fig


def _column(history: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    # csv.DictReader yields strings, and blank cells where a value was not logged.
    def to_float(v: Any) -> float:
        return math.nan if v is None or (isinstance(v, str) and not v.strip()) else float(v)

    return np.array([to_float(row.get(key)) for row in history], dtype=float)


def plot_history(history: Sequence[Mapping[str, Any]], ax: Axes | None = None) -> Figure:
    """Training curves from per-epoch rows (``epoch``, ``train_loss``, ``val_loss``, ``val_auc``).

    Args:
        history: Rows as dicts; values may be strings as read by ``csv.DictReader``.
        ax: Draw losses here, with ``val_auc`` on a twin axis. When ``None``, a new figure
            holds losses and validation AUC side by side (losses only if no AUC was logged).
    """
    epoch = _column(history, "epoch")
    auc = _column(history, "val_auc")
    has_auc = bool(np.isfinite(auc).any())
    if ax is None:
        fig = Figure(figsize=(10 if has_auc else 5, 4), layout="constrained")
        loss_ax = fig.add_subplot(1, 2 if has_auc else 1, 1)
        auc_ax = fig.add_subplot(1, 2, 2) if has_auc else None
    else:
        fig, loss_ax = ax.figure.figure, ax
        auc_ax = ax.twinx() if has_auc else None
    for key, name in (("train_loss", "Train loss"), ("val_loss", "Validation loss")):
        values = _column(history, key)
        if np.isfinite(values).any():
            loss_ax.plot(epoch, values, marker="o", ms=3, label=name)
    loss_ax.set_xlabel("Epoch")
    loss_ax.set_ylabel("Loss")
    loss_ax.set_title("Loss")
    loss_ax.grid(alpha=0.3)
    if loss_ax.lines and (auc_ax is None or ax is None):
        loss_ax.legend(loc="upper right", frameon=False)
    if auc_ax is not None:
        best = int(np.nanargmax(auc))
        auc_ax.plot(epoch, auc, marker="o", ms=3, color="tab:green", label="Validation AUC")
        auc_ax.axvline(epoch[best], ls=":", color="0.5", label=f"Highest, epoch {epoch[best]:g}")
        auc_ax.set_ylabel("Validation AUC")
        if ax is None:
            auc_ax.set_xlabel("Epoch")
            auc_ax.set_title("Validation AUC")
            auc_ax.grid(alpha=0.3)
            auc_ax.legend(loc="lower right", frameon=False)
        else:  # one legend for both y axes, on the twin so its lines do not cover it
            handles, labels = loss_ax.get_legend_handles_labels()
            more_handles, more_labels = auc_ax.get_legend_handles_labels()
            auc_ax.legend(handles + more_handles, labels + more_labels, loc="center right")
            loss_ax.set_title("Training history")
    return fig


def plot_reliability(y_true: Any, prob: Any, ax: Axes | None = None, n_bins: int = 15) -> Figure:
    """Reliability diagram: observed positive frequency per probability bin, ECE in the title.

    Args:
        y_true: Labels, 0 or 1.
        prob: Predicted probability of the positive class.
        ax: Axes to draw into; a new figure when ``None``.
        n_bins: Number of equal-width probability bins.
    """
    fig, ax = _prepare_ax(ax, (5, 5))
    curve = reliability_curve(y_true, prob, n_bins=n_bins)
    ece = expected_calibration_error(y_true, prob, n_bins=n_bins)
    used = [i for i, c in enumerate(curve["counts"]) if c]
    centers = [curve["bin_centers"][i] for i in used]
    observed = [curve["observed_frequency"][i] for i in used]
    predicted = [curve["mean_predicted"][i] for i in used]
    ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=1, label="Perfect calibration")
    ax.bar(
        centers,
        observed,
        width=1 / n_bins,
        color=_ACCENT,
        alpha=0.35,
        edgecolor=_ACCENT,
        label="Observed frequency",
    )
    ax.plot(predicted, observed, marker="o", ms=4, color=_ACCENT, label="Bin mean")
    _unit_square(ax)
    ax.set_xlabel("Predicted probability of IDC")
    ax.set_ylabel("Observed fraction of IDC")
    ax.set_title(f"Reliability (ECE = {ece:.3f})")
    ax.legend(loc="upper left", frameon=False)
    return fig


def plot_per_patient(per_patient: Sequence[Mapping[str, Any]], ax: Axes | None = None) -> Figure:
    """Horizontal bars of per-patient AUC, sorted, skipping patients whose AUC is undefined.

    Args:
        per_patient: Output of :func:`idcscope.evaluation.metrics.per_patient_metrics`.
        ax: Axes to draw into; a new figure sized to the number of patients when ``None``.
    """
    rows = sorted((r for r in per_patient if r.get("auc") is not None), key=lambda r: r["auc"])
    fig, ax = _prepare_ax(ax, (6, max(3.0, 0.25 * len(rows) + 1.2)))
    if rows:
        aucs = [r["auc"] for r in rows]
        pos = np.arange(len(rows))
        ax.barh(pos, aucs, color=_ACCENT, height=0.7)
        ax.set_yticks(pos, labels=[str(r["patient"]) for r in rows])
        ax.axvline(0.5, ls="--", color="0.6", lw=1, label="Chance")
        ax.axvline(float(np.mean(aucs)), ls=":", color="black", label=f"Mean {np.mean(aucs):.3f}")
        ax.legend(loc="lower left", framealpha=0.9)  # bars fill the plot; keep the legend legible
        ax.set_ylim(-0.6, len(rows) - 0.4)
    else:
        _undefined(ax, "No patient has both classes")
    skipped = len(per_patient) - len(rows)
    title = f"Per-patient AUC ({len(rows)} patients"
    ax.set_xlim(0, 1)
    ax.set_xlabel("AUC")
    ax.set_ylabel("Patient")
    ax.set_title(title + (f", {skipped} single-class)" if skipped else ")"))
    ax.grid(axis="x", alpha=0.3)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 150) -> Path:
    """Save ``fig`` (format from the suffix), creating parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Every figure lays itself out (constrained layout): a "tight" box would draw it twice.
    fig.savefig(path, dpi=dpi)
    logger.debug("saved figure %s", path)
    return path
