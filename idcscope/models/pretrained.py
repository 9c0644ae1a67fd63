"""Pretrained weights: from a local file (always) or the hub (when online)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import WeightsUnavailableError

logger = logging.getLogger(__name__)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a pickle-free torch file (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsUnavailableError(f"{path}: not a readable weights file ({e})") from e
    for key in ("state_dict", "model", "model_state"):  # common wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsUnavailableError(f"{path}: does not hold a dict of tensors")
    return obj


def load_backbone_weights(model: nn.Module, path: str | Path, strict: bool = False) -> None:
    """Load what fits: tensors whose name and shape match (a new head stays initialised)."""
    state = read_state_dict(path)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in fitting]
    if strict and (missing or len(fitting) != len(state)):
        raise WeightsUnavailableError(
            f"{path}: does not match the model ({len(missing)} missing, "
            f"{len(state) - len(fitting)} unexpected or mis-shaped tensors)"
        )
    if not fitting:
        raise WeightsUnavailableError(f"{path}: no tensor matches the model's parameter names")
    model.load_state_dict(fitting, strict=False)
    logger.info(
        "loaded %d/%d tensors from %s (%d left as initialised)",
        len(fitting),
        len(own),
        path,
        len(missing),
    )


def hub_error(name: str, e: Exception) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"could not download ImageNet weights for {name!r} from the Hugging Face hub "
        f"({type(e).__name__}: {e}). Offline? Download them on a connected machine "
        f"(timm.create_model({name!r}, pretrained=True) then save its state_dict) and pass "
        "--weights FILE, or train from scratch with --no-pretrained"
    )
