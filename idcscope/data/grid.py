"""Where patches lie: each patch's cell on its patient's (or slide's) grid.

Every patch comes with its place: the Kaggle file names carry its top-left corner on the
downsampled slide, and slide tiles have theirs. Within one group (a patient or a slide)
the cell of a patch is ``((y - y0) // step, (x - x0) // step)``, with ``(x0, y0)`` the
group's smallest coordinates; a patch whose coordinates are unknown (NaN or negative, as
the manifest writes -1) has no cell. This one map serves the three things built on the
grid: the neighbourhood the model sees (:func:`neighbour_rows`), the spatial context that
smooths scores (:func:`smooth`) and the heatmap (:func:`raster`).

Spatial context: IDC is annotated as regions many patches across, so a patch's label is
almost always its neighbours' label, while a 50x50 patch alone is a noisy view of it. Each
patch's logits are replaced by a Gaussian average over its patient's grid, normalised over
the cells that hold a patch, so glass and the edge of the tissue pull scores towards
neither class. Only images are used, never labels. The width (in grid cells) is fitted on
the validation patients at training time (``training.calibration.fit_sigma``) and stored
in the checkpoint; width 0 is the patch alone, and so is a patch without coordinates.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from . import PATCH_SIZE

STEP = PATCH_SIZE  # grid step of the Kaggle patches in slide pixels: their size
TRUNCATE = 3.0  # the smoothing Gaussian reaches 3 sigma


class Cells(NamedTuple):
    """One group's placed patches on its grid."""

    index: np.ndarray  # positions of the group's placed patches in the input arrays
    row: np.ndarray  # their grid rows
    col: np.ndarray  # their grid columns
    shape: tuple[int, int]  # rows, columns of the grid
    origin: tuple[float, float]  # (x0, y0): slide coordinates of cell (0, 0)'s corner


def placed(xs, ys) -> np.ndarray:
    """Which patches have a place: both coordinates known and not negative."""
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return (xs >= 0) & (ys >= 0)  # False for NaN too


