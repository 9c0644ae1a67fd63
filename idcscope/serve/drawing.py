"""The pictures the page shows beside the numbers: a patch's explanation as enlarged PNGs.

A patch model's explanation is the patch, its CAM and its saliency. A neighbourhood model
reads the patch's 3x3 block too, so a CAM over the patch alone would draw the neighbours'
evidence on the patch's edges: its explanation is the three panels ``idcscope explain``
draws (``inference.panels.block_figure``), each as its own image for the page's table.
"""

from __future__ import annotations

import numpy as np

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


def write_maps(
    job: Job, k: int, patch: np.ndarray, cam: np.ndarray, sal: np.ndarray, stem: str = ""
) -> dict:
    """The patch and its CAM and saliency overlays as enlarged PNGs named ``<stem>_<kind>``
    (``stem``: patch ``k``'s number by default); returns their URLs."""
    from ..inference.panels import overlay

    return {
        kind: _save(job, img, f"{stem or f'{k:04d}'}_{kind}.png", UPSCALE)
        for kind, img in (
            ("patch", patch),
            ("cam", overlay(patch, cam) if cam.max() > 0 else patch),
            ("saliency", overlay(patch, sal) if sal.max() > 0 else patch),
        )
    }


def write_blocks(job: Job, k: int, block: np.ndarray, groups: np.ndarray, stem: str = "") -> dict:
    """What a neighbourhood model saw and where its evidence lies, as enlarged PNGs, the
    patch outlined in each: the 3x3 block, the neighbourhood planes' attribution over it
    and the patch planes' over the patch (``inference.panels.block_panels``); returns
    their URLs."""
    from ..inference.panels import block_centre, block_panels

    centre = block_centre(block, groups)
    return {
        kind: _save(job, img, f"{stem or f'{k:04d}'}_{kind}.png", BLOCK_UPSCALE, centre)
        for kind, img in zip(BLOCK_PANELS, block_panels(block, groups), strict=True)
    }
