"""The model's view of a patch in its neighbourhood: the patch, and the 3x3 block around it.

A 50x50 patch at 2.5x holds 200 µm of tissue: a few nuclei, rarely the outline of a duct,
which is what tells carcinoma in situ from invasive carcinoma and dense benign tissue
from tumour. Every patch has a place on its patient's grid (the Kaggle file names carry
it; slide tiles have theirs), so its neighbours are known. With ``radius=1`` the model
gets six channels: the patch at full resolution, then the 3x3 block of patches around it
(150x150 px, 600 µm) averaged down by 3 to the patch's size. The second view costs one
more input layer's worth of work, not nine patches'.

A neighbour that is not there (glass, the edge of the tissue, a patch without
coordinates) is white, as glass is. Patients never mix: neighbours are looked up within
a patient (or slide) only. A patch that comes without its place (a lone upload) is seen
alone on glass; :class:`DropNeighbours` shows training patches that way now and then, so
the model still scores such a patch from the patch itself.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

STEP = 50  # grid step of the Kaggle patches in slide pixels: their size
GLASS = 255  # what a missing neighbour looks like


def neighbour_rows(
    groups: np.ndarray, xs: np.ndarray, ys: np.ndarray, radius: int = 1, step: int = STEP
) -> np.ndarray:
    """Row of each patch's neighbours on its group's grid, -1 where there is none.

    Args:
        groups: (N,) patient (or slide) of each row.
        xs, ys: (N,) top-left corner in slide pixels; NaN or negative where unknown (such
            a patch has no neighbours, only itself).
        radius: neighbours this many grid cells away in each direction.
        step: grid step in slide pixels.

    Returns:
        (N, (2 * radius + 1) ** 2) int64, the block in row-major order (top-left first);
        the middle column is the row itself.
    """
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    groups = np.asarray(groups)
    k = 2 * radius + 1
    out = np.full((len(xs), k * k), -1, dtype=np.int64)
    out[:, k * k // 2] = np.arange(len(xs))
    with np.errstate(invalid="ignore"):
        placed = (xs >= 0) & (ys >= 0)  # False for NaN too
    for g in np.unique(groups[placed]):
        idx = np.flatnonzero(placed & (groups == g))
        col = (xs[idx] // step).astype(np.int64)
        row = (ys[idx] // step).astype(np.int64)
        col, row = col - col.min() + radius, row - row.min() + radius
        grid = np.full((row.max() + 1 + radius, col.max() + 1 + radius), -1, dtype=np.int64)
        grid[row, col] = idx
        for j, (dy, dx) in enumerate(np.ndindex(k, k)):
            out[idx, j] = grid[row + dy - radius, col + dx - radius]
        out[idx, k * k // 2] = idx  # two patches in one cell: each is its own centre
    return out


class NeighbourhoodView:
    """A uint8 patch array seen with each patch's neighbourhood: ``view[rows]`` is
    ``(len(rows), H, W, 6)``, the patches then their blocks averaged down to (H, W).

    It indexes like the array it wraps (with an index array or a slice), so the training
    loader and inference read it as they read patches. The blocks do not depend on
    augmentation, so they are averaged once, up front: reading a batch then costs two
    gathers instead of ten.
    """

    def __init__(self, images: np.ndarray, neighbours: np.ndarray, chunk: int = 4096):
        k = math.isqrt(neighbours.shape[1])
        if k * k != neighbours.shape[1] or len(neighbours) != len(images):
            raise ValueError(
                f"neighbours {neighbours.shape} do not describe square blocks of "
                f"{len(images)} patches"
            )
        self.images = images
        self.blocks = np.empty(images.shape, dtype=np.uint8)
        for s in range(0, len(images), chunk):
            self.blocks[s : s + chunk] = _block_average(images, neighbours[s : s + chunk], k)
        n, h, w, c = images.shape
        self.shape = (n, h, w, 2 * c)
        self.dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, rows) -> np.ndarray:
        return np.concatenate([self.images[rows], self.blocks[rows]], axis=-1)


def _block_average(images: np.ndarray, nb: np.ndarray, k: int) -> np.ndarray:
    """(B, H, W, C): each row's k x k block of patches (glass where ``nb`` is -1),
    averaged over k x k pixels."""
    b = len(nb)
    _, h, w, c = images.shape
    tiles = np.asarray(images[np.maximum(nb, 0).reshape(-1)]).reshape(b, k * k, h, w, c)
    tiles[nb < 0] = GLASS
    # (B, k, k, H, W, C) -> the (kH, kW) block -> its (H, W) average over k x k pixels.
    block = tiles.reshape(b, k, k, h, w, c).transpose(0, 1, 3, 2, 4, 5)
    block = block.reshape(b, h, k, w, k, c).sum(axis=(2, 4), dtype=np.uint32)
    return ((block + k * k // 2) // (k * k)).astype(np.uint8)


def neighbourhood_view(
    images: np.ndarray,
    groups: np.ndarray | None,
    coords: tuple[np.ndarray, np.ndarray] | None,
    radius: int,
    step: int = STEP,
) -> NeighbourhoodView:
    """``images`` (one row per patch) seen with their neighbourhoods of ``radius``.

    ``groups`` (None: one patient) and ``coords`` (``(xs, ys)``; None: no patch has a
    place, so every block is the patch alone on glass) have one entry per image.
    """
    n = len(images)
    groups = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)
    xs, ys = coords if coords is not None else (np.full(n, np.nan), np.full(n, np.nan))
    return NeighbourhoodView(images, neighbour_rows(groups, xs, ys, radius, step))


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
        device = generator.device if generator is not None else None
        drop = (torch.rand(len(x), generator=generator, device=device) < self.p).to(x.device)
        if drop.any():
            x = x.clone()
            x[drop, 3:] = alone_on_glass(x[drop, :3], self.k)
        return self.augment(x, generator)


def alone_on_glass(patches: torch.Tensor, k: int) -> torch.Tensor:
    """(B, 3, H, W) patches in [0, 1] -> their k x k blocks with glass around, averaged
    down to (H, W): what :class:`NeighbourhoodView` shows for a patch without neighbours."""
    b, c, h, w = patches.shape
    block = torch.ones(b, c, k * h, k * w, dtype=patches.dtype, device=patches.device)
    m = k // 2
    block[..., m * h : (m + 1) * h, m * w : (m + 1) * w] = patches
    return F.avg_pool2d(block, k)
