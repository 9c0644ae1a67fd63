"""Per-patient IDC heatmaps rebuilt from patch coordinates.

A Kaggle IDC patient is a folder of 50x50 patches whose file names carry the top-left pixel
of each patch on the 2.5x-downsampled slide, on a 50-px grid. Placing the patches back at
those coordinates rebuilds the tissue; one grid cell per patch holds the predicted P(IDC)
or the annotated label, so predicted and annotated IDC regions compare cell by cell (Dice,
IoU, area fraction). Cells without a patch are glass or were never cut: NaN, never zero.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..data import PATCH_MPP, PATCH_SIZE
from ..data.grid import raster
from ..errors import DataError, NothingScoredError
from .figures import _save_png, plot_patient_heatmap, plot_probability_map

if TYPE_CHECKING:
    from ..inference.predictor import Predictor
    from ..inference.tables import Verdicts

logger = logging.getLogger(__name__)

PATCH = PATCH_SIZE
MOSAIC_MAX_SIDE = 900  # pixels of the rebuilt tissue in figures: plenty at print size


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
        slide coordinates of the top-left corner of cell (0, 0). See ``data.grid``.
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


# ----------------------------------------------------------------------------- pipeline


def _index_patient(path: Path, patient: str | None):
    """One patient's patches with coordinates, and ``(path, reason)`` of every file left out."""
    from ..data.manifest import find_dataset_root, index_dataset

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
        fractions of the tissue, the patches called IDC, no IDC and uncertain (``calls``;
        uncertain ones are hatched in the figures) and the input check's counts by
        reason, Dice and IoU of the IDC regions (grid cells), patch-level AUC,
        sensitivity and specificity (None where undefined), and the files written.
    """
    from ..inference.predictor import Predictor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(checkpoint, Predictor):
        predictor = checkpoint
    else:
        predictor = Predictor(checkpoint, tta=tta, batch_size=batch_size)
    threshold = predictor.threshold if threshold is None else float(threshold)
    root, table, pid, skipped = _index_patient(Path(patient_dir), patient)
    # One patient: stain normalisation (when the model uses it) fits on all its patches.
    scored = predictor.score_files(table, root, desc=f"scoring {pid}", keep_patches=True)
    rows = np.flatnonzero(scored.ok)
    if len(rows) == 0:
        raise NothingScoredError(f"{patient_dir}: none of the {len(table)} patches could be read")
    placed = _Placed(
        scored.verdicts.take(rows), table["x"].to_numpy()[rows], table["y"].to_numpy()[rows],
        table["label"].to_numpy()[rows],
    )  # fmt: skip
    summary, maps = _compare(placed, threshold)
    summary = {
        "patient": pid,
        "n_patches": len(rows),
        "n_unreadable": len(table) - len(rows),
        "n_skipped": len(skipped),  # left out before decoding: bad headers, no coordinates
        "threshold": threshold,
        "tta": predictor.tta,
        "context_sigma": predictor.context_sigma,
        **summary,
    }
    mpp = float(predictor.models[0].preprocessing["mpp"])
    summary["files"] = _draw(out, pid, placed, scored.patches, maps, summary, mpp)
    skipped += [(p, r) for p, r in zip(table["path"], scored.reasons, strict=True) if r]
    summary["files"] |= _write_tables(out, pid, table.iloc[rows], placed, threshold, skipped)
    (out / f"{pid}_heatmap.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("patient %s: heatmap in %s", pid, summary["files"]["heatmap"])
    return summary


class _Placed(NamedTuple):
    """A patient's scored patches: what the model says of them (``inference.tables``),
    top-left corners and labels (-1: unknown)."""

    verdicts: Verdicts
    xs: np.ndarray
    ys: np.ndarray
    labels: np.ndarray

    @property
    def prob(self) -> np.ndarray:
        return self.verdicts.prob


def _compare(placed: _Placed, threshold: float) -> tuple[dict, dict]:
    """Predicted against annotated IDC on the patient's grid: area fractions, Dice and IoU
    of the regions, patch-level AUC, sensitivity and specificity (when labels are known);
    and the grids behind them."""
    from ..evaluation import metrics

    prob, xs, ys, labels = placed.prob, placed.xs, placed.ys, placed.labels
    known = bool((labels >= 0).all())
    grid, origin = probability_grid(xs, ys, prob)
    tissue = ~np.isnan(grid)
    pred_mask = tissue & (np.nan_to_num(grid, nan=-1.0) >= threshold)
    truth = probability_grid(xs, ys, labels)[0] >= 0.5 if known else None
    # A cell is uncertain when most of its patches are (one patch a cell, in Kaggle's grid).
    uncertain = probability_grid(xs, ys, placed.verdicts.call == -1)[0] >= 0.5
    n_cells = int(tissue.sum())
    summary = {
        "n_tissue_cells": n_cells,
        "idc_fraction_pred": int(pred_mask.sum()) / n_cells,
        **placed.verdicts.counts(),
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
    return summary, {"grid": grid, "origin": origin, "truth": truth, "uncertain": uncertain}


def _draw(out: Path, pid, placed: _Placed, patches, maps: dict, summary: dict, mpp) -> dict:
    """The heatmap over the patient's tissue and the bare probability map, as PNGs."""
    grid, origin = maps["grid"], maps["origin"]
    span = max(grid.shape) * PATCH
    scale = min(1.0, MOSAIC_MAX_SIDE / span)
    mosaic, _ = patient_mosaic(patches, placed.xs, placed.ys, scale=scale)
    title = f"Patient {pid}: {summary['n_patches']} patches, "
    title += f"predicted IDC {summary['idc_fraction_pred']:.0%}"
    if summary["calls"]["uncertain"]:
        title += f" ({summary['calls']['uncertain']} uncertain)"
    if "idc_fraction_true" in summary:
        title += f", annotated {summary['idc_fraction_true']:.0%}"
        if summary["dice"] is not None:
            title += f"; Dice {summary['dice']:.2f}, IoU {summary['iou']:.2f}"
    threshold, uncertain = summary["threshold"], maps["uncertain"]
    figures = {
        "heatmap": plot_patient_heatmap(
            mosaic, grid, origin, threshold, maps["truth"], mpp=mpp, title=title,
            uncertain=uncertain,
        ),
        "probability": plot_probability_map(
            grid, origin, title=f"Patient {pid}: P(IDC)", uncertain=uncertain
        ),
    }  # fmt: skip
    return {k: str(_save_png(fig, out / f"{pid}_{k}.png")) for k, fig in figures.items()}


