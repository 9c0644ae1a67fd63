"""The panels that show where a model looks: a map over a patch, a patch with its CAM and
saliency, and for a neighbourhood model the 3x3 block it saw with the evidence of each
plane group (``inference.attribution``) over the block and over the patch. ``idcscope
explain`` draws them as figures, the web page as separate images (``serve.drawing``)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


def overlay(patch: np.ndarray, heat, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped heat map (H, W) in [0, 1] onto a uint8 (H, W, 3) patch."""
    from matplotlib import colormaps

    heat = heat.detach().cpu().numpy() if hasattr(heat, "detach") else np.asarray(heat)
    if heat.shape != patch.shape[:2]:
        raise ValueError(f"heat map {heat.shape} does not match patch {patch.shape[:2]}")
    colour = colormaps[cmap](np.clip(np.nan_to_num(heat), 0, 1))[..., :3] * 255.0
    out = (1 - alpha) * patch.astype(np.float32) + alpha * colour
    return np.clip(out.round(), 0, 255).astype(np.uint8)


def explain_figure(
    patch: np.ndarray,
    cam: np.ndarray,
    sal: np.ndarray,
    title: str,
    upscale: int = 4,
    cam_name: str = "Grad-CAM",
) -> Figure:
    """Three panels (patch, CAM overlay, saliency overlay), pixels enlarged ``upscale``x.

    An all-zero map is shown as the bare patch and says so: a uniformly blue overlay would
    read as "looked everywhere equally" when it means "found no positive evidence".
    """
    panels = {"patch": patch}
    for name, heat in ((cam_name, cam), ("saliency", sal)):
        empty = not np.nanmax(heat) > 0
        panels[f"{name}: none positive" if empty else name] = (
            patch if empty else overlay(patch, heat)
        )
    k = max(1, int(upscale))
    dpi = 100
    side = patch.shape[1] * k / dpi
    fig = Figure(figsize=(3 * side + 0.4, side + 0.75), dpi=dpi, layout="constrained")
    for ax, (name, img) in zip(fig.subplots(1, 3), panels.items(), strict=True):
        ax.imshow(img.repeat(k, 0).repeat(k, 1), interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    return fig


def block_figure(block: np.ndarray, groups: np.ndarray, title: str, upscale: int = 4) -> Figure:
    """What a neighbourhood model saw and where its evidence lies: three panels of the
    patch's 3x3 block (``upscale``x): the block, the neighbourhood planes' attribution over
    the block (one map cell per 3x3 block pixels) and the patch planes' over the patch.

    Args:
        block: uint8 (3H, 3W, 3), the patch in the centre cell.
        groups: (2, H, W) attribution of the patch planes and of the neighbourhood planes,
            in logit units (see ``inference.attribution``); each panel shows the positive
            part (evidence for IDC), scaled to its own peak, and names the group's sum.
    """
    from matplotlib.patches import Rectangle

    h, w = groups.shape[1:]
    centre = block_centre(block, groups)
    names = (
        "what the model saw (patch outlined)",
        f"neighbourhood planes: {groups[1].sum():+.2f}",
        f"patch planes: {groups[0].sum():+.2f}",
    )
    panels = dict(zip(names, block_panels(block, groups), strict=True))
    s = max(1, int(upscale))
    side = block.shape[1] * s / 100
    fig = Figure(figsize=(3 * side + 0.4, side + 0.9), dpi=100, layout="constrained")
    for ax, (name, img) in zip(fig.subplots(1, 3), panels.items(), strict=True):
        ax.imshow(img.repeat(s, 0).repeat(s, 1), interpolation="nearest")
        x0, y0 = centre[1].start * s - 0.5, centre[0].start * s - 0.5
        ax.add_patch(Rectangle((x0, y0), w * s, h * s, fill=False, ec="black", lw=1))
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    fig.suptitle(f"{title}\nevidence for IDC vs glass (logit), positive part drawn", fontsize=9)
    return fig


def block_panels(block: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, ...]:
    """The three images of :func:`block_figure` (the web page shows them too): the
    block, the neighbourhood planes' attribution over it (one map cell per 3x3 block
    pixels), and the patch planes' over the patch, the block dimmed around it."""
    h = groups.shape[1]
    k = block.shape[0] // h
    hood = np.repeat(np.repeat(groups[1], k, 0), k, 1)
    centre = block_centre(block, groups)
    patch_panel = (block.astype(np.float32) * 0.5 + 127.5).astype(np.uint8)  # dimmed
    patch_panel[centre] = _positive_overlay(block[centre], groups[0])
    return block, _positive_overlay(block, hood), patch_panel


def block_centre(block: np.ndarray, groups: np.ndarray) -> tuple[slice, slice]:
    """Where the patch lies in its block: the centre cell."""
    h, w = groups.shape[1:]
    k = block.shape[0] // h
    return slice((k // 2) * h, (k // 2 + 1) * h), slice((k // 2) * w, (k // 2 + 1) * w)


def _positive_overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """``image`` with the positive part of ``heat`` over it, scaled to its peak; the bare
    image when nothing is positive."""
    peak = float(np.nanmax(heat)) if heat.size else 0.0
    return overlay(image, np.clip(heat, 0, None) / peak) if peak > 0 else image
