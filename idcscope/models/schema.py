"""What a model is besides its weights: one dataclass, read and written the same way in a
checkpoint (``.pt``), a model folder (``config.json``) and an ONNX graph's metadata.

``ModelMeta`` names every field a model carries (architecture, classes, preprocessing,
calibration per scoring context, threshold, spatial context, splits, recipe and where it
came from), with its default, so a field is added in one place and travels into every
export; ``to_fields`` writes them as plain JSON values, ``from_fields`` reads them back
from any of the three, through ``migrate`` when they were written by an older idcscope.
A ``.pt`` also holds what training resumes from (``TRAINING_STATE``), which never leaves
the run folder.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = "idcscope-model/2"
# What the formats before this one were called in each container: their fields are this
# schema's, bar the ones added since (defaults), so ``migrate`` renames them.
OLD_FORMATS = ("idcscope-checkpoint/1", "idcscope-model/1", "idcscope-onnx/1")
# A .pt's training state: the weights, and what ``--resume`` continues from.
TRAINING_STATE = (
    "state_dict", "optimizer", "scheduler", "generator", "torch_rng", "history",
    "best_val_loss", "world_size", "validation",
)  # fmt: skip
# What a container says about itself rather than about the model.
CONTAINER = ("format", "weights_sha256", "files", "input", "source")
REQUIRED = ("model", "class_names", "preprocessing")


@dataclass
class ModelMeta:
    """Every field of a model but its weights."""

    model: dict  # the architecture: {"name": registry name, "kwargs": its arguments}
    class_names: list
    preprocessing: dict  # ``data.preprocess.Preprocessing`` as a dict
    threshold: float = 0.5  # on calibrated P(IDC)
    threshold_method: str = "default 0.5"
    # sigmoid(margin / temperature + logit_bias): patches scored with their neighbours...
    temperature: float = 1.0
    logit_bias: float = 0.0
    calibration: dict = field(default_factory=dict)  # ...and the fit's report (ECE before/after)
    # {"temperature", "logit_bias", "calibration"} of patches scored alone; None: the same
    lone_calibration: dict | None = None
    # Per scoring context (``training.contexts``), in place of the three above where there:
    # {"neighbours": [lo, hi], "temperature", "logit_bias", "band": [below, from], "alpha",
    # "bands": [{"alpha", "band"}, ...], ...} for the patches scored with lo to hi of their
    # 8 neighbours (alone counts as 0): "band" at "alpha", "bands" at the other alphas.
    contexts: list = field(default_factory=list)
    context: dict = field(default_factory=dict)  # grid smoothing of logits: {"sigma", "step"}
    splits: dict = field(default_factory=dict)  # the patients it trained and validated on
    config: dict = field(default_factory=dict)  # the recipe: ``training.config.TrainConfig``
    data_summary: dict = field(default_factory=dict)
    stain_spread: dict | None = None  # what its stain augmentation drew from
    epoch: int | None = None  # the epoch whose weights these are
    best_epoch: int | None = None
    val_loss: float | None = None
    val_metrics: dict = field(default_factory=dict)  # on its validation patients
    oof_metrics: dict = field(default_factory=dict)  # out of fold, for a model of `cv --final`
    images_per_s: float | None = None  # training speed
    # Which patches are not what it was made for (``data.inputcheck.fit_input_check``'s
    # plain-JSON parameters, read by ``check_patches``); empty: no check.
    input_check: dict = field(default_factory=dict)

    def calibrated(self, lone: bool = False) -> tuple[float, float]:
        """``(temperature, logit_bias)`` of patches scored with their neighbours, or with
        ``lone`` of patches scored alone (their own where the model has one), for a model
        without ``contexts``."""
        if lone and self.lone_calibration:
            own = self.lone_calibration
            return float(own.get("temperature", 1.0)), float(own.get("logit_bias", 0.0))
        return float(self.temperature), float(self.logit_bias)

    def decisions(self, neighbours, alpha: float | None = None) -> Decisions:
        """How each patch is calibrated and called, by the context it was scored in
        (``neighbours``: how many of its 8 neighbours were there, NaN when alone).

        With ``contexts``, each patch takes its context's, with the band fitted at
        ``alpha`` (None: the model's own, see `alphas`); without (an older model), the
        model's calibration (the lone one for patches scored alone) and no uncertain band:
        it decides every patch at its threshold.
        """
        if not self.contexts:
            lone = np.isnan(np.asarray(neighbours, dtype=np.float64))
            (t, b), (lt, lb) = self.calibrated(), self.calibrated(lone=True)
            band = np.full(len(lone), float(self.threshold))
            return Decisions(np.where(lone, lt, t), np.where(lone, lb, b), band, band.copy())
        where = self.context_index(neighbours)
        if (where < 0).any():
            raise ValueError(
                f"contexts {[c['neighbours'] for c in self.contexts]} miss some of 0-8"
            )
        bands = [c["band"] for c in self.contexts] if alpha is None else self.bands(alpha)
        table = np.array(
            [[c["temperature"], c["logit_bias"], *band]
             for c, band in zip(self.contexts, bands, strict=True)], np.float64,
        )  # fmt: skip
        return Decisions(*table[where].T)

    @property
    def alphas(self) -> list[float]:
        """The alphas every context has an uncertain band for (``decisions(alpha=)``),
        ascending. Empty for a model without contexts: it calls nothing uncertain."""
        if not self.contexts:
            return []
        fitted = [{a for a, _ in _bands(c)} for c in self.contexts]
        return sorted(set.intersection(*fitted))

    def bands(self, alpha: float) -> list[list[float]]:
        """Each context's ``[no_idc_below, idc_from]`` fitted at ``alpha``; ValueError
        naming the alphas there are when it was not fitted at that one."""
        out = []
        for c in self.contexts:
            found = [band for a, band in _bands(c) if math.isclose(a, alpha)]
            if not found:
                have = ", ".join(f"{a:g}" for a in self.alphas) or "none"
                raise ValueError(
                    f"its uncertain bands were fitted at alpha {have}, not {alpha:g} "
                    f"(`idcscope calibrate --alpha {alpha:g}` fits one from the out-of-fold "
                    "predictions of its recipe)"
                )
            out.append(found[0])
        return out

    def context_index(self, neighbours) -> np.ndarray:
        """The entry of ``contexts`` each patch was scored in (``neighbours``: 0-8, NaN
        when alone, which counts as 0); -1 where none covers it."""
        n = np.nan_to_num(np.asarray(neighbours, dtype=np.float64), nan=0.0)
        out = np.full(len(n), -1)
        for i, c in enumerate(self.contexts):
            lo, hi = c["neighbours"]
            out[(n >= lo) & (n <= hi)] = i
        return out

    @property
    def seen_patients(self) -> set[str]:
        """Patients it trained or validated on."""
        return set(self.splits.get("train", [])) | set(self.splits.get("val", []))

    def to_fields(self) -> dict:
        """Every field as plain JSON values (tensors and numpy values as lists and
        numbers, NaN as None), ``format`` first."""
        return {"format": FORMAT, **plain(dataclasses.asdict(self))}

    @classmethod
    def from_fields(cls, fields: dict, where: object) -> ModelMeta:
        """The model described by ``fields`` (a checkpoint dict, a ``config.json`` or an
        ONNX graph's metadata), written by this idcscope or an older one; ``where`` names
        the file in errors."""
        fields = migrate(fields, where)
        missing = [k for k in REQUIRED if k not in fields]
        if missing:
            raise CheckpointError(f"{where}: not a complete checkpoint (no {', '.join(missing)})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names - set(TRAINING_STATE) - set(CONTAINER))
        if unknown:  # a newer idcscope's extra field: what this one knows still holds
            logger.debug("%s: fields this idcscope does not read: %s", where, unknown)
        return cls(**{k: v for k, v in fields.items() if k in names})


def _bands(context: dict) -> list[tuple[float, list]]:
    """``(alpha, band)`` of every band a context was fitted at: its own, then ``bands``
    (a model of an idcscope before ``bands`` has its own only)."""
    own = [(float(context["alpha"]), context["band"])] if "alpha" in context else []
    return own + [(float(b["alpha"]), b["band"]) for b in context.get("bands", [])]


class Decisions(NamedTuple):
    """Per patch: ``sigmoid(margin / temperature + logit_bias)`` is its calibrated P(IDC);
    it is called no IDC below ``no_idc_below``, IDC from ``idc_from``, uncertain between."""

    temperature: np.ndarray
    logit_bias: np.ndarray
    no_idc_below: np.ndarray
    idc_from: np.ndarray


def call_codes(prob, no_idc_below, idc_from) -> np.ndarray:
    """1 (IDC) from ``idc_from``, 0 (no IDC) below ``no_idc_below``, -1 (uncertain) between,
    per patch; NaN where ``prob`` is NaN."""
    prob = np.asarray(prob, dtype=np.float64)
    code = np.where(prob >= idc_from, 1.0, np.where(prob < no_idc_below, 0.0, -1.0))
    return np.where(np.isnan(prob), np.nan, code)


def migrate(fields: dict, where: object) -> dict:
    """``fields`` in this schema, from any format an idcscope wrote: the formats before
    it (``OLD_FORMATS``) hold the same fields, fewer of them; any other is refused."""
    fmt = fields.get("format")
    if fmt == FORMAT:
        return fields
    if fmt in OLD_FORMATS:
        return {**fields, "format": FORMAT}
    if fmt is None:
        raise CheckpointError(f"{where}: not an idcscope model (it names no format)")
    raise CheckpointError(
        f"{where}: model format {fmt!r} is not one this idcscope reads ({FORMAT!r} and "
        f"older); a newer idcscope may read it"
    )


def plain(value):
    """JSON-ready: tensors and numpy values become lists and numbers; NaN becomes None."""
    if hasattr(value, "tolist"):  # tensors, numpy arrays and scalars
        return plain(value.tolist())
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
