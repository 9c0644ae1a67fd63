"""From decoded patches to what the model reads: the one function training and inference share.

A patch reaches the model as uint8 planes (C, H, W): its RGB, stain-normalised with the
statistics of its patient (or slide), and, for a model that sees its neighbourhood, three
more planes holding the block of neighbouring patches averaged down to the patch's size
(``data.neighbourhood``). ``Preprocessing.model_input`` builds them for patches of any
number of patients at once. What a patient's patches become depends only on that
patient's patches, so training (the whole training array in one call) and inference (a
patient, a slide, a batch of lone uploads) give the model the very same bytes for a patch.
Then ``Preprocessing.__call__`` scales a float batch by the training mean and std.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import PATCH_MPP, PATCH_SIZE

if TYPE_CHECKING:  # torch is imported where a tensor is made: ONNX scoring never needs it
    import torch

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocessing:
    """What turns a uint8 patch into model input; stored in every checkpoint."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    patch_size: int = PATCH_SIZE
    mpp: float = PATCH_MPP
    channels_last: bool = True
    stain: str = "none"  # per-patient stain normalisation applied to the uint8 patches
    stain_reference: dict | None = None
    # > 0: the model also sees the block of neighbouring patches this many cells around each
    # patch, averaged down to its size, as three more channels (``data.neighbourhood``).
    neighbourhood: int = 0

    @property
    def channels(self) -> int:
        """Planes of the model input: the RGB patch, then its neighbourhood's RGB."""
        return 6 if self.neighbourhood else 3

    def model_input(
        self,
        patches: np.ndarray,
        groups: np.ndarray | None = None,
        coords: tuple[np.ndarray, np.ndarray] | None = None,
        out: np.ndarray | None = None,
        workers: int | None = None,
    ) -> np.ndarray:
        """uint8 (N, C, H, W) model input of uint8 (N, H, W, 3) patches.

        Args:
            patches: decoded patches, e.g. a memory map.
            groups: patient (or slide) of each patch; None: all one patient.
            coords: ``(xs, ys)``, each patch's top-left corner in slide pixels, NaN or
                negative where unknown; None: no patch has a place (each is seen alone).
            out: uint8 (N, C, H, W) array to fill; a new one when None.
            workers: threads for the stain normalisation, each on whole patients (the
                cores when None; 1 runs it in the caller, as a worker thread of the
                scoring pipeline must).
        """
        n, h, w, _ = patches.shape
        out = np.empty((n, self.channels, h, w), np.uint8) if out is None else out
        if out.shape != (n, self.channels, h, w) or out.dtype != np.uint8:
            raise ValueError(f"out must be uint8 {(n, self.channels, h, w)}, got {out.shape}")
        if groups is None:
            groups = np.zeros(n, dtype=np.int64)
        if self.stain == "none":
            _to_planes(patches, out)
        else:
            from .stain import normalize_per_patient

            normalize_per_patient(
                patches, groups, self.stain, self.stain_reference, workers=workers, planes=out
            )
        if self.neighbourhood:
            from .neighbourhood import add_neighbourhood

            add_neighbourhood(out, groups, coords, self.neighbourhood)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a float batch in [0, 1] of shape (B, C, H, W), C = len(mean)."""
        import torch

        c = len(self.mean)
        mean = torch.tensor(self.mean, device=x.device).view(1, c, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, c, 1, 1)
        x = (x - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


class Planes:
    """uint8 patches (N, H, W, 3), e.g. a memory map, read as model input (N, 3, H, W)
    without copying them: what ``model_input`` makes of them when there is no stain to
    normalise and no neighbourhood to add. Indexes like the array it would be."""

    def __init__(self, patches: np.ndarray):
        self.patches = patches
        n, h, w, c = patches.shape
        self.shape, self.dtype = (n, c, h, w), np.dtype(np.uint8)

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, rows) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(self.patches[rows]).transpose(0, 3, 1, 2))


def _to_planes(patches: np.ndarray, out: np.ndarray, chunk: int = 4096) -> None:
    """Patches (N, H, W, 3) into planes 0..2 of ``out`` (N, C, H, W), a chunk at a time
    (a memory map is read once, sequentially)."""
    for s in range(0, len(patches), chunk):
        out[s : s + chunk, :3] = np.asarray(patches[s : s + chunk]).transpose(0, 3, 1, 2)


def to_float(batch: np.ndarray | torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """uint8 model input (B, C, H, W) -> float32 in [0, 1] on ``device``."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
    # Move uint8 (4x fewer bytes than float) before converting.
    return t.to(device, non_blocking=True).float().div_(255.0)


def channel_stats(images: np.ndarray, rows: np.ndarray, max_n: int = 20_000, seed: int = 0):
    """Per-plane mean and std of uint8 model input (N, C, H, W) at ``rows`` (a seeded
    sample of at most ``max_n``)."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(rows, size=min(max_n, len(rows)), replace=False))
    total, squares, n = 0.0, 0.0, 0
    for s in range(0, len(pick), 1000):  # in chunks: float64 copies of 20,000 patches are GBs
        x = images[pick[s : s + 1000]].astype(np.float64) / 255.0
        total = total + x.sum(axis=(0, 2, 3))
        squares = squares + (x * x).sum(axis=(0, 2, 3))
        n += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
    return tuple(mean.round(4).tolist()), tuple(std.round(4).tolist())
