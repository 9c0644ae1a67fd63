"""Per-patient IDC heatmaps rebuilt from patch coordinates.

A Kaggle IDC patient is a folder of 50x50 patches whose file names carry the top-left pixel
of each patch on the 2.5x-downsampled slide, on a 50-px grid. Placing the patches back at
those coordinates rebuilds the tissue; one grid cell per patch holds the predicted P(IDC)
or the annotated label, so predicted and annotated IDC regions compare cell by cell (Dice,
IoU, area fraction). Cells without a patch are glass or were never cut: NaN, never zero.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .errors import DataError
from .spatial.grid import raster

if TYPE_CHECKING:
    from .inference.predictor import Predictor

logger = logging.getLogger(__name__)

PATCH = 50
MOSAIC_MAX_SIDE = 900  # pixels of the rebuilt tissue in figures: plenty at print size
CMAP = "inferno"
DPI = 150


def patient_mosaic(
    images: np.ndarray, xs, ys, patch: int = PATCH, scale: float = 1.0
) -> tuple[np.ndarray, tuple[int, int]]:
    """Rebuild the tissue: each patch pasted at its (x, y), on white glass.

    Args:
        images: Patches, uint8 (N, h, w, 3).
        xs: Top-left x of each patch on the slide, in slide pixels.
        ys: Top-left y of each patch.
        patch: Grid step in slide pixels.
        scale: Mosaic pixels per slide pixel (below 1 shrinks each patch, box-filtered).

    Returns:
        The mosaic, uint8 (H, W, 3), and its origin ``(x0, y0)``: the slide coordinates of
        its top-left pixel (the smallest x and y).
    """
    from PIL import Image

    xs, ys = np.asarray(xs, dtype=np.int64), np.asarray(ys, dtype=np.int64)
    if len(xs) == 0 or len(xs) != len(ys) or len(xs) != len(images):
        raise ValueError(f"need as many coordinates as patches ({len(images)}, {len(xs)})")
    x0, y0 = int(xs.min()), int(ys.min())
    side = max(1, round(patch * scale))
    px, py = np.round((xs - x0) * scale).astype(int), np.round((ys - y0) * scale).astype(int)
    mosaic = np.full((py.max() + side, px.max() + side, 3), 255, dtype=np.uint8)
    for img, x, y in zip(images, px, py, strict=True):
        if img.shape[:2] != (side, side):
            img = np.asarray(Image.fromarray(img).resize((side, side), Image.Resampling.BOX))
        mosaic[y : y + side, x : x + side] = img
    return mosaic, (x0, y0)


def probability_grid(xs, ys, values, patch: int = PATCH) -> tuple[np.ndarray, tuple[int, int]]:
    """One cell per ``patch``-px grid cell: the value of its patch (the mean if several).

    Returns:
        A float (rows, cols) grid, NaN where no patch lies, and its origin ``(x0, y0)``: the
        slide coordinates of the top-left corner of cell (0, 0). See ``spatial.grid``.
    """
    if len(np.asarray(xs)) == 0 or not len(xs) == len(ys) == len(values):
        raise ValueError(f"need as many coordinates as values ({len(values)}, {len(xs)})")
    return raster(np.asarray(xs), np.asarray(ys), values, patch)


def dice_iou(pred_mask, true_mask, tissue=None) -> dict[str, float | None]:
    """Dice and IoU of two boolean grids, over the cells that hold tissue.

    Cells outside ``tissue`` (when given) count as negative in both masks; true negatives do
    not enter either score, so glass never inflates them. Both are None when both masks are
    empty: agreement on "no IDC" is real but neither ratio is defined.
    """
    p, t = np.asarray(pred_mask, dtype=bool), np.asarray(true_mask, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: {p.shape} and {t.shape}")
    if tissue is not None:
        p, t = p & np.asarray(tissue, dtype=bool), t & np.asarray(tissue, dtype=bool)
    inter, union = int((p & t).sum()), int((p | t).sum())
    if union == 0:
        return {"dice": None, "iou": None}
    return {"dice": 2 * inter / int(p.sum() + t.sum()), "iou": inter / union}


# ----------------------------------------------------------------------------- figures


def _extent(origin: tuple[int, int], width: float, height: float) -> tuple[float, ...]:
    # Slide pixels on both axes, so the mosaic and the grids line up whatever their resolution.
    return (origin[0], origin[0] + width, origin[1] + height, origin[1])


def _grid_extent(grid: np.ndarray, origin: tuple[int, int], patch: int) -> tuple[float, ...]:
    return _extent(origin, grid.shape[1] * patch, grid.shape[0] * patch)


def _contour(ax: Axes, grid: np.ndarray, origin, patch: int, level: float, **kw) -> None:
    # A ring of glass around the grid closes contours that touch its border.
    z = np.pad(np.nan_to_num(grid, nan=0.0), 1)
    cx = origin[0] + (np.arange(z.shape[1]) - 0.5) * patch
    cy = origin[1] + (np.arange(z.shape[0]) - 0.5) * patch
    if z.min() < level <= z.max():
        ax.contour(cx, cy, z, levels=[level], **kw)


def _tissue_axes(ax: Axes, mosaic: np.ndarray, extent, title: str, faded: bool = False) -> None:
    img = mosaic
    if faded:  # grey and light, so colours drawn on top read as the data
        grey = mosaic.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        img = np.repeat((155 + 0.39 * grey)[..., None], 3, axis=2).astype(np.uint8)
    ax.imshow(img, extent=extent, interpolation="antialiased")
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _scale_bar(ax: Axes, mpp: float, extent) -> None:
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    width, height = extent[1] - extent[0], extent[2] - extent[3]
    # The longest round length that stays within a quarter of the tissue's width.
    fits = [mm for mm in (0.1, 0.2, 0.5, 1, 2, 5, 10) if mm * 1000 / mpp <= width / 4]
    mm = fits[-1] if fits else 0.1
    label = f"{mm:g} mm" if mm >= 1 else f"{mm * 1000:g} µm"
    bar = AnchoredSizeBar(
        ax.transData,
        mm * 1000 / mpp,
        label,
        "lower left",
        pad=0.4,
        frameon=False,
        size_vertical=height / 120,
    )
    ax.add_artist(bar)


def plot_patient_heatmap(
    mosaic: np.ndarray,
    prob: np.ndarray,
    origin: tuple[int, int],
    threshold: float,
    truth: np.ndarray | None = None,
    patch: int = PATCH,
    mpp: float = 4.0,
    title: str = "",
) -> Figure:
    """Tissue, predicted P(IDC) over it, and (when ``truth`` is given) the annotated IDC.

    Args:
        mosaic: The rebuilt tissue (any scale); it spans the same slide area as the grids.
        prob: Probability grid from :func:`probability_grid`.
        origin: Slide coordinates of the grids' top-left corner.
        threshold: Where the predicted boundary is drawn.
        truth: Boolean grid of annotated IDC cells, or None when labels are unknown.
        patch: Grid step in slide pixels.
        mpp: Microns per slide pixel, for the scale bar.
        title: Figure title.
    """
    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    extent = _grid_extent(prob, origin, patch)
    ratio = float(np.clip((extent[2] - extent[3]) / (extent[1] - extent[0]), 0.25, 2.5))
    n = 2 if truth is None else 3
    width = 4.2
    fig = Figure(figsize=(n * width + 0.7, width * ratio + 0.8), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, n)
    _tissue_axes(axes[0], mosaic, extent, "H&E tissue")
    _scale_bar(axes[0], mpp, extent)

    cmap = colormaps[CMAP].with_extremes(bad=(0, 0, 0, 0))
    _tissue_axes(axes[1], mosaic, extent, "Predicted P(IDC)", faded=True)
    im = axes[1].imshow(
        np.ma.masked_invalid(prob),
        cmap=cmap,
        vmin=0,
        vmax=1,
        alpha=0.8,
        extent=extent,
        interpolation="nearest",
    )
    edge = {"colors": "#00e5ff", "linewidths": 1.4}
    _contour(axes[1], prob, origin, patch, threshold, **edge)
    handles = [Line2D([], [], color=edge["colors"], lw=1.4, label=f"P = {threshold:.2f}")]
    if truth is not None:
        mask = np.where(np.isnan(prob), np.nan, truth.astype(float))
        rgba = np.zeros((*mask.shape, 4))
        rgba[mask == 1] = (0.84, 0.15, 0.16, 0.6)
        _tissue_axes(axes[2], mosaic, extent, "Annotated IDC", faded=True)
        axes[2].imshow(rgba, extent=extent, interpolation="nearest")
        _contour(axes[2], prob, origin, patch, threshold, colors="black", linewidths=1.4)
        handles = [
            Patch(color=(0.84, 0.15, 0.16, 0.6), label="annotated IDC"),
            Line2D([], [], color="black", lw=1.4, label=f"predicted, P ≥ {threshold:.2f}"),
        ]
        axes[2].legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.8)
    else:
        axes[1].legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.8)
    bar = fig.colorbar(im, ax=axes[1], shrink=0.8, pad=0.02, label="P(IDC)")
    bar.ax.axhline(threshold, color=edge["colors"], lw=2)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_probability_map(
    prob: np.ndarray,
    origin: tuple[int, int],
    patch: int = PATCH,
    title: str = "",
    ax: Axes | None = None,
) -> Figure:
    """The probability grid alone: one square per patch, glass left white, with a colour bar."""
    from matplotlib import colormaps

    extent = _grid_extent(prob, origin, patch)
    if ax is None:
        ratio = float(np.clip(prob.shape[0] / prob.shape[1], 0.25, 2.5))
        fig = Figure(figsize=(5.2, 4.4 * ratio + 0.6), dpi=DPI, layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure.figure
    cmap = colormaps[CMAP].with_extremes(bad="white")
    im = ax.imshow(
        np.ma.masked_invalid(prob),
        cmap=cmap,
        vmin=0,
        vmax=1,
        extent=extent,
        interpolation="nearest",
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "Predicted P(IDC)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="P(IDC)")
    return fig


def _save_png(fig: Figure, path: Path) -> Path:
    """Save through a 256-colour palette: a third of the bytes, no visible change at print size."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    buf.seek(0)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    return path


