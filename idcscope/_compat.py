"""Make torchvision (and timm, on top of it) importable next to a CPU-only torch.

Some environments end up with a CUDA build of torchvision beside a CPU wheel of torch:
its compiled ``_C`` extension fails to load, and ``import torchvision`` then dies on
``operator torchvision::nms does not exist`` (and so do timm and everything on top).
Nothing idcscope uses needs those detection operators, so when ``_C`` does not load we
declare the two schemas torchvision's meta registrations expect. Users whose torch and
torchvision come from one index never reach the fallback.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_MISSING_OPS = ("nms", "qnms")
_library: torch.library.Library | None = None  # kept alive: dropping it unregisters the ops


def ensure_torchvision() -> None:
    """Call before the first ``import torchvision`` (or timm)."""
    global _library
    if _library is not None or _has_op("nms"):
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    for so in sorted(Path(spec.submodule_search_locations[0]).glob("_C*.so")):
        try:
            torch.ops.load_library(str(so))
        except OSError:
            continue
        if _has_op("nms"):
            return
    logger.debug("torchvision's _C extension does not load; declaring %s schemas", _MISSING_OPS)
    _library = torch.library.Library("torchvision", "DEF")
    for op in _MISSING_OPS:
        _library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


@functools.cache
def import_timm():
    """timm, imported once and only when a timm model is asked for (it takes seconds)."""
    ensure_torchvision()
    import timm

    return timm


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True
