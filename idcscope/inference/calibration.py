"""Calibrated probabilities: ``sigmoid(margin / T + b)`` of the logit margin, with the
temperature T and logit bias b a checkpoint carries (fitted by ``training.calibration``)."""

from __future__ import annotations

from typing import Any

import numpy as np


def logit_margin(logits: Any) -> np.ndarray:
    """Positive-class logit margin: z1 - z0 for (N, 2) logits, the logit itself for (N,)."""
    if hasattr(logits, "detach"):  # a tensor
        logits = logits.detach().cpu().double().numpy()
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim == 2 and z.shape[1] == 2:
        return z[:, 1] - z[:, 0]
    if z.ndim == 1:
        return z
    raise ValueError(f"expected (N, 2) logits or (N,) positive-class logits, got {z.shape}")


def probabilities(logits: Any, temperature: float = 1.0, bias: float = 0.0) -> np.ndarray:
    """P(IDC) = sigmoid((z1 - z0) / T + bias) of (N, 2) logits (array or tensor), in float64:
    ``softmax(logits / T)[:, 1]`` when the bias is 0."""
    return sigmoid(logit_margin(logits) / temperature + bias)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)), accurate in both tails (no overflow, no 1 - p cancellation)."""
    return np.exp(-np.logaddexp(0.0, -np.asarray(x, dtype=np.float64)))
