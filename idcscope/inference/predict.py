"""Predict P(IDC) for patch files and folders with nothing but a checkpoint.

Rows are written as they are scored, bucket by bucket (whole patients), so a killed run
keeps every row it finished. Under torchrun the buckets are shared out between the
processes and rank 0 merges their rows into one file, the same as one process writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.manifest import IMAGE_SUFFIXES, index_files
from ..distributed import init_distributed, shard, shutdown
from ..errors import DataError
from ..progress import progress_bar
from .predictor import Predictor, Scored
from .stream import FileSource, make_buckets, young_garbage_only

logger = logging.getLogger(__name__)

COLUMNS = ["path", "patient", "x", "y", "prob_idc", "pred", "error"]


def predict(
    model: str | Path | list | Predictor,
    paths: list[str | Path],
    out_csv: str | Path | None = None,
    batch_size: int | None = None,
    tta: bool = False,
    workers: int | None = None,
    engine: str = "auto",
    precision: str = "fp32",
    context: bool = True,
) -> pd.DataFrame:
    """One row per input file; files that cannot be read keep their row, with the reason.

    Args:
        model: a checkpoint (or exported ``.onnx``), several for an ensemble, or a
            :class:`Predictor` already built.
        paths: patch files and folders.
        out_csv: also write the table here, bucket by bucket as the rows are scored.
        batch_size: patches per forward pass (default: the engine's best).
        tta: average the logits of the 8 dihedral transforms.
        workers: worker threads (default: one per core; under torchrun the cores are
            shared between the processes on a machine).
        engine: "auto" (the faster here), "torch" or "onnx".
        precision: "fp32", "bf16" or "auto" for the torch engine.
        context: use each patch's place (from the coordinates in its name, among the
            patches of its patient): the neighbourhood the model sees and the smoothing of
            logits over the grid, as far as the checkpoint has them. False scores every
            patch alone.

    Returns:
        The table (under torchrun: the merged table on rank 0, an empty one elsewhere).
    """
    with young_garbage_only():  # indexing makes objects by the hundred thousand
        index = index_files(paths)
    table = index.table
    if table.empty and not index.skipped:
        raise DataError(
            f"{', '.join(map(str, paths))}: no image files ({', '.join(IMAGE_SUFFIXES)}) to predict"
        )
    ctx = init_distributed("cpu")
    try:
        if isinstance(model, Predictor):
            predictor = model
        else:
            predictor = Predictor(
                model, engine, tta=tta, batch_size=batch_size, precision=precision,
                context=context, threads=workers or ctx.threads,
            )  # fmt: skip
        out = _predict_table(predictor, table, out_csv, ctx)
    finally:
        shutdown(ctx)
    if not ctx.is_main:
        return pd.DataFrame(columns=COLUMNS)
    skipped = pd.DataFrame(
        [{"path": p, "error": reason} for p, reason in index.skipped], columns=["path", "error"]
    )
    if len(skipped):
        out = pd.concat([out, skipped], ignore_index=True)[COLUMNS]
        if out_csv:
            skipped.reindex(columns=COLUMNS).to_csv(out_csv, mode="a", header=False, index=False)
    n_bad = int((out["error"].fillna("") != "").sum())
    logger.info("%d files: %d predicted, %d could not be read", len(out), len(out) - n_bad, n_bad)
    return out


def _predict_table(predictor: Predictor, table: pd.DataFrame, out_csv, ctx) -> pd.DataFrame:
    """Score ``table`` (this process's share of its buckets) and write the rows."""
    groups = table["patient"].to_numpy()
    coords = (table["x"].to_numpy(), table["y"].to_numpy())  # -1 where the name has none
    buckets = shard(make_buckets(groups), ctx)
    target = None if out_csv is None else Path(out_csv)
    part = target if target is None or not ctx.enabled else target.with_name(
        f".{target.name}.part{ctx.rank}"
    )  # fmt: skip
    parts: list[pd.DataFrame] = []
    with progress_bar("predict", total=sum(len(b.rows) for b in buckets)) as advance:
        for scored in predictor.score(groups, coords, FileSource(table["path"]), buckets):
            rows = _rows(table, scored, predictor.threshold)
            if part is not None:
                rows.to_csv(part, mode="a" if parts else "w", header=not parts, index=False)
            parts.append(rows.assign(bucket=scored.bucket.index) if ctx.enabled else rows)
            advance(len(rows))
    if part is not None and not parts:
        pd.DataFrame(columns=COLUMNS).to_csv(part, index=False)
    mine = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
    if not ctx.enabled:
        return mine
    return _merge(mine, target, ctx)


def _rows(table: pd.DataFrame, scored: Scored, threshold: float) -> pd.DataFrame:
    sub = table.iloc[scored.rows]
    prob = scored.prob
    return pd.DataFrame(
        {
            "path": sub["path"].to_numpy(),
            "patient": sub["patient"].to_numpy(),
            "x": sub["x"].to_numpy(),
            "y": sub["y"].to_numpy(),
            "prob_idc": prob.round(6),
            "pred": pd.array(np.where(np.isnan(prob), None, prob >= threshold), dtype="Int64"),
            "error": scored.reasons,
        }
    )


def _merge(mine: pd.DataFrame, target: Path | None, ctx) -> pd.DataFrame:
    """Rank 0 gathers every process's rows in bucket order: one process's table."""
    import torch.distributed as dist

    gathered: list = [None] * ctx.world if ctx.is_main else None
    dist.gather_object(mine, gathered, dst=0)
    if target is not None:
        target.with_name(f".{target.name}.part{ctx.rank}").unlink(missing_ok=True)
    if not ctx.is_main:
        return mine
    merged = pd.concat(gathered, ignore_index=True).sort_values("bucket", kind="stable")
    merged = merged.drop(columns="bucket").reset_index(drop=True)
    if target is not None:
        merged.to_csv(target, index=False)
    return merged
