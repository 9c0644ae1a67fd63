"""Model registry: ``create_model``, ``list_models`` and ``register_model``.

Importing the package is cheap: the architectures (and torch) are imported when the
registry is first used (``_registry``), so reading a model folder (``bundle``) or scoring
its ONNX graph never imports them.
"""

_REGISTRY = ("create_model", "list_models", "register_model")
__all__ = list(_REGISTRY)


def __getattr__(name: str):
    if name in _REGISTRY:
        from . import _registry

        return getattr(_registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
