"""What the validation patients decide after training: spatial context, temperature, threshold.

In that order: the context width changes how confident the logits are, so the temperature
is fitted on the smoothed logits, and the threshold on the calibrated probabilities the
model will output. Nothing here ever sees test patients.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..data.dataset import PatchData
from ..data.grid import STEP, smooth
from ..evaluation import metrics
from ..models.checkpoint import read_checkpoint, update_checkpoint
from .calibration import fit_posthoc, fit_sigma
from .config import TrainConfig
from .loop import validation_pass

logger = logging.getLogger(__name__)


def fit_on_validation(
    logits: torch.Tensor, data: PatchData, val_rows: np.ndarray, cfg: TrainConfig
) -> tuple[dict, np.ndarray]:
    """Checkpoint fields fitted on ``logits`` of ``data``'s ``val_rows``, and the calibrated
    validation probabilities.

    The fields: ``context`` (``{"sigma", "step"}``, plus each candidate width's validation
    log-loss with ``cfg.context == "grid"``), those of `fit_posthoc` on the (smoothed)
    logits (``temperature``, ``logit_bias``, ``threshold``, ``threshold_method``,
    ``calibration``: ECE, Brier, NLL before and after) and ``val_metrics``. Without
    validation patients: no context, T = 1, no bias, threshold 0.5.
    """
    y = data.labels[val_rows]
    context: dict = {"sigma": 0.0, "step": STEP}
    if cfg.context == "grid" and len(val_rows):
        where = (data.patients[val_rows], *(data.table[c].to_numpy()[val_rows] for c in "xy"))
        sigma, losses = fit_sigma(logits.numpy(), y, *where, step=STEP)
        context.update(sigma=sigma, val_log_loss={str(k): v for k, v in losses.items()})
        logits = torch.from_numpy(smooth(logits.numpy(), *where, sigma, STEP)).float()
    fitted, prob = fit_posthoc(logits, y, cfg, "validation patients")
    val = metrics.binary_metrics(y, prob, fitted["threshold"]) if len(val_rows) else {}
    return {"context": context, **fitted, "val_metrics": val}, prob


def finalize(out: Path, model, data, val_rows, prep, cfg, history) -> dict:
    """With the best weights, fit what the validation patients decide (``posthoc``).

    It is stored in both checkpoints, with the validation labels and calibrated
    probabilities, so that nothing downstream ever needs the test data to decide anything.
    """
    best = read_checkpoint(out / "best.pt")
    model.load_state_dict(best["state_dict"])
    device = next(model.parameters()).device.type
    _, logits = validation_pass(model, data, val_rows, prep, "fp32", device)
    fitted, val_prob = fit_on_validation(logits, data, val_rows, cfg)
    images_per_s = float(np.median([h["images_per_s"] for h in history])) if history else None
    summary = {**fitted, "best_epoch": best["epoch"], "images_per_s": images_per_s}
    val_record = {
        "labels": torch.from_numpy(data.labels[val_rows].astype(np.int64)),
        "prob": torch.from_numpy(val_prob.astype(np.float32)),
    }
    for name in ("best.pt", "last.pt"):
        update_checkpoint(out / name, **summary, validation=val_record)
    logger.info(
        "best epoch %d; context sigma %.2f; temperature %.3f, bias %.3f; threshold %.3f (%s, %d patches)",
        best["epoch"],
        summary["context"]["sigma"],
        summary["temperature"],
        summary["logit_bias"],
        summary["threshold"],
        summary["threshold_method"],
        len(val_rows),
    )
    return summary
