"""Train a frozen backbone's head on cached features: the backbone runs once, not every epoch.

With a frozen backbone in eval mode (``FrozenBackboneNet``, the study's ResNet-50) the
pooled features of a patch never change during training, so the head can learn from a
cache of them. That is exact only for the views that were cached: per-epoch random
augmentation is lost. ``views=8`` caches all 8 dihedral transforms (8x the extraction and
the memory) and ``train_head`` draws one of them per patch and epoch, which keeps the
dihedral augmentation exactly; stain and colour jitter cannot be cached.

Features are kept in float16 by default: N x 2048 x 2 bytes per view for ResNet-50.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from idcscope.data.preprocess import Preprocessing, to_float
from idcscope.errors import IdcscopeError
from idcscope.models.runtime import autocast
from idcscope.progress import progress_bar

logger = logging.getLogger(__name__)


def split_frozen(model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]:
    """``(frozen part: images -> pooled features, trainable head: features -> logits)``.

    Raises ``IdcscopeError`` unless the model is a frozen backbone with a pool-flatten head.
    """
    head = getattr(model, "head", None)
    pool_first = isinstance(head, nn.Sequential) and [type(m) for m in head[:2]] == [
        nn.AdaptiveAvgPool2d,
        nn.Flatten,
    ]
    if not (getattr(model, "frozen", False) and hasattr(model, "forward_features") and pool_first):
        raise IdcscopeError(
            f"{type(model).__name__}: feature caching needs a frozen backbone with a "
            "pool-flatten head (e.g. resnet50 without fine_tune)"
        )

    def frozen(x: torch.Tensor) -> torch.Tensor:
        return head[:2](model.forward_features(x))

    return frozen, head[2:]


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: np.ndarray,
    rows: np.ndarray | None,
    prep: Preprocessing,
    batch_size: int = 512,
    precision: str = "auto",
    views: int = 1,
    dtype: torch.dtype = torch.float16,
    device: str = "cpu",
) -> torch.Tensor:
    """Pooled backbone features of the uint8 patches at ``rows`` (all when None).

    Args:
        model: a frozen-backbone model (see ``split_frozen``).
        images: uint8 patches (N, H, W, 3), e.g. a memory-mapped cache.
        rows: which patches, in this order.
        prep: the normalisation the model was built for.
        batch_size: patches per forward pass.
        precision: "auto" (bf16 where the hardware has it), "bf16" (autocast) or "fp32".
        views: 1 (the patches as they are) or 8 (every dihedral transform, identity first).
        dtype: storage type of the features.
        device: where the backbone runs.

    Returns:
        Features (views, len(rows), C) on the CPU.
    """
    from idcscope.data.augment import dihedral_all

    if views not in (1, 8):
        raise ValueError(f"views must be 1 or 8, got {views}")
    frozen, _ = split_frozen(model)
    model.eval()
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    out: list[torch.Tensor] = []
    with progress_bar("features", total=len(rows)) as advance:
        for s in range(0, len(rows), batch_size):
            x = to_float(images[rows[s : s + batch_size]], device)
            x = dihedral_all(x) if views == 8 else x[None]
            with autocast(precision, device):
                f = torch.stack([frozen(prep(v)) for v in x])
            out.append(f.to("cpu", dtype))
            advance(x.shape[1])
    if not out:
        raise IdcscopeError("no patches to extract features from")
    return torch.cat(out, dim=1)


def train_head(
    model: nn.Module,
    features: torch.Tensor,
    labels: np.ndarray,
    epochs: int = 20,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    loss_fn: Callable | None = None,
    seed: int = 0,
) -> list[dict]:
    """Train the model's head in place on cached features with Adam.

    Args:
        model: the model the features came from; only its head changes.
        features: (views, N, C) from ``extract_features``; each epoch draws one view per patch.
        labels: class of each of the N patches.
        epochs: passes over the N patches.
        batch_size: patches per optimiser step.
        lr: Adam learning rate.
        weight_decay: L2 penalty.
        loss_fn: defaults to cross-entropy.
        seed: seeds the order, the views drawn and dropout.

    Returns:
        One dict per epoch: epoch, train_loss, train_acc, seconds.
    """
    _, head = split_frozen(model)
    views, n = features.shape[:2]
    if len(labels) != n:
        raise ValueError(f"{n} feature rows but {len(labels)} labels")
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    head.train()
    history = []
    for epoch in range(epochs):
        start, total, correct = time.perf_counter(), 0.0, 0
        order = torch.randperm(n, generator=gen)
        view = torch.randint(0, views, (n,), generator=gen)
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            logits = head(features[view[idx], idx].float())
            loss = loss_fn(logits, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y_all[idx]).sum())
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": total / n,
                "train_acc": correct / n,
                "seconds": time.perf_counter() - start,
            }
        )
    head.eval()
    return history
