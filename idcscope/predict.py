"""Predict P(IDC) for patch files and folders with nothing but a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoint import load_model
from .data.cache import decode_files
from .data.manifest import index_files
from .engine import Preprocessing, predict_logits, probabilities

logger = logging.getLogger(__name__)

COLUMNS = ["path", "patient", "x", "y", "prob_idc", "pred", "error"]


def predict(checkpoint: str | Path, paths: list[str | Path], out_csv: str | Path | None = None,
            batch_size: int = 512, tta: bool = False, workers: int | None = None) -> pd.DataFrame:  # fmt: skip
    """One row per input file; files that cannot be read keep their row, with the reason."""
    model, ckpt = load_model(checkpoint)
    prep = Preprocessing(**ckpt["preprocessing"])
    threshold = float(ckpt.get("threshold", 0.5))
    index = index_files(paths)
    table = index.table
    decoded = decode_files(list(table["path"]), workers=workers)
    rows = np.flatnonzero(decoded.ok)
    prob = np.full(len(table), np.nan)
    prob[rows] = probabilities(predict_logits(model, decoded.images, rows, prep, batch_size,
                                              tta=tta))  # fmt: skip
    errors = dict(decoded.errors)
    out = pd.DataFrame({
        "path": table["path"], "patient": table["patient"], "x": table["x"], "y": table["y"],
        "prob_idc": prob.round(6),
        "pred": pd.array(np.where(np.isnan(prob), None, prob >= threshold), dtype="Int64"),
        "error": [errors.get(p, "") for p in table["path"]],
    })  # fmt: skip
    skipped = pd.DataFrame([{"path": p, "error": reason} for p, reason in index.skipped],
                           columns=["path", "error"])  # fmt: skip
    out = pd.concat([out, skipped], ignore_index=True)[COLUMNS] if len(skipped) else out
    n_bad = int((out["error"].fillna("") != "").sum())
    logger.info("%d files: %d predicted, %d could not be read", len(out), len(out) - n_bad, n_bad)
    if out_csv:
        out.to_csv(out_csv, index=False)
    return out
