"""The training engine: batches from a uint8 model-input array, one epoch, precision.

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

import numpy as np
import torch
import torch.nn as nn

from .data.preprocess import Preprocessing, to_float
from .progress import progress_bar

logger = logging.getLogger(__name__)


class PatchLoader:
    """Batches ``(uint8 (B, C, H, W) array, int64 labels)`` over ``rows`` of a model-input
    array (``data.preprocess``).

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
