"""Model registry; importing this package registers every built-in model."""

from . import cancernet, timm_models
from ._registry import create_model, list_models, register_model

__all__ = ["cancernet", "create_model", "list_models", "register_model", "timm_models"]
