"""Self-describing checkpoints that load without unpickling code.

A checkpoint is a plain dict of tensors and primitive values written by ``torch.save`` and
read with ``torch.load(weights_only=True)``: the weights, the model's name and arguments,
the training config, class names, preprocessing (mean, std, patch size, microns per pixel),
the decision threshold chosen on validation, the split, and, in ``last.pt``, the optimiser
state needed to resume. ``predict`` needs nothing but the file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = "idcscope-checkpoint/1"
REQUIRED_KEYS = ("state_dict", "model", "class_names", "preprocessing")


def save_checkpoint(path: str | Path, module: nn.Module, **fields) -> Path:
    """Write ``{"format", "state_dict", **fields}`` atomically (temp file, then rename)."""
    path = Path(path)
    if "config" in fields and dataclasses.is_dataclass(fields["config"]):
        fields["config"] = dataclasses.asdict(fields["config"])
    return _atomic_save({"format": FORMAT, "state_dict": module.state_dict(), **fields}, path)


def update_checkpoint(path: str | Path, **fields) -> Path:
    """Add or replace fields of an existing checkpoint, weights untouched."""
    return _atomic_save({**read_checkpoint(path), **fields}, Path(path))


def _atomic_save(obj: dict, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)  # a killed run leaves the previous checkpoint intact
    return path


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict of a ``.pt`` file or of a model folder (``models.bundle``)."""
    from .bundle import is_bundle, read_bundle

    path = Path(path)
    if is_bundle(path):
        return read_bundle(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refusals and truncated files alike
        raise CheckpointError(
            f"{path}: not a safe idcscope checkpoint ({type(e).__name__}: {str(e)[:300]})"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an idcscope checkpoint (no format {FORMAT!r})")
    return ckpt


def load_model(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes; returns ``(model in eval mode, checkpoint)``."""
    from ..data.preprocess import Preprocessing
    from ..errors import IdcscopeError
    from . import create_model

    ckpt = read_checkpoint(path)
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a complete checkpoint (no {', '.join(missing)})")
    spec = ckpt["model"]
    try:
        Preprocessing(**ckpt["preprocessing"])
        # Weights come from the checkpoint alone: its arguments may not fetch or read others.
        model = create_model(
            spec["name"],
            num_classes=len(ckpt["class_names"]),
            pretrained=False,
            weights=None,
            **spec["kwargs"],
        )
    except (KeyError, TypeError, ValueError, IdcscopeError) as e:
        raise CheckpointError(
            f"{path}: the model it describes cannot be built ({type(e).__name__}: {e})"
        ) from e
    try:
        model.load_state_dict(ckpt["state_dict"])
    except (RuntimeError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"{path}: weights do not fit model {spec['name']!r}: {e}") from e
    return model.to(device).eval(), ckpt
