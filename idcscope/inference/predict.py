"""Predict P(IDC) for patch files and folders with nothing but a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .context import smooth_rows
from .data.cache import decode_files
from .data.manifest import IMAGE_SUFFIXES, index_files
from .engine import Preprocessing, probabilities
from .errors import DataError, IdcscopeError
from .inference import Predictor

logger = logging.getLogger(__name__)

COLUMNS = ["path", "patient", "x", "y", "prob_idc", "pred", "error"]


def predict(
    checkpoint: str | Path,
    paths: list[str | Path],
    out_csv: str | Path | None = None,
    batch_size: int = 512,
    tta: bool = False,
    workers: int | None = None,
    engine: str = "torch",
    precision: str = "auto",
    context: bool = True,
) -> pd.DataFrame:
    """One row per input file; files that cannot be read keep their row, with the reason.

    Args:
        checkpoint: an idcscope checkpoint, or with ``engine="onnx"`` also an exported ``.onnx``.
        paths: patch files and folders.
        out_csv: also write the table here.
        batch_size: patches per forward pass.
        tta: average the logits of the 8 dihedral transforms.
        workers: decoding processes (default: the cores, at most 8).
        engine: "torch", or "onnx" for ONNX Runtime (a checkpoint is exported first).
        precision: "auto", "bf16" or "fp32" for the torch engine; ONNX Runtime always runs fp32.
        context: use each patch's place (from the coordinates in its name, among the
            patches of its patient): the neighbourhood the model sees and the smoothing of
            logits over the grid, as far as the checkpoint has them. False scores every
            patch alone.
    """
    index = index_files(paths)
    table = index.table
    if table.empty and not index.skipped:
        raise DataError(
            f"{', '.join(map(str, paths))}: no image files ({', '.join(IMAGE_SUFFIXES)}) to predict"
        )
    decoded = decode_files(list(table["path"]), workers=workers)
    rows = np.flatnonzero(decoded.ok)
    prob = np.full(len(table), np.nan)
    score, threshold = _scorer(checkpoint, engine, batch_size, tta, precision)
    # -1 where the name has none; without context no patch has a place
    coords = (table["x"].to_numpy(), table["y"].to_numpy()) if context else None
    prob[rows] = score(decoded.images, rows, table["patient"].to_numpy(), coords)
    errors = dict(decoded.errors)
    out = pd.DataFrame(
        {
            "path": table["path"],
            "patient": table["patient"],
            "x": table["x"],
            "y": table["y"],
            "prob_idc": prob.round(6),
            "pred": pd.array(np.where(np.isnan(prob), None, prob >= threshold), dtype="Int64"),
            "error": [errors.get(p, "") for p in table["path"]],
        }
    )
    skipped = pd.DataFrame(
        [{"path": p, "error": reason} for p, reason in index.skipped], columns=["path", "error"]
    )
    out = pd.concat([out, skipped], ignore_index=True)[COLUMNS] if len(skipped) else out
    n_bad = int((out["error"].fillna("") != "").sum())
    logger.info("%d files: %d predicted, %d could not be read", len(out), len(out) - n_bad, n_bad)
    if out_csv:
        out.to_csv(out_csv, index=False)
    return out


def _scorer(checkpoint, engine: str, batch_size: int, tta: bool, precision: str):
    """``(function of (images, rows, patients, coords) -> calibrated P(IDC), threshold)``."""
    if engine == "torch":
        predictor = Predictor(checkpoint, tta=tta, batch_size=batch_size, precision=precision)
        return predictor.predict_proba, predictor.threshold
    if engine == "onnx":
        from .export import OnnxPredictor

        runner = OnnxPredictor.from_path(checkpoint)
        # Per-patient stain normalisation needs all of a patient's patches: it runs in numpy
        # on the uint8 patches, before the graph.
        prep = Preprocessing(**runner.metadata.get("preprocessing", {}))

        def score(images, rows, patients, coords):
            stained, idx = prep.model_input(images, rows, patients, coords)
            logits = runner.predict_logits(stained, idx, batch_size=batch_size, tta=tta)
            # smoothing on the grid, after the graph
            logits = smooth_rows(logits, rows, patients, coords, runner.metadata.get("context"))
            return probabilities(logits, runner.temperature)

        return score, runner.threshold
    raise IdcscopeError(f"unknown engine {engine!r}; choose 'torch' or 'onnx'")
