"""Calibrated probabilities: ``sigmoid(margin / T + b)`` of the logit margin, with the
temperature T and logit bias b a checkpoint carries (fitted by ``training.calibration``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from scipy.special import expit


def _margin(logits: Any) -> np.ndarray:
    """Positive-class logit margin: z1 - z0 for (N, 2) logits, the logit itself for (N,)."""
    z = logits.detach().cpu().double().numpy() if torch.is_tensor(logits) else np.asarray(logits)
    z = z.astype(np.float64)
    if z.ndim == 2 and z.shape[1] == 2:
        return z[:, 1] - z[:, 0]
    if z.ndim == 1:
        return z
    raise ValueError(f"expected (N, 2) logits or (N,) positive-class logits, got {z.shape}")


def probabilities(logits: Any, temperature: float = 1.0, bias: float = 0.0) -> np.ndarray:
    """P(IDC) = sigmoid((z1 - z0) / T + bias) of (N, 2) logits (array or tensor), in float64:
    ``softmax(logits / T)[:, 1]`` when the bias is 0."""
    return expit(_margin(logits) / temperature + bias)


def calibration_of(ckpt: dict, lone: bool = False) -> tuple[float, float]:
    """A checkpoint's temperature and logit bias: those of patches scored with their
    neighbours, or with ``lone`` of patches scored alone (no coordinates), which a model
    calibrated on out-of-fold lone scores carries as ``lone_calibration`` (else the same)."""
    fields = (lone and ckpt.get("lone_calibration")) or ckpt
    return float(fields.get("temperature", 1.0)), float(fields.get("logit_bias", 0.0))
