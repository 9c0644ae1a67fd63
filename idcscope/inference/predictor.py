"""The model as a user applies it: one checkpoint or an ensemble, calibrated, with a threshold.

``Predictor`` is the one path from decoded pixels to P(IDC) that every command takes
(predict, evaluate, ensemble, cv, explain, heatmap, slide and the web page). Per member:
the stain normalisation fitted on each patient's (or slide's) own patches and the
neighbourhood input (``data.preprocess``, the function training used), the forward pass
(torch or ONNX Runtime, ``inference.backends``), optionally over the 8 dihedral views,
the spatial context (each patch's logits averaged with its neighbours' on the patient's
grid, ``data.grid``) and the temperature, both fitted on the validation patients;
an ensemble averages the members' calibrated probabilities and their thresholds.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..data import PATCH_SIZE
from ..data.grid import neighbour_counts, smooth_rows
from ..data.inputcheck import check_patches
from ..data.preprocess import Preprocessing
from ..errors import CheckpointError
from ..models.schema import ModelMeta, call_codes
from ..progress import progress_bar
from .backends import create_backend
from .calibration import probabilities
from .stream import ArraySource, Bucket, FileSource, Loaded, make_buckets, run_pipeline
from .tables import Verdicts
from .workers import FORWARD, workers

logger = logging.getLogger(__name__)


class Prediction(NamedTuple):
    prob: np.ndarray  # calibrated, averaged over members
    prob_uncalibrated: np.ndarray
    margin: np.ndarray  # uncalibrated logit margin (see `Scored`)
    neighbours: np.ndarray  # the context each was scored in (see `Scored`)
    call: np.ndarray  # 1 IDC, 0 no IDC, -1 uncertain (see `Scored`)
    check: np.ndarray  # the input check's reason (see `Scored`)

    @property
    def verdicts(self) -> Verdicts:
        return Verdicts(self.prob, self.margin, self.neighbours, self.call, self.check)


@dataclass
class Scored:
    """One bucket scored: P(IDC) for each of its rows, NaN where a file could not be read.

    ``margin`` is the logit margin logit[IDC] - logit[no IDC] before calibration (after
    each member's spatial context), in float64: the mean of the members' margins for an
    ensemble. It is what calibration and thresholds are fitted on (``training.oof``).
    ``neighbours`` is the context a patch was scored in: how many of its 8 neighbours
    were there (0 to 8; ``data.grid.neighbour_counts``), NaN for a patch scored alone (no
    place, or context off) or not read. It chooses the calibration of each patch and the
    band where it is called uncertain (``ModelMeta.decisions``): ``call`` is 1 (IDC), 0
    (no IDC) or -1 (uncertain), NaN where not read. ``check`` is the input check's reason
    (``data.inputcheck``): "ok", or why the patch is not what the model was made for,
    which makes its call uncertain; "" where not read.
    """

    bucket: Bucket
    prob: np.ndarray
    prob_uncalibrated: np.ndarray
    margin: np.ndarray
    neighbours: np.ndarray
    call: np.ndarray
    check: np.ndarray
    reasons: list[str]  # why each unreadable row failed, "" elsewhere
    patches: np.ndarray  # the decoded patches of the rows that were read, in row order

    @property
    def rows(self) -> np.ndarray:
        return self.bucket.rows

    @property
    def verdicts(self) -> Verdicts:
        return Verdicts(self.prob, self.margin, self.neighbours, self.call, self.check)


class TableScores(NamedTuple):
    """A table's rows scored, in table order."""

    prob: np.ndarray  # calibrated P(IDC) per row, NaN where the file could not be read
    raw: np.ndarray  # uncalibrated
    margin: np.ndarray  # uncalibrated logit margin (see `Scored`)
    neighbours: np.ndarray  # the context each row was scored in (see `Scored`)
    call: np.ndarray  # 1 IDC, 0 no IDC, -1 uncertain, NaN where not read (see `Scored`)
    check: np.ndarray  # the input check's reason, "" where not read (see `Scored`)
    ok: np.ndarray
    reasons: list[str]  # why each unreadable file failed, "" elsewhere
    n_padded: int  # patches smaller than 50x50, padded with glass
    patches: np.ndarray | None  # with ``keep_patches``: the decoded patches of the ok rows

    @property
    def verdicts(self) -> Verdicts:
        return Verdicts(self.prob, self.margin, self.neighbours, self.call, self.check)


@dataclass
class Member:
    """One model of a predictor: its checkpoint fields, preprocessing and backend."""

    path: Path
    meta: ModelMeta
    prep: Preprocessing
    backend: object


def load_member(path, engine, device, precision, batch_size, threads) -> Member:
    from .backends import onnx_backend

    path = Path(path)
    if path.suffix == ".onnx":  # an exported graph describes itself in its metadata
        backend = onnx_backend(path, batch_size, threads)
        meta = ModelMeta.from_fields(backend.model.metadata, path)
        return Member(path, meta, Preprocessing(**meta.preprocessing), backend)
    from ..models.checkpoint import read_meta

    meta = read_meta(path)  # its weights are read by the backend that needs them
    prep = Preprocessing(**meta.preprocessing)
    backend = create_backend(path, prep, engine, device, precision, batch_size, threads)
    return Member(path, meta, prep, backend)


class Predictor:
    """P(IDC) for patches from one or several checkpoints.

    Args:
        checkpoints: a checkpoint (or exported ``.onnx``) path, or several for an ensemble.
        engine: "auto" (the faster here), "torch" or "onnx" (ONNX Runtime, CPU).
        device: where torch runs.
        tta: average over the 8 dihedral transforms of each patch.
        batch_size: patches per forward pass (default: the engine's best).
        precision: "fp32", "bf16" (autocast, torch only: faster on CPUs with native bf16,
            P(IDC) within about 1e-2 of fp32) or "auto" (bf16 where native).
        context: use the patches' places when coordinates are given: the neighbourhood a
            model sees and the smoothing of its logits over the grid. False scores every
            patch alone, as if it came without coordinates.
        threads: worker threads that decode, prepare and run ONNX Runtime's batches
            (default: one per core; see ``inference.workers``).
        alpha: the uncertain band to call with: the largest share of each class's decided
            patches called wrong, one of those the model was fitted at
            (``ModelMeta.alphas``); None: the model's own (0.05 unless refitted).
    """

    def __init__(
        self,
        checkpoints: str | Path | list,
        engine: str = "auto",
        device: str = "cpu",
        tta: bool = False,
        batch_size: int | None = None,
        precision: str = "fp32",
        context: bool = True,
        threads: int | None = None,
        alpha: float | None = None,
    ):
        paths = [checkpoints] if isinstance(checkpoints, str | Path) else list(checkpoints)
        self.members = [
            load_member(p, engine, device, precision, batch_size, threads) for p in paths
        ]
        self.alpha = alpha
        for m in self.members if alpha is not None else ():  # refused before any scoring
            if not m.meta.contexts:
                raise CheckpointError(f"{m.path}: calls no patch uncertain (no scoring contexts)")
            try:
                m.meta.bands(alpha)
            except ValueError as e:
                raise CheckpointError(f"{m.path}: {e}") from None
        self.paths = [m.path for m in self.members]
        self.tta, self.context, self.threads = tta, context, threads
        self.threshold = float(np.mean([m.meta.threshold for m in self.members]))
        checks = [m.meta.input_check for m in self.members if m.meta.input_check]
        self.input_check = checks[0] if checks else {}  # the first member's that has one

    @property
    def models(self) -> list[ModelMeta]:
        """What each member's checkpoint says of its model."""
        return [m.meta for m in self.members]

    @property
    def engine(self) -> str:
        return "+".join(sorted({m.backend.name for m in self.members}))

    @property
    def context_sigma(self) -> float:
        """Width of the spatial context in use, in grid cells (the members' mean; 0: off)."""
        if not self.context:
            return 0.0
        return float(np.mean([m.context.get("sigma", 0.0) for m in self.models]))

    @property
    def seen_patients(self) -> set[str]:
        """Patients any member trained or validated on."""
        return set().union(*(m.seen_patients for m in self.models))

    def model_input(self, patches: np.ndarray, groups=None, coords=None, member: int = 0):
        """What member ``member`` reads for these patches (see ``data.preprocess``)."""
        return self.members[member].prep.model_input(patches, groups, self._coords(coords))

    def _coords(self, coords):
        return coords if self.context else None

    def score(
        self,
        groups: np.ndarray,
        coords: tuple[np.ndarray, np.ndarray] | None,
        source,
        buckets: list[Bucket] | None = None,
    ) -> Iterator[Scored]:
        """Score every row of a table, bucket by bucket, in order.

        Args:
            groups: patient (or slide) of each row.
            coords: ``(xs, ys)`` of each row (NaN or negative where unknown), or None.
            source: where the patches come from (``stream.FileSource`` decodes files,
                ``stream.ArraySource`` reads an array), one per row.
            buckets: the buckets to score (default: all rows, see ``stream.make_buckets``).
        """
        groups = np.asarray(groups)
        coords = self._coords(coords)
        if coords is not None:
            coords = tuple(np.asarray(c, dtype=np.float64) for c in coords)
        buckets = make_buckets(groups) if buckets is None else buckets

        def where(loaded: Loaded):
            rows = loaded.bucket.rows[loaded.ok]
            return groups[rows], None if coords is None else tuple(c[rows] for c in coords)

        def prepare(loaded: Loaded) -> tuple[list[np.ndarray], np.ndarray]:
            g, xy = where(loaded)
            # On a worker thread, beside the others: no threads of its own.
            inputs = [m.prep.model_input(loaded.patches, g, xy, workers=1) for m in self.members]
            return inputs, check_patches(self.input_check, loaded.patches, workers=1)

        def launch(loaded: Loaded) -> list:
            priority = (FORWARD, loaded.bucket.index)
            return [
                m.backend.submit(x, self.tta, priority)
                for m, x in zip(self.members, loaded.prepared[0], strict=True)
            ]

        def finish(loaded: Loaded, waits) -> Scored:
            g, xy = where(loaded)
            neighbours = np.full(len(g), np.nan) if xy is None else neighbour_counts(g, *xy)
            calibrated, raw, margins, below, above = [], [], [], [], []
            for member, wait in zip(self.members, waits, strict=True):
                logits = smooth_rows(wait(), g, xy, member.meta.context)
                margins.append(logits[:, 1].astype(np.float64) - logits[:, 0])
                d = member.meta.decisions(neighbours, self.alpha)  # each by its context
                calibrated.append(probabilities(margins[-1], d.temperature, d.logit_bias))
                raw.append(probabilities(logits))
                below.append(d.no_idc_below)
                above.append(d.idc_from)
            prob = np.mean(calibrated, axis=0)
            band = (np.mean(below, axis=0), np.mean(above, axis=0))  # an ensemble: the mean
            check = loaded.prepared[1]
            call = np.where(check == "ok", call_codes(prob, *band), -1.0)
            unread = np.full(len(loaded.ok), "", dtype=object)
            unread[loaded.ok] = check
            return Scored(
                loaded.bucket,
                *(_spread(v, loaded.ok) for v in (prob, np.mean(raw, axis=0))),
                *(_spread(v, loaded.ok) for v in (np.mean(margins, axis=0), neighbours, call)),
                unread,
                loaded.reasons,
                loaded.patches,
            )

        pool = workers(self.threads)
        for loaded in run_pipeline(buckets, source, prepare, launch, pool):
            yield finish(loaded, loaded.launched)

    def score_files(
        self,
        table,
        root: str | Path = "",
        desc: str = "predict",
        keep_patches: bool = False,
        buckets: list[Bucket] | None = None,
        each: Callable[[Scored], None] | None = None,
    ) -> TableScores:
        """Rows of a manifest table (``path`` under ``root``, ``patient``, ``x``, ``y``)
        scored from their files, in table order, with a progress bar.

        Args:
            buckets: the buckets to score (default: every row, ``stream.make_buckets``;
                ``predict`` under torchrun: this process's share); other rows stay NaN.
            each: called with each bucket as soon as it is scored (``predict`` writes its
                rows there). An error it raises stops the scoring, worker threads
                included, before it goes on.
        """
        base = str(root)  # strings: a Path per file costs more than its decode
        source = FileSource([os.path.join(base, p) for p in table["path"]])  # noqa: PTH118
        groups = table["patient"].to_numpy()
        coords = (table["x"].to_numpy(), table["y"].to_numpy())  # -1 where the name has none
        buckets = make_buckets(groups) if buckets is None else buckets
        prob, raw, margin, neighbours, call = (np.full(len(table), np.nan) for _ in range(5))
        check = np.full(len(table), "", dtype=object)
        reasons, kept = [""] * len(table), []
        # closing: an error in ``each`` must stop the worker threads before it goes on
        scoring = contextlib.closing(self.score(groups, coords, source, buckets))
        total = sum(len(b.rows) for b in buckets)
        with scoring as scores, progress_bar(desc, total=total) as advance:
            for s in scores:
                prob[s.rows], raw[s.rows], margin[s.rows] = s.prob, s.prob_uncalibrated, s.margin
                neighbours[s.rows], call[s.rows], check[s.rows] = s.neighbours, s.call, s.check
                for r, why in zip(s.rows, s.reasons, strict=True):
                    reasons[r] = why
                if keep_patches:
                    kept.append((s.rows[~np.isnan(s.prob)], s.patches))
                if each is not None:
                    each(s)
                advance(len(s.rows))
        ok = ~np.isnan(prob)
        patches = None
        if keep_patches:  # back in table order, the ok rows only
            patches = np.empty((int(ok.sum()), PATCH_SIZE, PATCH_SIZE, 3), np.uint8)
            position = np.cumsum(ok) - 1
            for rows, part in kept:
                patches[position[rows]] = part
        return TableScores(
            prob, raw, margin, neighbours, call, check, ok, reasons, source.n_padded, patches
        )

    def predict(
        self,
        images: np.ndarray,
        rows: np.ndarray | None = None,
        patients: np.ndarray | None = None,
        coords: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Prediction:
        """Calibrated and raw P(IDC), and the raw logit margin, of ``images[rows]`` (all
        rows when None), in that order.

        ``patients`` (one id per image; None: all one patient) groups the patches whose
        stain is normalised together and whose grid is shared; ``coords`` (``(xs, ys)``,
        each patch's top-left corner in slide pixels, one per image, NaN where unknown)
        places them. Without coordinates every patch is scored alone.
        """
        rows = np.arange(len(images)) if rows is None else np.asarray(rows)
        groups = np.zeros(len(images), np.int64) if patients is None else np.asarray(patients)
        sub = None if coords is None else tuple(np.asarray(c)[rows] for c in coords)
        prob, raw, margin, neighbours, call = (np.empty(len(rows)) for _ in range(5))
        check = np.empty(len(rows), dtype=object)
        for s in self.score(groups[rows], sub, _Rows(images, rows)):
            prob[s.rows], raw[s.rows], margin[s.rows] = s.prob, s.prob_uncalibrated, s.margin
            neighbours[s.rows], call[s.rows], check[s.rows] = s.neighbours, s.call, s.check
        return Prediction(prob, raw, margin, neighbours, call, check)

    def predict_proba(self, images, rows=None, patients=None, coords=None) -> np.ndarray:
        """Calibrated P(IDC), averaged over the members."""
        return self.predict(images, rows, patients, coords).prob


class _Rows(ArraySource):
    """``images[rows]`` as a source indexed 0..len(rows)-1."""

    def __init__(self, images: np.ndarray, rows: np.ndarray):
        super().__init__(images)
        self.rows = rows

    def load(self, rows: np.ndarray):
        return super().load(self.rows[rows])


def _spread(values: np.ndarray, ok: np.ndarray) -> np.ndarray:
    out = np.full(len(ok), np.nan)
    out[ok] = values
    return out
