"""A tiny model registry: ``@register_model`` stores a factory by its name.

The architectures' modules register theirs when imported; ``_factory`` imports them and
builds a model by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

_models: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _models[fn.__name__] = fn
    return fn
