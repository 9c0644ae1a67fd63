"""Predict P(IDC) for patch files and folders with nothing but a checkpoint.

Rows are written as they are scored, bucket by bucket (whole patients), so a killed run
keeps every row it finished, and a write that fails (a full disk) is cut back to the last
whole row before the run stops. Under torchrun the buckets are shared out between the
processes and rank 0 merges their rows into one file, the same as one process writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import pandas as pd

from ..data.manifest import IMAGE_SUFFIXES, index_files
from ..distributed import process_group, shard
from ..errors import DataError, IdcscopeError
from .predictor import Predictor, Scored
from .stream import make_buckets, young_garbage_only
from .tables import PATCH_IDS, prediction_columns, prediction_table

logger = logging.getLogger(__name__)

# A patch file, its place, what the model says and why a file could not be read (its
# prob_idc, pred and margin empty): see ``inference.tables``.
COLUMNS = prediction_columns(PATCH_IDS, error=True)


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
    alpha: float | None = None,
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
        alpha: the uncertain band the calls are made with (see :class:`Predictor`).

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
    with process_group("cpu") as ctx:
        if isinstance(model, Predictor):
            predictor = model
        else:
            predictor = Predictor(
                model, engine, tta=tta, batch_size=batch_size, precision=precision,
                context=context, threads=workers or ctx.threads, alpha=alpha,
            )  # fmt: skip
        out = _predict_table(predictor, table, out_csv, ctx)
    if not ctx.is_main:
        return pd.DataFrame(columns=COLUMNS)
    skipped = pd.DataFrame(
        [{"path": p, "error": reason} for p, reason in index.skipped], columns=["path", "error"]
    )
    if len(skipped):
        out = pd.concat([out, skipped], ignore_index=True)[COLUMNS]
        if out_csv:
            with RowWriter(out_csv, append=True) as writer:
                writer.write(skipped.reindex(columns=COLUMNS))
    n_bad = int((out["error"].fillna("") != "").sum())
    logger.info("%d files: %d predicted, %d could not be read", len(out), len(out) - n_bad, n_bad)
    return out


def _predict_table(predictor: Predictor, table: pd.DataFrame, out_csv, ctx) -> pd.DataFrame:
    """Score ``table`` (this process's share of its buckets), writing each bucket's rows
    as it is scored."""
    buckets = shard(make_buckets(table["patient"].to_numpy()), ctx)
    target = None if out_csv is None else Path(out_csv)
    part = target if target is None or not ctx.enabled else target.with_name(
        f".{target.name}.part{ctx.rank}"
    )  # fmt: skip
    parts: list[pd.DataFrame] = []
    writer = RowWriter(part) if part is not None else None
    ids = table[PATCH_IDS]

    def write(scored: Scored) -> None:
        rows = prediction_table(
            ids.iloc[scored.rows], scored.verdicts, predictor.threshold, error=scored.reasons
        )
        if writer is not None:
            writer.write(rows)
        parts.append(rows.assign(bucket=scored.bucket.index) if ctx.enabled else rows)

    with writer or contextlib.nullcontext():
        if writer is not None:
            writer.write(pd.DataFrame(columns=COLUMNS), header=True)
        predictor.score_files(table, buckets=buckets, each=write)
    mine = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
    if not ctx.enabled:
        return mine
    return _merge(mine, target, ctx)


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
        with RowWriter(target) as writer:
            writer.write(merged, header=True)
    return merged


class RowWriter:
    """A CSV file that only ever holds whole rows: each ``write`` appends its rows and
    flushes them, and a write that fails (disk full, I/O error) is cut back to the rows
    before it and raised as an :class:`IdcscopeError` that names the file."""

    def __init__(self, path: str | Path, append: bool = False):
        self.path = Path(path)
        self.n_rows = 0
        try:
            flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0)  # no \r\n on Windows
            self._fd = os.open(self.path, flags | (0 if append else os.O_TRUNC), 0o666)
            self._size = os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as e:
            raise IdcscopeError(f"{self.path}: cannot write ({e.strerror})") from e

    def write(self, rows: pd.DataFrame, header: bool = False) -> None:
        data = rows.to_csv(index=False, header=header, lineterminator="\n").encode()
        try:
            _write_all(self._fd, data)
        except OSError as e:
            with contextlib.suppress(OSError):  # truncating frees space: it works when full
                os.ftruncate(self._fd, self._size)
            raise IdcscopeError(
                f"{self.path}: write failed ({e.strerror}); it keeps the {self.n_rows} "
                "whole rows written before"
            ) from e
        self._size += len(data)
        self.n_rows += len(rows)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> RowWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd`` (``os.write`` may write part of it), at the end."""
    view = memoryview(data)
    os.lseek(fd, 0, os.SEEK_END)
    while view:
        view = view[os.write(fd, view) :]
