"""Prediction tables: one builder, so that every table names and writes the same things alike.

``predict``, ``evaluate``, ``heatmap``, ``slide`` and the web page each write a row per
patch (or tile): first what identifies it, which is each table's own (a file and its place
on the patient's grid, a tile of a slide, a file as the client named it), then, in this
order, the annotated label where the table knows it, the context the patch was scored in
(``neighbours``: how many of its 8 neighbours were there, empty when scored alone), the
calibrated P(IDC) to 6 decimals,
the call at the threshold, why the row could not be scored where a table keeps such rows,
and the uncalibrated logit margin in full (what ``training.oof`` fits calibration on).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PATCH_IDS = ["path", "patient", "x", "y"]  # a patch file and its place (-1 where unknown)


def prediction_columns(ids: list[str], label: bool = False, error: bool = False) -> list[str]:
    """The columns of a table built by :func:`prediction_table`, in its order."""
    return [
        *ids,
        *(["label"] if label else []),
        "neighbours",
        "prob_idc",
        "pred",
        *(["error"] if error else []),
        "margin",
    ]


def prediction_table(
    ids: pd.DataFrame,
    prob: np.ndarray,
    margin: np.ndarray,
    neighbours: np.ndarray,
    threshold: float,
    label: np.ndarray | None = None,
    error: list[str] | None = None,
) -> pd.DataFrame:
    """A row per scored patch (or tile): ``ids`` and what the model says of it.

    Args:
        ids: the table's own columns, first: what identifies each row.
        prob: calibrated P(IDC), NaN where the row could not be scored (written empty);
            rounded to 6 decimals.
        margin: the uncalibrated logit margin (``inference.predictor.Scored``), kept in
            full: every digit is needed to fit calibration on it.
        neighbours: how many of its 8 neighbours each patch was scored with, NaN where it
            was scored alone (written empty; ``inference.predictor.Scored``).
        threshold: the decision threshold; ``pred`` is 1 at or above it, 0 below, empty
            where ``prob`` is NaN (a nullable integer, so it is written as 0/1, not 0.0).
        label: the annotated class, -1 where unknown (written empty); None: no label column.
        error: why each row could not be scored, "" where it was; None: no error column
            (the table holds scored rows only, the files left out are listed elsewhere).
    """
    prob = np.asarray(prob, dtype=np.float64)
    columns: dict[str, object] = {}
    if label is not None:
        label = np.asarray(label)
        columns["label"] = pd.array(np.where(label >= 0, label, None), dtype="Int64")
    neighbours = np.asarray(neighbours, dtype=np.float64)
    counts = np.where(np.isnan(neighbours), None, np.nan_to_num(neighbours).astype(np.int64))
    columns["neighbours"] = pd.array(counts, dtype="Int64")
    columns["prob_idc"] = prob.round(6)
    columns["pred"] = pd.array(np.where(np.isnan(prob), None, prob >= threshold), dtype="Int64")
    if error is not None:
        columns["error"] = list(error)
    columns["margin"] = np.asarray(margin, dtype=np.float64)
    return ids.reset_index(drop=True).assign(**columns)
