"""What training minimises and how: the loss (class-weighted, focal), the optimiser and
its learning-rate schedule, each built from the config."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TrainConfig

logger = logging.getLogger(__name__)


def make_optimizer(cfg: TrainConfig, model: nn.Module, steps_per_epoch: int):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=max(total, 1), pct_start=0.15
        )
    elif cfg.schedule == "keras_decay":
        decay = cfg.lr / cfg.epochs  # Keras: lr_t = lr0 / (1 + decay * iterations)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + decay * step))
    else:
        sched = None
    return opt, sched


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by ``(1 - p_true) ** gamma``, so
    easy patches weigh little; ``weight`` balances the classes as in cross-entropy."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits, 1).gather(1, target[:, None])[:, 0]
        loss = -((1 - logp.exp()) ** self.gamma) * logp
        if self.weight is None:
            return loss.mean()
        w = self.weight[target]
        return (w * loss).sum() / w.sum()


def js_consistency(logits: torch.Tensor, views: int = 2) -> torch.Tensor:
    """Jensen-Shannon divergence between the predictions on ``views`` augmentations of the
    same patches, stacked view after view along the batch (AugMix, Hendrycks et al. 2020)."""
    p = F.softmax(logits, 1).view(views, -1, logits.shape[1])
    log_mixture = p.mean(0).clamp(min=1e-7).log()
    return sum(F.kl_div(log_mixture, q, reduction="batchmean") for q in p) / views


def make_loss(cfg: TrainConfig, train_labels: np.ndarray) -> nn.Module:
    weight = None
    if cfg.imbalance in ("class_weight", "focal"):
        counts = np.bincount(train_labels, minlength=2).astype(np.float64)
        weight = torch.tensor(len(train_labels) / (2 * np.maximum(counts, 1)), dtype=torch.float32)
        logger.info("class weights %s", [round(w, 3) for w in weight.tolist()])
    if cfg.imbalance == "focal":
        return FocalLoss(gamma=2.0, weight=weight)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
