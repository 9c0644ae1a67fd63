"""Spatial context: each patch's score averaged with its neighbours' on the patient's grid.

IDC is annotated as regions many patches across, so a patch's label is almost always its
neighbours' label, while a 50x50 patch alone is a noisy view of it. Every patch comes with
its place on the slide (the Kaggle file names carry it; slide tiles have theirs), so the
grid of a patient's patches can be rebuilt and each patch's logits replaced by a Gaussian
average over the grid: the Gaussian is normalised over the cells that hold a patch, so
glass and the edge of the tissue do not pull scores towards either class. Only images are
used, never labels. The width (in grid cells) is chosen on the validation patients at
training time and stored in the checkpoint; width 0 is the patch alone, and so is a patch
without coordinates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .grid import STEP, smooth

if TYPE_CHECKING:
    import torch

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
    from ..inference.calibration import probabilities
    from ..training.calibration import _nll, fit_platt  # scipy: fitting only

    labels = np.asarray(labels, dtype=np.int64)
    losses = {}
    for sigma in sigmas:
        z = smooth(logits, groups, xs, ys, sigma, step)
        losses[float(sigma)] = _nll(labels, probabilities(z, *fit_platt(z, labels)))
    best = min(losses, key=lambda s: (losses[s], s))
    return best, losses


def smooth_rows(
    logits: np.ndarray | torch.Tensor,
    rows: np.ndarray | None,
    patients: np.ndarray | None,
    coords: tuple[np.ndarray, np.ndarray] | None,
    context: dict | None,
) -> np.ndarray | torch.Tensor:
    """:func:`.grid.smooth` of the logits of ``images[rows]``, with per-image arrays.

    ``logits`` come back as they are without ``coords`` or ``context``; a float32 tensor in
    gives a float32 tensor out.

    Args:
        logits: (len(rows), C) logits, in the order of ``rows``.
        rows: indices into the per-image arrays (all images when None).
        patients: one id per image (None: all one patient).
        coords: ``(xs, ys)``, one top-left corner per image, in slide pixels (negative or
            NaN where unknown).
        context: a checkpoint's ``context`` field, ``{"sigma", "step"}``.
    """
    if coords is None or not context:
        return logits
    if not isinstance(logits, np.ndarray):  # a tensor: imported where one is given
        import torch

        return torch.from_numpy(
            smooth_rows(logits.numpy(), rows, patients, coords, context)
        ).float()
    sigma, step = float(context.get("sigma", 0.0)), int(context.get("step", STEP))
    rows = slice(None) if rows is None else np.asarray(rows)
    xs, ys = (np.asarray(c, dtype=np.float64)[rows] for c in coords)
    groups = np.zeros(len(xs)) if patients is None else np.asarray(patients)[rows]
    return smooth(logits, groups, xs, ys, sigma, step)
