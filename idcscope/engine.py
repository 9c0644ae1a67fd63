"""The training and inference engine: batches from a uint8 patch array, one epoch, inference.

Batches are gathered from the (memory-mapped) uint8 array, turned into float tensors,
augmented as whole batches and normalised; no per-sample Python work sits on the hot path.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .progress import progress_bar

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Preprocessing:
    """What turns a uint8 patch into model input; stored in every checkpoint."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    patch_size: int = 50
    mpp: float = 4.0
    channels_last: bool = True
    stain: str = "none"  # per-patient stain normalisation applied to the uint8 patches
    stain_reference: dict | None = None
    # > 0: the model also sees the block of neighbouring patches this many cells around each
    # patch, averaged down to its size, as three more channels (``data.neighbourhood``).
    neighbourhood: int = 0

    def normalize_stain(self, images: np.ndarray, patients: np.ndarray | None) -> np.ndarray:
        """Per-patient stain normalisation of uint8 patches (a no-op for "none")."""
        if self.stain == "none":
            return images
        from .stain import normalize_per_patient

        if patients is None:
            logger.warning("no patient ids: normalising the stain of all patches together")
            patients = np.zeros(len(images), dtype=np.int64)
        return normalize_per_patient(np.asarray(images), patients, self.stain, self.stain_reference)

    def stain_rows(
        self, images: np.ndarray, rows, patients
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(images, rows)`` for the model: ``images[rows]`` stain-normalised per patient.

        ``patients`` holds one id per image. Without stain normalisation both come back as is.
        """
        if self.stain == "none":
            return images, rows
        rows = np.arange(len(images)) if rows is None else np.asarray(rows)
        pats = None if patients is None else np.asarray(patients)[rows]
        return self.normalize_stain(images[rows], pats), None

    def model_input(self, images: np.ndarray, rows, patients, coords=None) -> tuple:
        """``(array, rows)`` the model reads: :meth:`stain_rows`, then, with a
        ``neighbourhood``, each patch beside its block of neighbours.

        ``patients`` and ``coords`` (``(xs, ys)``, NaN where unknown) hold one entry per
        image; without coordinates every patch is seen alone, on glass.
        """
        imgs, idx = self.stain_rows(images, rows, patients)
        if not self.neighbourhood:
            return imgs, idx
        from .data.neighbourhood import neighbourhood_view

        if idx is not None:
            imgs = imgs[idx]
        if rows is not None:
            rows = np.asarray(rows)
            patients = None if patients is None else np.asarray(patients)[rows]
            coords = None if coords is None else tuple(np.asarray(c)[rows] for c in coords)
        return neighbourhood_view(imgs, patients, coords, self.neighbourhood), None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a float batch in [0, 1] of shape (B, C, H, W), C = len(mean)."""
        c = len(self.mean)
        mean = torch.tensor(self.mean, device=x.device).view(1, c, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, c, 1, 1)
        x = (x - mean) / std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def to_float(batch: np.ndarray | torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 in [0, 1] on ``device``."""
    t = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
    # Move uint8 (4x fewer bytes than float) before converting.
    return t.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)


def channel_stats(images: np.ndarray, rows: np.ndarray, max_n: int = 20_000, seed: int = 0):
    """Per-channel mean and std of the patches at ``rows`` (a seeded sample of at most max_n)."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(rows, size=min(max_n, len(rows)), replace=False))
    x = images[pick].reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(x.mean(0).round(4).tolist()), tuple(x.std(0).round(4).tolist())


class PatchLoader:
    """Batches ``(uint8 (B, H, W, 3) array, int64 labels)`` over ``rows`` of a patch array.

    Each epoch draws a new order from ``(seed, epoch)``, so a resumed run sees the same
    batches as an uninterrupted one. ``balanced`` draws both classes equally often (with
    replacement). With ``world`` processes, each global batch of ``batch_size`` is split
    between them by ``rank``: together they see exactly the batches one process would.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        rows: np.ndarray,
        batch_size: int,
        shuffle: bool = False,
        balanced: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world: int = 1,
    ):
        self.images, self.labels, self.rows = images, labels, np.asarray(rows)
        self.batch_size, self.shuffle, self.balanced = batch_size, shuffle, balanced
        self.seed, self.drop_last, self.rank, self.world = seed, drop_last, rank, world
        self.epoch = 0

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return self.rows
        rng = np.random.default_rng([self.seed, self.epoch])
        if not self.balanced:
            return rng.permutation(self.rows)
        y = self.labels[self.rows]
        p = np.where(y == 1, 0.5 / max((y == 1).sum(), 1), 0.5 / max((y == 0).sum(), 1))
        return rng.choice(self.rows, size=len(self.rows), replace=True, p=p / p.sum())

    def __len__(self) -> int:
        n = len(self.rows)
        # Several processes must take the same number of steps: drop the ragged last batch.
        if self.drop_last or self.world > 1:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        order = self._order()
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size][self.rank :: self.world]
            # Sorted gathers read the memory map sequentially; the batch order does not matter.
            idx = np.sort(idx)
            yield self.images[idx], torch.from_numpy(self.labels[idx].astype(np.int64))


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy with each BatchNorm folded into the convolution or linear before it.

    Same outputs (to float rounding), one pass over each activation fewer. Models that
    torch.fx cannot trace are returned unchanged (in eval mode).
    """
    import copy

    from torch.fx.experimental.optimization import fuse

    model.eval()
    try:
        fused = fuse(copy.deepcopy(model))
    except Exception as e:  # tracing is best effort: an untraceable model still works as is
        logger.debug("BatchNorm folding skipped for %s: %s", type(model).__name__, e)
        return model
    if _n_batchnorms(fused) == _n_batchnorms(model):  # nothing folded: keep the original
        return model
    # Folded weights are new tensors in the default layout: give them the model's.
    if any(
        p.dim() == 4
        and p.is_contiguous(memory_format=torch.channels_last)
        and not p.is_contiguous()
        for p in model.parameters()
    ):
        fused = fused.to(memory_format=torch.channels_last)
    return fused


def _n_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@functools.cache
def _native_bf16(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        caps = getattr(torch.cpu, "get_capabilities", dict)()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return False


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """``"auto"`` is bf16 where the hardware computes it natively, fp32 elsewhere.

    Emulated bf16 is far slower than fp32: on an AVX2-only CPU, training ``cancernet``
    under bf16 autocast runs at a tenth of its fp32 speed.
    """
    if precision != "auto":
        return precision
    return "bf16" if _native_bf16(torch.device(device).type) else "fp32"


def autocast(precision: str, device: str = "cpu"):
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_one_epoch(
    model: nn.Module,
    loader: PatchLoader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    loss_fn: Callable,
    prep: Preprocessing,
    augment: Callable,
    generator: torch.Generator,
    precision: str = "auto",
    device: str = "cpu",
    desc: str = "train",
) -> dict:
    """One pass over ``loader``; returns mean loss, accuracy and images per second."""
    model.train()
    together = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    with progress_bar(desc, total=len(loader)) as advance:
        for batch, y in loader:
            x = prep(augment(to_float(batch, device), generator))
            y = y.to(device)
            with autocast(precision, device):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            diverged = torch.tensor(float(not torch.isfinite(loss)), device=loss.device)
            if together:  # all processes stop at the same batch, none waits in an all-reduce
                torch.distributed.all_reduce(diverged)
            if diverged.item():
                raise FloatingPointError(f"loss became {loss.item()} at image {seen}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            n = len(y)
            total_loss += loss.item() * n
            correct += int((logits.argmax(1) == y).sum())
            seen += n
            advance(1, info=f"loss {total_loss / seen:.4f}")
    elapsed = time.perf_counter() - start
    return {
        "train_loss": total_loss / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "images_per_s": seen / max(elapsed, 1e-9),
        "train_seconds": elapsed,
    }


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    rows: np.ndarray | None,
    prep: Preprocessing,
    batch_size: int = 512,
    precision: str = "auto",
    device: str = "cpu",
    tta: bool = False,
    desc: str = "predict",
) -> torch.Tensor:
    """Logits (float32, on CPU) of the patches at ``rows`` (all when None), in that order."""
    model.eval()
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    out = []
    with progress_bar(desc, total=len(rows)) as advance:
        for s in range(0, len(rows), batch_size):
            idx = rows[s : s + batch_size]
            x = to_float(images[idx], device)
            with autocast(precision, device):
                if tta:
                    from .data.augment import dihedral_all

                    logits = torch.stack([model(prep(v)).float() for v in dihedral_all(x)]).mean(0)
                else:
                    logits = model(prep(x))
            out.append(logits.float().cpu())
            advance(len(idx))
    return torch.cat(out) if out else torch.empty(0, 2)


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> np.ndarray:
    """P(IDC) from two-class logits."""
    return F.softmax(logits / temperature, dim=1)[:, 1].numpy()
