"""Figures of a patient or slide: P(IDC) over the tissue, the annotated IDC outlined, the
patches called uncertain hatched, and the bare probability map."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..data import PATCH_MPP, PATCH_SIZE

CMAP = "inferno"
# Patches called uncertain: greyed and hatched, readable over every colour of CMAP.
UNCERTAIN = {"fill": (0.5, 0.5, 0.5, 0.5), "hatch": "////", "edge": "white"}

DPI = 150


def _extent(origin: tuple[int, int], width: float, height: float) -> tuple[float, ...]:
    # Slide pixels on both axes, so the mosaic and the grids line up whatever their resolution.
    return (origin[0], origin[0] + width, origin[1] + height, origin[1])


def _grid_extent(grid: np.ndarray, origin: tuple[int, int], patch: int) -> tuple[float, ...]:
    return _extent(origin, grid.shape[1] * patch, grid.shape[0] * patch)


def _contour(ax: Axes, grid: np.ndarray, origin, patch: int, level: float, **kw) -> None:
    # A ring of glass around the grid closes contours that touch its border.
    z = np.pad(np.nan_to_num(grid, nan=0.0), 1)
    cx = origin[0] + (np.arange(z.shape[1]) - 0.5) * patch
    cy = origin[1] + (np.arange(z.shape[0]) - 0.5) * patch
    if z.min() < level <= z.max():
        ax.contour(cx, cy, z, levels=[level], **kw)


def _hatch(ax: Axes, mask: np.ndarray | None, origin, patch: int) -> list:
    """Grey and hatch the cells of ``mask`` (patches called uncertain), outlined; returns
    the legend handle, none when no cell is marked.

    One filled contour, not a square per cell (a slide has 10^5 cells): each cell is
    sampled k x k, so the contour runs along the cell edges, its corners cut by a 2k-th of
    a cell (k from 6 for a patient's grid down to 2 for a large slide's, for speed).
    """
    from matplotlib.patches import Patch

    if mask is None or not np.any(mask):
        return []
    k = int(np.clip(2400 // max(np.shape(mask)), 2, 6))
    z = np.pad(np.asarray(mask, float).repeat(k, 0).repeat(k, 1), 1)
    cx = origin[0] + (np.arange(z.shape[1]) - 0.5) * patch / k
    cy = origin[1] + (np.arange(z.shape[0]) - 0.5) * patch / k
    style = UNCERTAIN
    filled = ax.contourf(
        cx, cy, z, levels=[0.5, 2], colors=[style["fill"]], hatches=[style["hatch"]]
    )
    filled.set_edgecolor(style["edge"])  # the hatch's colour
    filled.set_linewidth(0)
    ax.contour(cx, cy, z, levels=[0.5], colors=style["edge"], linewidths=0.8)
    label = f"uncertain ({np.count_nonzero(mask)})"
    # On the legend's white the hatch is drawn dark.
    return [Patch(facecolor=style["fill"], edgecolor="0.3", hatch=style["hatch"], label=label)]


def _tissue_axes(ax: Axes, mosaic: np.ndarray, extent, title: str, faded: bool = False) -> None:
    img = mosaic
    if faded:  # grey and light, so colours drawn on top read as the data
        grey = mosaic.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        img = np.repeat((155 + 0.39 * grey)[..., None], 3, axis=2).astype(np.uint8)
    ax.imshow(img, extent=extent, interpolation="antialiased")
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _scale_bar(ax: Axes, mpp: float, extent) -> None:
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    width, height = extent[1] - extent[0], extent[2] - extent[3]
    # The longest round length that stays within a quarter of the tissue's width.
    fits = [mm for mm in (0.1, 0.2, 0.5, 1, 2, 5, 10) if mm * 1000 / mpp <= width / 4]
    mm = fits[-1] if fits else 0.1
    label = f"{mm:g} mm" if mm >= 1 else f"{mm * 1000:g} µm"
    bar = AnchoredSizeBar(
        ax.transData,
        mm * 1000 / mpp,
        label,
        "lower left",
        pad=0.4,
        frameon=False,
        size_vertical=height / 120,
    )
    ax.add_artist(bar)


def plot_patient_heatmap(
    mosaic: np.ndarray,
    prob: np.ndarray,
    origin: tuple[int, int],
    threshold: float,
    truth: np.ndarray | None = None,
    patch: int = PATCH_SIZE,
    mpp: float = PATCH_MPP,
    title: str = "",
    uncertain: np.ndarray | None = None,
) -> Figure:
    """Tissue, predicted P(IDC) over it, and (when ``truth`` is given) the annotated IDC.

    Args:
        mosaic: The rebuilt tissue (any scale); it spans the same slide area as the grids.
        prob: Probability grid from :func:`probability_grid`.
        origin: Slide coordinates of the grids' top-left corner.
        threshold: Where the predicted boundary is drawn.
        truth: Boolean grid of annotated IDC cells, or None when labels are unknown.
        patch: Grid step in slide pixels.
        mpp: Microns per slide pixel, for the scale bar.
        title: Figure title.
        uncertain: Boolean grid of the cells called uncertain, hatched over the
            prediction (the model does not decide them); None: none.
    """
    from matplotlib import colormaps
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    extent = _grid_extent(prob, origin, patch)
    ratio = float(np.clip((extent[2] - extent[3]) / (extent[1] - extent[0]), 0.25, 2.5))
    n = 2 if truth is None else 3
    width = 4.2
    fig = Figure(figsize=(n * width + 0.7, width * ratio + 0.8), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, n)
    _tissue_axes(axes[0], mosaic, extent, "H&E tissue")
    _scale_bar(axes[0], mpp, extent)

    cmap = colormaps[CMAP].with_extremes(bad=(0, 0, 0, 0))
    _tissue_axes(axes[1], mosaic, extent, "Predicted P(IDC)", faded=True)
    im = axes[1].imshow(
        np.ma.masked_invalid(prob),
        cmap=cmap,
        vmin=0,
        vmax=1,
        alpha=0.8,
        extent=extent,
        interpolation="nearest",
    )
    edge = {"colors": "#00e5ff", "linewidths": 1.4}
    _contour(axes[1], prob, origin, patch, threshold, **edge)
    handles = [Line2D([], [], color=edge["colors"], lw=1.4, label=f"P = {threshold:.2f}")]
    handles += _hatch(axes[1], uncertain, origin, patch)
    axes[1].legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.8)
    if truth is not None:
        mask = np.where(np.isnan(prob), np.nan, truth.astype(float))
        rgba = np.zeros((*mask.shape, 4))
        rgba[mask == 1] = (0.84, 0.15, 0.16, 0.6)
        _tissue_axes(axes[2], mosaic, extent, "Annotated IDC", faded=True)
        axes[2].imshow(rgba, extent=extent, interpolation="nearest")
        _contour(axes[2], prob, origin, patch, threshold, colors="black", linewidths=1.4)
        handles = [
            Patch(color=(0.84, 0.15, 0.16, 0.6), label="annotated IDC"),
            Line2D([], [], color="black", lw=1.4, label=f"predicted, P ≥ {threshold:.2f}"),
        ]
        axes[2].legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.8)
    bar = fig.colorbar(im, ax=axes[1], shrink=0.8, pad=0.02, label="P(IDC)")
    bar.ax.axhline(threshold, color=edge["colors"], lw=2)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def plot_probability_map(
    prob: np.ndarray,
    origin: tuple[int, int],
    patch: int = PATCH_SIZE,
    title: str = "",
    ax: Axes | None = None,
    uncertain: np.ndarray | None = None,
) -> Figure:
    """The probability grid alone: one square per patch, glass left white, with a colour
    bar; the cells of ``uncertain`` (called uncertain) hatched."""
    from matplotlib import colormaps

    extent = _grid_extent(prob, origin, patch)
    if ax is None:
        ratio = float(np.clip(prob.shape[0] / prob.shape[1], 0.25, 2.5))
        fig = Figure(figsize=(5.2, 4.4 * ratio + 0.6), dpi=DPI, layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure.figure
    cmap = colormaps[CMAP].with_extremes(bad="white")
    im = ax.imshow(
        np.ma.masked_invalid(prob),
        cmap=cmap,
        vmin=0,
        vmax=1,
        extent=extent,
        interpolation="nearest",
    )
    handles = _hatch(ax, uncertain, origin, patch)
    if handles:
        ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or "Predicted P(IDC)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="P(IDC)")
    return fig


def _save_png(fig: Figure, path: Path) -> Path:
    """Save through a 256-colour palette: a third of the bytes, no visible change at print size."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    buf.seek(0)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE).save(path, optimize=True)
    return path
