"""Where a neighbourhood model's evidence lies: attribution per input plane group, drawn
where each group's pixels come from, and the deletion test that checks a map.

A neighbourhood model (``data.neighbourhood``) reads six planes: the patch (planes 0..2),
then its 3x3 block of patches averaged down by 3 to the patch's size (planes 3..5). A CAM
taken at a convolutional layer mixes the two groups in every cell, and drawn over the
patch alone it puts the neighbours' evidence on the patch's corners and edges.

Method: Integrated Gradients (Sundararajan et al. 2017) from a glass baseline. The
attribution of input value i is ``(x_i - g_i) * mean_a d logit / d x_i`` along the straight
path from glass g to the input x (midpoint rule, ``steps`` points). Chosen because:

* it is per input value, so it splits exactly by plane group: the patch planes' share
  and the neighbourhood planes' share are two parts of one sum, with nothing left over
  and nothing counted twice (a CAM at a layer has no such split; a CAM at the first
  convolution split by input channel would be, but at the first layer's 3x3 blur);
* completeness: the two shares add up to ``logit(x) - logit(glass)``, up to the
  integration error (exactly for a model linear in its input), so each group's number is
  in logit units and means "how much of the call this group carries";
* glass is what "absent" already means to this model: a missing neighbour is white, a
  lone patch is seen on glass. The attribution asks "what if this were glass?", which is
  what the deletion test (:func:`deletion`) then does.

Input-gradient x input would split the same way, but it is a first-order guess of the
same difference and is noisy on ReLU networks; 16 steps cost 16 forward-backward passes
of a 50x50 input (cancernet: milliseconds a patch on a CPU).

Geometry: a neighbourhood-plane cell is the mean of 3x3 pixels of the 150x150 block, so
its attribution is drawn over those 3x3 block pixels; the patch planes' attribution is
drawn over the block's centre cell, where the patch lies (:func:`block_map` adds both,
spreading each cell's share over its 9 pixels, so the block map sums to the total too).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.neighbourhood import GLASS

PLANES = 3  # RGB planes per group: the patch, then its neighbourhood


def _modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    # Module by module, not model.train(flag): a frozen backbone may be in eval mode inside a
    # model in training mode, and that mix must survive.
    for module, training in modes.items():
        module.training = training


def _no_autocast(x: torch.Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


def integrated_gradients(
    model: nn.Module, x: torch.Tensor, baseline: torch.Tensor, target: int = 1, steps: int = 16
) -> torch.Tensor:
    """Integrated Gradients of logit ``target``: (B, C, H, W) attributions of input ``x``.

    Args:
        model: A classifier returning logits; left as found (modes, no ``.grad`` written).
        x: Normalised model input (B, C, H, W).
        baseline: Normalised input of the same shape or broadcastable (e.g. glass).
        target: The logit explained.
        steps: Points of the midpoint rule along the path from ``baseline`` to ``x``.

    The attributions sum to about ``logit(x) - logit(baseline)`` per sample.
    """
    modes = _modes(model)
    model.eval()
    x = x.detach().float()
    base = baseline.detach().float().expand_as(x)
    total = torch.zeros_like(x)
    try:
        with torch.enable_grad(), _no_autocast(x):
            for a in (torch.arange(steps, dtype=torch.float32) + 0.5) / steps:
                xa = (base + a * (x - base)).requires_grad_(True)
                (grad,) = torch.autograd.grad(model(xa)[:, target].sum(), xa)
                total += grad
    finally:
        _restore_modes(modes)
    return (x - base) * total / steps


def group_maps(attribution: torch.Tensor | np.ndarray) -> np.ndarray:
    """(B, C, H, W) attributions -> (B, G, H, W): summed over each group's RGB planes
    (G = 1 for a patch model, 2 for a neighbourhood model: patch, then neighbourhood)."""
    a = torch.as_tensor(attribution).detach().float().cpu()
    b, c, h, w = a.shape
    return a.view(b, c // PLANES, PLANES, h, w).sum(2).numpy()


def glass_input(prep, like: torch.Tensor) -> torch.Tensor:
    """Glass (every plane white) as normalised model input, (1, C, 1, 1)."""
    c = like.shape[1]
    white = torch.full((1, c, 1, 1), GLASS / 255.0, device=like.device)
    mean = torch.tensor(prep.mean, device=like.device).view(1, c, 1, 1)
    std = torch.tensor(prep.std, device=like.device).view(1, c, 1, 1)
    return (white - mean) / std


def neighbour_blocks(planes: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """What a neighbourhood model saw, at full resolution: uint8 (N, kH, kW, 3) blocks.

    Args:
        planes: uint8 model input (M, C, H, W); planes 0..2 are the patches (after any
            stain normalisation, as the model read them).
        neighbours: (N, k * k) rows into ``planes`` of each block, row-major from the
            top left, -1 for glass (see ``data.grid.neighbour_rows``).

    Averaged down by k (rounded as ``data.neighbourhood`` rounds), a block is the
    neighbourhood planes of its patch.
    """
    n, kk = neighbours.shape
    k = math.isqrt(kk)
    _, _, h, w = planes.shape
    patches = np.concatenate([planes[:, :PLANES], np.full((1, PLANES, h, w), GLASS, np.uint8)])
    tiles = patches[np.where(neighbours < 0, len(planes), neighbours)]  # (N, k*k, 3, H, W)
    block = tiles.reshape(n, k, k, PLANES, h, w).transpose(0, 1, 4, 2, 5, 3)
    return np.ascontiguousarray(block.reshape(n, k * h, k * w, PLANES))


def block_map(groups: np.ndarray, k: int = 3) -> np.ndarray:
    """Per-group maps (N, 2, H, W) -> one map (N, kH, kW) over the block, in the same units.

    Each neighbourhood-plane cell's attribution is spread evenly over the k x k block
    pixels it averages; the patch planes' attribution is added over the centre cell. The
    block map sums to what the two groups sum to.
    """
    h, w = groups.shape[2:]
    out = np.repeat(np.repeat(groups[:, 1], k, 1), k, 2) / (k * k)
    m = k // 2
    out[:, m * h : (m + 1) * h, m * w : (m + 1) * w] += groups[:, 0]
    return out


def delete(x: torch.Tensor, scores: torch.Tensor, fraction: float, fill: torch.Tensor):
    """``x`` (B, C, H, W) with its top ``fraction`` of positions by ``scores`` (B, G, H, W)
    set to ``fill`` (broadcastable to x); a position is one pixel of one plane group, all
    of its RGB planes together."""
    b, g, h, w = scores.shape
    n = max(1, round(fraction * g * h * w))
    top = scores.reshape(b, -1).topk(n, dim=1).indices
    mask = torch.zeros(b, g * h * w, dtype=torch.bool, device=x.device)
    mask.scatter_(1, top, True)
    mask = mask.view(b, g, 1, h, w).expand(b, g, PLANES, h, w).reshape(b, g * PLANES, h, w)
    return torch.where(mask, fill.expand_as(x), x)


@torch.no_grad()
def deletion(
    model: nn.Module,
    x: torch.Tensor,
    scores: torch.Tensor,
    fractions=(0.05, 0.1, 0.2),
    fill: torch.Tensor | None = None,
    target: int = 1,
) -> np.ndarray:
    """The deletion test: how P(``target``) moves when the top-scored positions go.

    Args:
        model: A classifier returning logits (run in eval mode, left as found).
        x: Normalised model input (B, C, H, W).
        scores: (B, G, H, W) ranking of positions (see :func:`delete`): a map, or noise.
        fractions: Shares of the positions removed.
        fill: What a removed position becomes (normalised); None: zeros.

    Returns:
        (len(fractions), B): P(target) after deletion minus before (the model's softmax,
        before any spatial context or calibration). A faithful map of evidence for
        ``target`` gives larger drops than a random ranking.
    """
    modes = _modes(model)
    model.eval()
    fill = torch.zeros(1, x.shape[1], 1, 1) if fill is None else fill
    try:
        with _no_autocast(x):
            before = F.softmax(model(x.float()), 1)[:, target]
            after = [
                F.softmax(model(delete(x.float(), scores, f, fill)), 1)[:, target]
                for f in fractions
            ]
    finally:
        _restore_modes(modes)
    return (torch.stack(after) - before).numpy()


def block_rows(n: int, groups, coords, radius: int) -> np.ndarray:
    """(n, (2 radius + 1) ** 2) rows of each patch's block, -1 for glass, as
    ``data.neighbourhood.add_neighbourhood`` finds them (``coords`` None: each alone)."""
    from ..data.grid import neighbour_rows

    if coords is None:
        rows = np.full((n, (2 * radius + 1) ** 2), -1, np.int64)
        rows[:, rows.shape[1] // 2] = np.arange(n)
        return rows
    groups = np.zeros(n, dtype=np.int64) if groups is None else np.asarray(groups)
    return neighbour_rows(groups, *coords, radius)
