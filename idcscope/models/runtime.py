"""How a model runs on this machine: precision (bf16 only where it is native) and
BatchNorm folded for inference."""

from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy with each BatchNorm folded into the convolution or linear before it.

    Same outputs (to float rounding), one pass over each activation fewer. Models that
    torch.fx cannot trace are returned unchanged (in eval mode).
    """
    import copy

    from torch.fx.experimental.optimization import fuse

    model.eval()
    try:
        fused = fuse(copy.deepcopy(model))
    except Exception as e:  # tracing is best effort: an untraceable model still works as is
        logger.debug("BatchNorm folding skipped for %s: %s", type(model).__name__, e)
        return model
    if _n_batchnorms(fused) == _n_batchnorms(model):  # nothing folded: keep the original
        return model
    # Folded weights are new tensors in the default layout: give them the model's.
    if any(
        p.dim() == 4
        and p.is_contiguous(memory_format=torch.channels_last)
        and not p.is_contiguous()
        for p in model.parameters()
    ):
        fused = fused.to(memory_format=torch.channels_last)
    return fused


def _n_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@functools.cache
def _native_bf16(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        caps = getattr(torch.cpu, "get_capabilities", dict)()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return False


def resolve_precision(precision: str, device: str = "cpu") -> str:
    """``"auto"`` is bf16 where the hardware computes it natively, fp32 elsewhere.

    Emulated bf16 is far slower than fp32: on an AVX2-only CPU, training ``cancernet``
    under bf16 autocast runs at a tenth of its fp32 speed.
    """
    if precision != "auto":
        return precision
    return "bf16" if _native_bf16(torch.device(device).type) else "fp32"


def autocast(precision: str, device: str = "cpu"):
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
