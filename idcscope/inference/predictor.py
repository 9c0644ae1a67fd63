"""The model as a user applies it: one checkpoint or an ensemble, calibrated, with a threshold.

``Predictor`` turns uint8 patches into P(IDC): each member applies its own preprocessing,
optionally the 8 dihedral views, its spatial context (each patch's logits averaged with
its neighbours' on the patient's grid, when the patches' coordinates are given; see
``context``) and its temperature (both fitted on its validation patients); an ensemble
averages the members' calibrated probabilities and their thresholds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .checkpoint import load_model
from .context import smooth_rows
from .engine import Preprocessing, fuse_for_inference, predict_logits, probabilities

logger = logging.getLogger(__name__)


class Prediction(NamedTuple):
    prob: np.ndarray  # calibrated, averaged over members
    prob_uncalibrated: np.ndarray


class Predictor:
    """P(IDC) for patches from one or several checkpoints.

    Args:
        checkpoints: a checkpoint path, or several for an ensemble.
        device: where the models run.
        tta: average over the 8 dihedral transforms of each patch.
        batch_size: patches per forward pass.
        precision: "auto" (bf16 where the hardware has it), "bf16" (autocast) or "fp32".
        context: use the patches' places when coordinates are given: the neighbourhood a
            model sees and the smoothing of its logits over the grid. False scores every
            patch alone, as if it came without coordinates.
    """

    def __init__(
        self,
        checkpoints: str | Path | list,
        device: str = "cpu",
        tta: bool = False,
        batch_size: int = 512,
        precision: str = "auto",
        context: bool = True,
    ):
        paths = [checkpoints] if isinstance(checkpoints, str | Path) else list(checkpoints)
        self.paths = [Path(p) for p in paths]
        self.members = []
        for p in self.paths:
            model, ckpt = load_model(p, device)
            prep = Preprocessing(**ckpt["preprocessing"])
            if prep.channels_last:  # the layout the batches come in
                model = model.to(memory_format=torch.channels_last)
            self.members.append((fuse_for_inference(model), ckpt, prep))
        self.device, self.tta, self.batch_size, self.precision = device, tta, batch_size, precision
        self.context = context
        self.threshold = float(np.mean([c.get("threshold", 0.5) for _, c, _ in self.members]))

    @property
    def checkpoints(self) -> list[dict]:
        return [c for _, c, _ in self.members]

    @property
    def context_sigma(self) -> float:
        """Width of the spatial context in use, in grid cells (the members' mean; 0: off)."""
        if not self.context:
            return 0.0
        return float(np.mean([c.get("context", {}).get("sigma", 0.0) for c in self.checkpoints]))

    @property
    def seen_patients(self) -> set[str]:
        """Patients any member trained or validated on."""
        seen: set[str] = set()
        for c in self.checkpoints:
            s = c.get("splits", {})
            seen |= set(s.get("train", [])) | set(s.get("val", []))
        return seen

    def predict(
        self,
        images: np.ndarray,
        rows: np.ndarray | None = None,
        patients: np.ndarray | None = None,
        coords: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Prediction:
        """Calibrated and raw P(IDC) of ``images[rows]`` (all rows when None).

        ``patients`` (one id per image) is needed by members that normalise stains per
        patient; ``coords`` (``(xs, ys)``, each patch's top-left corner in slide pixels, one
        per image, NaN where unknown) by members with spatial context. Without them, those
        members score each patch alone; so do all members when ``context`` is off.
        """
        coords = coords if self.context else None
        calibrated, raw = [], []
        for i, (model, ckpt, prep) in enumerate(self.members):
            desc = "predict" if len(self.members) == 1 else f"predict {i + 1}/{len(self.members)}"
            imgs, idx = prep.model_input(images, rows, patients, coords)
            logits = predict_logits(
                model, imgs, idx, prep, self.batch_size, self.precision, self.device, self.tta, desc
            )
            logits = smooth_rows(logits, rows, patients, coords, ckpt.get("context"))
            calibrated.append(probabilities(logits, float(ckpt.get("temperature", 1.0))))
            raw.append(probabilities(logits))
        return Prediction(np.mean(calibrated, axis=0), np.mean(raw, axis=0))

    def predict_proba(
        self,
        images: np.ndarray,
        rows: np.ndarray | None = None,
        patients: np.ndarray | None = None,
        coords: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Calibrated P(IDC), averaged over the members."""
        return self.predict(images, rows, patients, coords).prob