def _write_tables(out: Path, pid, table, placed: _Placed, threshold: float, skipped) -> dict:
    """One row per scored patch (``inference.tables``), and every file left out with its
    reason, as CSVs."""
    from ..data.manifest import write_skipped
    from ..inference.tables import PATCH_IDS, prediction_table

    predictions = prediction_table(
        table[PATCH_IDS],
        placed.verdicts,
        threshold,
        label=placed.labels,
    )
    files = {"predictions": out / f"{pid}_predictions.csv", "skipped": out / f"{pid}_skipped.csv"}
    predictions.to_csv(files["predictions"], index=False)
    write_skipped(files["skipped"], skipped)
    return {k: str(v) for k, v in files.items()}


def patient_slide(folder: str | Path, path: str | Path, mpp: float = PATCH_MPP) -> Path:
    """One patient's patches put back together at their places as a pyramidal TIFF
    (``wsi.write_tiff_slide``) of ``mpp`` µm per pixel, the patches' own resolution: a
    patient is then viewed, and scored as a slide (``spatial.slide``), as any slide is.

    Raises:
        DataError: no patch of ``folder`` is named with its place or can be read.
    """
    from ..data.decode import decode_files
    from .wsi import write_tiff_slide

    root, table, _, _ = _index_patient(Path(folder), None)
    decoded = decode_files([str(root / p) for p in table["path"]], desc="rebuilding the tissue")
    if not decoded.ok.any():
        raise DataError(f"{folder}: none of its patches can be read")
    ok = decoded.ok
    xs, ys = table["x"].to_numpy()[ok], table["y"].to_numpy()[ok]
    mosaic, _ = patient_mosaic(decoded.images[ok], xs, ys)
    return write_tiff_slide(mosaic, path, mpp=mpp)
