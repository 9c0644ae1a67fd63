"""``create_model`` and ``list_models``: the registered architectures, then timm's zoo.

Names not registered are looked up in timm's zoo, so any timm model can be trained by name
(``--model convnext_atto``). Every model returns logits.
"""

from __future__ import annotations

import torch.nn as nn

from ..errors import IdcscopeError
from . import cancernet, timm_models  # noqa: F401  (their @register_model run on import)
from ._registry import _models
from .zoo import create_timm_model, timm_has, timm_names


def list_models(include_timm: bool = False) -> list[str]:
    names = sorted(_models)
    if include_timm:
        names += [n for n in timm_names() if n not in _models]
    return names


def create_model(
    name: str, num_classes: int = 2, pretrained: bool = False, weights: str | None = None, **kwargs
) -> nn.Module:
    """Build a registered model, or any timm model by name.

    Args:
        name: registry name (see ``list_models()``) or a timm model name.
        num_classes: number of output logits.
        pretrained: load ImageNet weights from the hub (needs network).
        weights: a local file of backbone weights (.safetensors, .pth, .bin); wins over the hub.
        **kwargs: passed to the factory.
    """
    if name in _models:
        return _models[name](
            num_classes=num_classes, pretrained=pretrained, weights=weights, **kwargs
        )
    if timm_has(name):
        return create_timm_model(name, num_classes, pretrained, weights, **kwargs)
    raise IdcscopeError(
        f"unknown model {name!r}; registered models: {', '.join(list_models())} "
        "(or any name from timm.list_models())"
    )
