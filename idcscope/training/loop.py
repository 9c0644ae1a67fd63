"""The training loop: batches from a uint8 model-input array, and one epoch.

Batches are gathered from the (memory-mapped) uint8 array, turned into float tensors,
augmented as whole batches and normalised; no per-sample Python work sits on the hot path.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from ..data.preprocess import Preprocessing, to_float
from ..models.runtime import autocast
from ..progress import progress_bar
from .objective import js_consistency

logger = logging.getLogger(__name__)


class PatchLoader:
    """Batches ``(uint8 (B, C, H, W) array, int64 labels)`` over ``rows`` of a model-input
    array (``data.preprocess``).

    Each epoch draws a new order from ``(seed, epoch)``, so a resumed run sees the same
    batches as an uninterrupted one. ``balanced`` draws both classes equally often (with
    replacement). ``weights`` (one per row of ``rows``) draws each row that much more or
    less often, with replacement, on top of the class balance. With ``world`` processes,
    each global batch of ``batch_size`` is split between them by ``rank``: together they
    see exactly the batches one process would.
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
        weights: np.ndarray | None = None,
    ):
        self.images, self.labels, self.rows = images, labels, np.asarray(rows)
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.batch_size, self.shuffle, self.balanced = batch_size, shuffle, balanced
        self.seed, self.drop_last, self.rank, self.world = seed, drop_last, rank, world
        self.epoch = 0

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return self.rows
        rng = np.random.default_rng([self.seed, self.epoch])
        if not self.balanced and self.weights is None:
            return rng.permutation(self.rows)
        p = np.ones(len(self.rows)) if self.weights is None else self.weights.copy()
        if self.balanced:  # each class half the draws, in proportion to the weights within
            y = self.labels[self.rows]
            for c in (0, 1):
                p[y == c] *= 0.5 / max(p[y == c].sum(), 1e-12)
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
    consistency: float = 0.0,
) -> dict:
    """One pass over ``loader``; returns mean loss, accuracy and images per second.

    With ``consistency``, each step sees two augmentations of every patch, and the loss
    adds that weight times the divergence of their predictions (``js_consistency``).
    """
    model.train()
    together = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    total_loss, correct, seen = 0.0, 0, 0
    views = 2 if consistency else 1
    start = time.perf_counter()
    with progress_bar(desc, total=len(loader)) as advance:
        for batch, y in loader:
            x = [prep(augment(to_float(batch, device), generator)) for _ in range(views)]
            x = torch.cat(x) if views > 1 else x[0]  # one view: no copy of the batch
            y = y.to(device)
            with autocast(precision, device):
                logits = model(x).float()
            loss = loss_fn(logits, y.repeat(views))
            if consistency:
                loss = loss + consistency * js_consistency(logits, views)
            logits = logits[: len(y)]
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


def validation_pass(
    model, data, rows, prep, precision: str, device="cpu"
) -> tuple[float, torch.Tensor]:
    """Validation loss and logits of the patches at ``rows``, computed as inference does."""
    from ..inference.backends import TorchBackend

    backend = TorchBackend(model, prep, device, precision)
    logits = torch.from_numpy(backend.logits(np.asarray(data.images[rows])))
    y = torch.from_numpy(data.labels[rows].astype(np.int64))
    loss = nn.functional.cross_entropy(logits, y).item() if len(rows) else math.nan
    return loss, logits
