"""The model's view of a patch in its neighbourhood: the patch, and the 3x3 block around it.

A 50x50 patch at 2.5x holds 200 µm of tissue: a few nuclei, rarely the outline of a duct,
which is what tells carcinoma in situ from invasive carcinoma and dense benign tissue
from tumour. Every patch has a place on its patient's grid (``data.grid``), so its
neighbours are known. With ``radius=1`` the model gets six planes: the patch at full
resolution, then the 3x3 block of patches around it (150x150 px, 600 µm) averaged down by
3 to the patch's size. The second view costs one more input layer's worth of work, not
nine patches'.

A neighbour that is not there (glass, the edge of the tissue, a patch without
coordinates) is white, as glass is. Patients never mix: neighbours are looked up within
a patient (or slide) only. A patch that comes without its place (a lone upload) is seen
alone on glass; :class:`DropNeighbours` shows training patches that way now and then, so
the model still scores such a patch from the patch itself.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .grid import STEP, neighbour_rows

if TYPE_CHECKING:  # torch only where training draws its augmentation
    import torch

GLASS = 255  # what a missing neighbour looks like


def block_planes(
    planes: np.ndarray, neighbours: np.ndarray, src: int = 0, dst: int = 3, channels: int = 3
) -> np.ndarray:
    """Write each patch's block of neighbours, averaged down to its size, into ``planes``.

    Args:
        planes: uint8 (N, C, H, W), C-contiguous; planes ``src:src + channels`` hold the
            patches, planes ``dst:dst + channels`` receive the blocks (in place).
        neighbours: (N, k * k) rows of each patch's block (see ``neighbour_rows``), -1
            for glass.
        src, dst, channels: where the patches are and where the blocks go.

    Each block pixel is the rounded mean of k x k pixels of the (k H, k W) block: exact
    integer arithmetic, so every caller gets the same bytes.
    """
    k = math.isqrt(neighbours.shape[1])
    if k * k != neighbours.shape[1] or len(neighbours) != len(planes):
        raise ValueError(
            f"neighbours {neighbours.shape} do not describe square blocks of {len(planes)} patches"
        )
    if not planes.flags.c_contiguous or planes.dtype != np.uint8:
        raise ValueError("planes must be a C-contiguous uint8 array")
    rounding = ((np.arange(k * k * GLASS + 1) + k * k // 2) // (k * k)).astype(np.uint8)
    nb = np.ascontiguousarray(neighbours, np.int64)
    if len(planes) > SMALL:
        from ._kernels import block_average

        block_average(planes, nb, k, src, dst, channels, rounding)
    else:
        _block_average(planes, nb, k, src, dst, channels, rounding)
    return planes


# Up to this many patches numpy's block average is quick enough, and scoring a few patches
# skips importing numba and starting its compiler (a second or more).
SMALL = 64


def _block_average(planes, nb, k, src, dst, channels, rounding) -> None:
    """``_kernels.block_average`` in numpy, for a few patches: the same integer sums."""
    n, _, h, w = planes.shape
    glass = np.full((1, channels, h, w), GLASS, np.uint8)
    tiles = np.concatenate([planes[:, src : src + channels], glass])[np.where(nb < 0, n, nb)]
    # (n, ty, tx, c, y, x) -> (n, c, ty, y, tx, x): the (k h, k w) block, then k x k sums
    block = tiles.reshape(n, k, k, channels, h, w).transpose(0, 3, 1, 4, 2, 5)
    sums = block.reshape(n, channels, h, k, w, k).sum(axis=(3, 5), dtype=np.int64)
    planes[:, dst : dst + channels] = rounding[sums]


def add_neighbourhood(
    planes: np.ndarray,
    groups: np.ndarray | None,
    coords: tuple[np.ndarray, np.ndarray] | None,
    radius: int,
    step: int = STEP,
) -> np.ndarray:
    """Fill planes 3..5 of uint8 (N, 6, H, W) ``planes`` with each patch's block of
    neighbours of ``radius``, from the patches in planes 0..2.

    ``groups`` (None: one patient) and ``coords`` (``(xs, ys)``; None: no patch has a
    place, so every block is the patch alone on glass) have one entry per patch.
    """
    n = len(planes)
    if coords is None:
        nb = np.full((n, (2 * radius + 1) ** 2), -1, np.int64)
        nb[:, nb.shape[1] // 2] = np.arange(n)
    else:
        groups = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)
        nb = neighbour_rows(groups, *coords, radius, step)
    return block_planes(planes, nb)


class DropNeighbours:
    """Training augmentation for neighbourhood input: each sample of a batch loses its
    neighbours with probability ``p``, its block becoming the patch alone on glass, as a
    patch without coordinates is seen at inference. Then ``augment`` runs on the batch.

    Without it the model leans on the neighbours so much that lone patches are scored at
    chance or below (fold AUC 0.22 to 0.73, pooled 0.50, in the recipe study).
    """

    def __init__(self, augment, p: float, radius: int):
        self.augment, self.p, self.k = augment, p, 2 * radius + 1

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.p <= 0:  # no draw: the random stream is the one without this wrapper
            return self.augment(x, generator)
        import torch

        device = generator.device if generator is not None else None
        drop = (torch.rand(len(x), generator=generator, device=device) < self.p).to(x.device)
        if drop.any():
            x = x.clone()
            x[drop, 3:] = alone_on_glass(x[drop, :3], self.k)
        return self.augment(x, generator)


def alone_on_glass(patches: torch.Tensor, k: int) -> torch.Tensor:
    """(B, 3, H, W) patches in [0, 1] -> their k x k blocks with glass around, averaged
    down to (H, W): what :func:`add_neighbourhood` gives a patch without neighbours."""
    import torch
    import torch.nn.functional as F

    b, c, h, w = patches.shape
    block = torch.ones(b, c, k * h, k * w, dtype=patches.dtype, device=patches.device)
    m = k // 2
    block[..., m * h : (m + 1) * h, m * w : (m + 1) * w] = patches
    return F.avg_pool2d(block, k)