def cells(xs, ys, step: int = STEP) -> Cells:
    """The grid of one group whose patches all have a place."""
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if len(xs) == 0 or len(xs) != len(ys):
        raise ValueError(f"need as many x as y coordinates, at least one ({len(xs)}, {len(ys)})")
    x0, y0 = xs.min(), ys.min()
    col = ((xs - x0) // step).astype(np.int64)
    row = ((ys - y0) // step).astype(np.int64)
    shape = (int(row.max()) + 1, int(col.max()) + 1)
    return Cells(np.arange(len(xs)), row, col, shape, (float(x0), float(y0)))


def group_cells(groups, xs, ys, step: int = STEP) -> Iterator[Cells]:
    """:func:`cells` of every group, over its placed patches; groups never share a grid."""
    where = placed(xs, ys)
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    index = np.flatnonzero(where)
    order, bounds = group_order(np.asarray(groups)[where])
    for part in np.split(index[order], bounds) if len(index) else []:
        c = cells(xs[part], ys[part], step)
        yield c._replace(index=part)


def group_order(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by group (groups in order of first appearance, rows in order within
    each), and where each group after the first starts in that order."""
    if len(groups) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    codes = rank[inverse.ravel()]
    return np.argsort(codes, kind="stable"), np.cumsum(np.bincount(codes))[:-1]


def neighbour_rows(groups, xs, ys, radius: int = 1, step: int = STEP) -> np.ndarray:
    """Row of each patch's neighbours on its group's grid, -1 where there is none.

    Returns:
        (N, (2 * radius + 1) ** 2) int64, the block in row-major order (top-left first);
        the middle column is the row itself, also for a patch without a place.
    """
    n, k = len(np.asarray(xs)), 2 * radius + 1
    out = np.full((n, k * k), -1, dtype=np.int64)
    out[:, k * k // 2] = np.arange(n)
    for c in group_cells(groups, xs, ys, step):
        grid = np.full((c.shape[0] + 2 * radius, c.shape[1] + 2 * radius), -1, dtype=np.int64)
        grid[c.row + radius, c.col + radius] = c.index
        for j, (dy, dx) in enumerate(np.ndindex(k, k)):
            out[c.index, j] = grid[c.row + dy, c.col + dx]
        out[c.index, k * k // 2] = c.index  # two patches in one cell: each is its own centre
    return out


def neighbour_counts(groups, xs, ys, step: int = STEP) -> np.ndarray:
    """How many of its 8 neighbours each patch has on its group's grid (0 to 8), NaN for a
    patch without a place: the context it is scored in (the neighbourhood the model sees
    and the grid its logits are smoothed over)."""
    rows = neighbour_rows(groups, xs, ys, 1, step)
    counts = ((rows >= 0).sum(axis=1) - 1).astype(np.float64)
    counts[~placed(xs, ys)] = np.nan
    return counts


def label_borders(groups, xs, ys, labels, step: int = STEP) -> np.ndarray:
    """Which patches lie at an annotation border: one of their 8 neighbours on the group's
    grid carries another label (False for a patch without a place or neighbours)."""
    labels = np.asarray(labels)
    rows = neighbour_rows(groups, xs, ys, 1, step)
    present = rows >= 0
    other = present & (labels[np.where(present, rows, 0)] != labels[:, None])
    return other.any(axis=1)


def smooth(values, groups, xs, ys, sigma: float, step: int = STEP) -> np.ndarray:
    """Gaussian average of each row's values over the neighbouring patches of its group.

    The Gaussian is normalised over the cells that hold a patch, so glass and the edge of
    the tissue pull scores towards neither class; patches without a place keep their own.

    Args:
        values: (N, C) or (N,) scores, averaged linearly.
        groups: (N,) patient (or slide) of each row.
        xs, ys: (N,) top-left corners in slide pixels; NaN or negative where unknown.
        sigma: Gaussian width in grid cells; 0 returns ``values`` unchanged (a copy).
        step: grid step in slide pixels.
    """
    values = np.asarray(values, dtype=np.float64)
    if sigma <= 0 or len(values) == 0:
        return values.copy()
    from scipy import ndimage  # 0.3 s to import: only where a grid is smoothed

    flat = values.reshape(len(values), -1)
    out = flat.copy()
    for c in group_cells(groups, xs, ys, step):
        weight = np.zeros(c.shape)
        np.add.at(weight, (c.row, c.col), 1.0)
        w = ndimage.gaussian_filter(weight, sigma, mode="constant", truncate=TRUNCATE)
        for j in range(flat.shape[1]):
            total = np.zeros(c.shape)
            np.add.at(total, (c.row, c.col), flat[c.index, j])
            s = ndimage.gaussian_filter(total, sigma, mode="constant", truncate=TRUNCATE)
            out[c.index, j] = s[c.row, c.col] / w[c.row, c.col]
    return out.reshape(values.shape)


def raster(xs, ys, values, step: int = STEP) -> tuple[np.ndarray, tuple[int, int]]:
    """One group's values on its grid: one cell per patch (the mean if several), NaN where
    no patch lies, and the grid's origin ``(x0, y0)`` in slide coordinates."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) != len(np.asarray(xs)):
        raise ValueError(f"need as many coordinates as values ({len(values)}, {len(xs)})")
    c = cells(xs, ys, step)
    total, count = np.zeros(c.shape), np.zeros(c.shape)
    np.add.at(total, (c.row, c.col), values)
    np.add.at(count, (c.row, c.col), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = np.where(count > 0, total / count, np.nan)
    return grid, (int(c.origin[0]), int(c.origin[1]))


def smooth_rows(
    logits: np.ndarray,
    patients: np.ndarray | None,
    coords: tuple[np.ndarray, np.ndarray] | None,
    context: dict | None,
) -> np.ndarray:
    """The spatial context of a checkpoint (its ``context`` field, ``{"sigma", "step"}``)
    applied to the logits of patches of ``patients`` (None: all one) at ``coords``
    (``(xs, ys)``, NaN or negative where unknown): :func:`smooth`, or the logits as they
    are without coordinates or context."""
    if coords is None or not context:
        return logits
    sigma, step = float(context.get("sigma", 0.0)), int(context.get("step", STEP))
    xs, ys = (np.asarray(c, dtype=np.float64) for c in coords)
    groups = np.zeros(len(xs)) if patients is None else np.asarray(patients)
    return smooth(logits, groups, xs, ys, sigma, step)
