"""Prediction tables: one builder, so that every table names and writes the same things alike.

``predict``, ``evaluate``, ``heatmap``, ``slide`` and the web page each write a row per
patch (or tile): first what identifies it, which is each table's own (a file and its place
on the patient's grid, a tile of a slide, a file as the client named it), then, in this
order, the annotated label where the table knows it, the context the patch was scored in
(``neighbours``: how many of its 8 neighbours were there, empty when scored alone), the
calibrated P(IDC) to 6 decimals, the 0/1 decision at the threshold (``pred``), the call
(``idc``, ``no_idc`` or ``uncertain``: decided only where the model's measured error for
that context is small, ``ModelMeta.decisions``), the input check (``ok`` or why the patch
is not what the model was made for, ``data.inputcheck``), why the row could not be scored
where a table keeps such rows, and the uncalibrated logit margin in full (what
``training.oof`` fits calibration on).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

PATCH_IDS = ["path", "patient", "x", "y"]  # a patch file and its place (-1 where unknown)
CALLS = {1: "idc", 0: "no_idc", -1: "uncertain"}  # the codes of ``Verdicts.call``


class Verdicts(NamedTuple):
    """What the model says of each row (see ``inference.predictor.Scored``)."""

    prob: np.ndarray  # calibrated P(IDC), NaN where not scored
    margin: np.ndarray  # uncalibrated logit margin
    neighbours: np.ndarray  # the context: 0-8 neighbours, NaN when scored alone
    call: np.ndarray  # 1, 0 or -1 (``CALLS``), NaN where not scored
    check: np.ndarray  # the input check's reason, "" where not scored

    @classmethod
    def empty(cls, n: int) -> Verdicts:
        """``n`` rows not scored (yet)."""
        return cls(*(np.full(n, np.nan) for _ in range(4)), np.full(n, "", dtype=object))

    def take(self, rows) -> Verdicts:
        return Verdicts(*(v[rows] for v in self))

    def put(self, rows, other: Verdicts) -> None:
        """Write ``other``'s rows into these at ``rows``."""
        for mine, theirs in zip(self, other, strict=True):
            mine[rows] = theirs

    def calls(self) -> np.ndarray:
        """The call of each row as a word (``CALLS``), "" where not scored."""
        return np.array([CALLS.get(int(c), "") if c == c else "" for c in self.call], object)

    def counts(self) -> dict:
        """How many scored rows the model calls IDC, no IDC and uncertain (``calls``), and
        how many the input check passes or flags, by reason (``input_check``)."""
        calls = self.calls()
        checked = self.check[self.check != ""].astype(str)
        reasons, counts = np.unique(checked, return_counts=True)
        return {
            "calls": {c: int((calls == c).sum()) for c in CALLS.values()},
            "input_check": {str(r): int(n) for r, n in zip(reasons, counts, strict=True)},
        }


def prediction_columns(ids: list[str], label: bool = False, error: bool = False) -> list[str]:
    """The columns of a table built by :func:`prediction_table`, in its order."""
    return [
        *ids,
        *(["label"] if label else []),
        "neighbours",
        "prob_idc",
        "pred",
        "call",
        "input_check",
        *(["error"] if error else []),
        "margin",
    ]


def prediction_table(
    ids: pd.DataFrame,
    verdicts: Verdicts,
    threshold: float,
    label: np.ndarray | None = None,
    error: list[str] | None = None,
) -> pd.DataFrame:
    """A row per scored patch (or tile): ``ids`` and what the model says of it.

    Args:
        ids: the table's own columns, first: what identifies each row.
        verdicts: what the model says of each row. P(IDC) is rounded to 6 decimals and
            written empty where the row could not be scored, as are its context (alone
            too), call and check; the logit margin is kept in full: every digit is
            needed to fit calibration on it.
        threshold: the decision threshold; ``pred`` is 1 at or above it, 0 below, empty
            where ``prob`` is NaN (a nullable integer, so it is written as 0/1, not 0.0).
        label: the annotated class, -1 where unknown (written empty); None: no label column.
        error: why each row could not be scored, "" where it was; None: no error column
            (the table holds scored rows only, the files left out are listed elsewhere).
    """
    prob = np.asarray(verdicts.prob, dtype=np.float64)
    columns: dict[str, object] = {}
    if label is not None:
        label = np.asarray(label)
        columns["label"] = pd.array(np.where(label >= 0, label, None), dtype="Int64")
    neighbours = np.asarray(verdicts.neighbours, dtype=np.float64)
    counts = np.where(np.isnan(neighbours), None, np.nan_to_num(neighbours).astype(np.int64))
    columns["neighbours"] = pd.array(counts, dtype="Int64")
    columns["prob_idc"] = prob.round(6)
    columns["pred"] = pd.array(np.where(np.isnan(prob), None, prob >= threshold), dtype="Int64")
    columns["call"] = verdicts.calls()
    columns["input_check"] = np.asarray(verdicts.check, dtype=object)
    if error is not None:
        columns["error"] = list(error)
    columns["margin"] = np.asarray(verdicts.margin, dtype=np.float64)
    return ids.reset_index(drop=True).assign(**columns)
