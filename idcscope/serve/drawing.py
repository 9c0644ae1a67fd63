"""The pictures the page shows beside the numbers: a patch's explanation as enlarged PNGs,
and a slide's overlay with the tiles called uncertain marked.

A patch model's explanation is the patch, its CAM and its saliency. A neighbourhood model
reads the patch's 3x3 block too, so a CAM over the patch alone would draw the neighbours'
evidence on the patch's edges: its explanation is the three panels ``idcscope explain``
draws (``inference.explain.block_figure``), each as its own image for the page's table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .jobs import Job

UPSCALE = 4  # 50 px patches shown at 200 px, pixels kept sharp
BLOCK_UPSCALE = 2  # 150 px blocks shown at 300 px
BLOCK_PANELS = ("block", "neighbourhood", "patch_planes")  # ``block_panels``' order


def _save(job: Job, img: np.ndarray, name: str, scale: int, outline=None) -> str:
    """``img`` enlarged ``scale``x (pixels kept sharp), ``outline`` (a box of slices)
    drawn in black, as a PNG published under ``name``; returns its URL.

    The outline is ``scale`` pixels wide: the page shows the image at 1/``scale`` with
    pixels kept sharp, which keeps one row in ``scale``."""
    from PIL import Image, ImageDraw

    path = job.folder / name
    size = (img.shape[1] * scale, img.shape[0] * scale)
    image = Image.fromarray(img).resize(size, Image.Resampling.NEAREST)
    if outline is not None:
        rows, cols = outline
        box = (cols.start * scale, rows.start * scale, cols.stop * scale - 1, rows.stop * scale - 1)
        ImageDraw.Draw(image).rectangle(box, outline=(0, 0, 0), width=scale)
    image.save(path)
    return job.publish(path)


def write_maps(job: Job, k: int, patch: np.ndarray, cam: np.ndarray, sal: np.ndarray) -> dict:
    """The patch and its CAM and saliency overlays as enlarged PNGs; returns their URLs."""
    from ..inference.explain import overlay

    return {
        kind: _save(job, img, f"{k:04d}_{kind}.png", UPSCALE)
        for kind, img in (
            ("patch", patch),
            ("cam", overlay(patch, cam) if cam.max() > 0 else patch),
            ("saliency", overlay(patch, sal) if sal.max() > 0 else patch),
        )
    }


def write_blocks(job: Job, k: int, block: np.ndarray, groups: np.ndarray) -> dict:
    """What a neighbourhood model saw and where its evidence lies, as enlarged PNGs, the
    patch outlined in each: the 3x3 block, the neighbourhood planes' attribution over it
    and the patch planes' over the patch (``inference.explain.block_panels``); returns
    their URLs."""
    from ..inference.explain import block_centre, block_panels

    centre = block_centre(block, groups)
    return {
        kind: _save(job, img, f"{k:04d}_{kind}.png", BLOCK_UPSCALE, centre)
        for kind, img in zip(BLOCK_PANELS, block_panels(block, groups), strict=True)
    }


def mark_uncertain(
    slide: Path, summary: dict, tiles: pd.DataFrame, patch: int, overlay: Path, name: str
) -> None:
    """Redraw a slide's overlay (``spatial.slide`` draws it without them) with the tiles
    called uncertain hatched, from the slide's thumbnail read again.

    Args:
        slide: The slide file.
        summary: What ``spatial.slide.slide_inference`` returned (its grid and threshold).
        tiles: Its tile table (``row``, ``col``, ``prob_idc``, ``pred`` and ``call``).
        patch: The model's patch side in pixels.
        overlay: The PNG to write.
        name: The slide as the client named it, for the title.
    """
    from ..spatial.figures import _save_png, plot_patient_heatmap
    from ..spatial.wsi import THUMB_PX, open_slide, thumbnail, tile_grid

    handle = open_slide(slide)
    try:
        grid = tile_grid(handle, summary["slide_mpp"], summary["mpp"], patch)
        thumb = thumbnail(handle, grid)
    finally:
        handle.close()
    prob = np.full((grid.rows, grid.cols), np.nan)
    uncertain = np.zeros(prob.shape, bool)
    rows, cols = tiles["row"].to_numpy(), tiles["col"].to_numpy()
    prob[rows, cols] = tiles["prob_idc"].to_numpy()
    uncertain[rows, cols] = (tiles["call"] == "uncertain").to_numpy()
    n, hot = len(tiles), int((tiles["pred"] == 1).sum())
    title = f"{name}: IDC in {hot / n:.0%} of {n} tissue tiles, {uncertain.sum()} uncertain"
    fig = plot_patient_heatmap(
        thumb, prob, (0, 0), summary["threshold"], patch=THUMB_PX,
        mpp=summary["mpp"] * patch / THUMB_PX, title=title, uncertain=uncertain,
    )  # fmt: skip
    _save_png(fig, overlay)