# ----------------------------------------------------------------------------- pipeline


def _index_patient(path: Path, patient: str | None):
    """One patient's patches with coordinates, and ``(path, reason)`` of every file left out."""
    from .data.manifest import find_dataset_root, index_dataset

    folder = find_dataset_root(path) / patient if patient else Path(path)
    ix = index_dataset(folder)
    placed = (ix.table["x"] >= 0) & (ix.table["y"] >= 0)
    table = ix.table[placed]
    skipped = ix.skipped + [
        (p, "no coordinates in the file name") for p in ix.table["path"][~placed]
    ]
    if table.empty:
        raise DataError(
            f"{folder}: no patch names carry coordinates (<patient>_idx5_x<X>_y<Y>_"
            "class<C>.png); a heatmap needs them"
        )
    if len(table) < len(ix.table):
        logger.warning(
            "%s: %d patches without coordinates left out", folder, len(ix.table) - len(table)
        )
    ids = sorted(table["patient"].unique())
    if len(ids) > 1:
        raise DataError(
            f"{folder} holds {len(ids)} patients ({', '.join(ids[:5])}, ...); pass one "
            "patient's folder, or the dataset folder and the patient id"
        )
    return ix.root, table.reset_index(drop=True), ids[0], skipped


def patient_heatmap(
    checkpoint: str | Path | Predictor,
    patient_dir: str | Path,
    out_dir: str | Path,
    threshold: float | None = None,
    tta: bool = False,
    patient: str | None = None,
    batch_size: int | None = None,
) -> dict:
    """Predict every patch of one patient and map P(IDC) back onto the tissue.

    Args:
        checkpoint: An idcscope checkpoint, or a :class:`~idcscope.inference.Predictor`
            already built (a server loads its model once); ``tta`` and ``batch_size`` then
            come from the predictor.
        patient_dir: One patient's folder (``<patient>/<0|1>/*.png``), or, with ``patient``,
            the dataset folder that holds it.
        out_dir: Receives ``<patient>_heatmap.png``, ``<patient>_probability.png``,
            ``<patient>_predictions.csv`` (one row per patch), ``<patient>_skipped.csv``
            (every file left out, and why) and ``<patient>_heatmap.json``.
        threshold: Decision threshold; defaults to the checkpoint's (chosen on validation).
        tta: Average the 8 dihedral transforms of each patch.
        patient: Patient id inside the dataset folder ``patient_dir``.
        batch_size: Patches per forward pass.

    Returns:
        The JSON summary: patient, n_patches, threshold, predicted and annotated IDC area
        fractions of the tissue, Dice and IoU of the IDC regions (grid cells), patch-level
        AUC, sensitivity and specificity (None where undefined), and the files written.
    """
    import pandas as pd

    from . import metrics
    from .inference.predictor import Predictor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(checkpoint, Predictor):
        predictor = checkpoint
    else:
        predictor = Predictor(checkpoint, tta=tta, batch_size=batch_size)
    ckpt = predictor.checkpoints[0]
    threshold = predictor.threshold if threshold is None else float(threshold)
    root, table, pid, skipped = _index_patient(Path(patient_dir), patient)
    # One patient: stain normalisation (when the model uses it) fits on all its patches.
    scored = predictor.score_files(table, root, desc=f"scoring {pid}", keep_patches=True)
    rows = np.flatnonzero(scored.ok)
    if len(rows) == 0:
        raise DataError(f"{patient_dir}: none of the {len(table)} patches could be read")
    prob = scored.prob[rows]
    xs, ys = table["x"].to_numpy()[rows], table["y"].to_numpy()[rows]
    labels = table["label"].to_numpy()[rows]
    known = bool((labels >= 0).all())

    grid, origin = probability_grid(xs, ys, prob)
    tissue = ~np.isnan(grid)
    pred_mask = tissue & (np.nan_to_num(grid, nan=-1.0) >= threshold)
    truth = probability_grid(xs, ys, labels)[0] >= 0.5 if known else None
    n_cells = int(tissue.sum())
    summary = {
        "patient": pid,
        "n_patches": len(rows),
        "n_unreadable": len(table) - len(rows),
        "n_skipped": len(skipped),  # left out before decoding: bad headers, no coordinates
        "threshold": threshold,
        "tta": predictor.tta,
        "context_sigma": predictor.context_sigma,
        "n_tissue_cells": n_cells,
        "idc_fraction_pred": int(pred_mask.sum()) / n_cells,
    }
    if known:
        m = metrics.binary_metrics(labels, prob, threshold)
        summary |= {
            "idc_fraction_true": int(truth.sum()) / n_cells,
            **dice_iou(pred_mask, truth, tissue),
            "auc": m["auc"],
            "sensitivity": m["recall"] if m["n_positive"] else None,
            "specificity": m["specificity"] if m["n_positive"] < m["n"] else None,
        }

    span = max(grid.shape) * PATCH
    mosaic, _ = patient_mosaic(scored.patches, xs, ys, scale=min(1.0, MOSAIC_MAX_SIDE / span))
    title = f"Patient {pid}: {len(rows)} patches, predicted IDC {summary['idc_fraction_pred']:.0%}"
    if known:
        title += f", annotated {summary['idc_fraction_true']:.0%}"
        if summary["dice"] is not None:
            title += f"; Dice {summary['dice']:.2f}, IoU {summary['iou']:.2f}"
    mpp = float(ckpt["preprocessing"]["mpp"])
    figures = {
        "heatmap": plot_patient_heatmap(
            mosaic, grid, origin, threshold, truth, mpp=mpp, title=title
        ),
        "probability": plot_probability_map(grid, origin, title=f"Patient {pid}: P(IDC)"),
    }
    summary["files"] = {
        k: str(_save_png(fig, out / f"{pid}_{k}.png")) for k, fig in figures.items()
    }
    predictions = table.iloc[rows][["path", "x", "y", "label"]].assign(
        prob_idc=np.round(prob, 6), pred=(prob >= threshold).astype(int)
    )
    predictions["label"] = predictions["label"].where(predictions["label"] >= 0).astype("Int64")
    summary["files"]["predictions"] = str(out / f"{pid}_predictions.csv")
    predictions.to_csv(summary["files"]["predictions"], index=False)
    skipped += [(p, r) for p, r in zip(table["path"], scored.reasons, strict=True) if r]
    summary["files"]["skipped"] = str(out / f"{pid}_skipped.csv")
    pd.DataFrame(skipped, columns=["path", "reason"]).to_csv(
        summary["files"]["skipped"], index=False
    )
    (out / f"{pid}_heatmap.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("patient %s: heatmap in %s", pid, summary["files"]["heatmap"])
    return summary
