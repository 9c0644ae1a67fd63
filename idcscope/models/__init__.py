"""Model registry: ``create_model``, ``list_models`` and ``register_model``.

Importing the package is cheap: the architectures (and torch) are imported when a model
is first built or listed (``_factory``), so reading a model folder (``bundle``) or scoring
its ONNX graph never imports them.
"""

_HOMES = {"create_model": "_factory", "list_models": "_factory", "register_model": "_registry"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        from importlib import import_module

        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
