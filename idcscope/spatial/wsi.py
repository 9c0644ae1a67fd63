"""Reading a whole slide at the model's resolution: its tile grid, a thumbnail and tissue
mask, the tissue tiles; and writing pyramidal TIFFs."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..data import PATCH_SIZE
from ..errors import DataError

MAX_LEVEL0_PIXELS = 200_000 * 200_000  # larger than any real slide: a malformed header

THUMB_PX = 8  # thumbnail pixels per tile side for the tissue mask


MAX_TILES = 400_000  # tissue tiles held in memory (50x50x3 bytes each: 3 GB at the limit)


MAX_BAND_PIXELS = 64_000_000  # one read_region call

# µm per level-0 pixel a slide may have: scanners give 0.1-1, the IDC patches 4; beyond this
# range a tile is under a pixel or wider than any slide, so the value is a mistake.
MPP_RANGE = (0.01, 100.0)


def check_mpp(mpp: float, what: str = "slide mpp") -> float:
    """``mpp`` as a float, when it is a finite number of µm per pixel within ``MPP_RANGE``.

    Raises:
        DataError: naming ``what`` and the value, for anything else (inf, nan, 0, -1, 1e6).
    """
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = math.nan
    lo, hi = MPP_RANGE
    if not (math.isfinite(value) and lo <= value <= hi):
        raise DataError(f"{what} must be a number of µm per pixel from {lo:g} to {hi:g}, got {mpp}")
    return value


@dataclass(frozen=True)
class TileGrid:
    """Where the model's tiles lie on a slide.

    ``tile`` is the tile side in level-0 pixels (a float: 50 x target mpp / slide mpp);
    tile (row, col) covers level-0 ``[col * tile, (col + 1) * tile)`` horizontally.
    ``level`` is the pyramid level the pixels are read from, ``downsample`` its factor.
    """

    rows: int
    cols: int
    tile: float
    level: int
    downsample: float
    slide_mpp: float
    mpp: float


def open_slide(path: str | Path):
    """Open a slide with OpenSlide (pyramidal formats, or a plain image), checking its size."""
    try:
        import openslide
    except ImportError as e:  # pragma: no cover - a core dependency
        raise DataError("whole-slide reading needs openslide-python and openslide-bin") from e
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such slide file")
    try:
        slide = openslide.open_slide(str(path))
    except Image.DecompressionBombError as e:  # a plain image Pillow would decode whole
        raise DataError(
            f"{path}: a plain (not tiled) image too large to decode ({e}); "
            "save large images as tiled, pyramidal TIFF"
        ) from e
    except (openslide.OpenSlideError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise DataError(f"{path}: not a slide OpenSlide or Pillow can read ({e})") from e
    w, h = slide.dimensions
    if w <= 0 or h <= 0 or w * h > MAX_LEVEL0_PIXELS:
        slide.close()
        raise DataError(f"{path}: implausible slide size {w}x{h} pixels")
    return slide


def read_mpp(slide, path: str | Path, override: float | None = None) -> float:
    """Microns per level-0 pixel: ``override``, else the slide's own ``openslide.mpp-x``."""
    if override is not None:
        return check_mpp(override)
    try:
        mpp = float(slide.properties["openslide.mpp-x"])
    except (KeyError, ValueError):
        mpp = 0.0
    if not mpp > 0:
        raise DataError(
            f"{path}: the slide does not record its resolution (openslide.mpp-x); pass it "
            "with --slide-mpp (e.g. 0.25 for 40x, 0.5 for 20x)"
        )
    return check_mpp(mpp, f"{path}: the resolution the slide records (openslide.mpp-x)")


def tile_grid(slide, mpp_slide: float, mpp: float, patch: int = PATCH_SIZE) -> TileGrid:
    """Tiles of ``patch`` model pixels at ``mpp``; a partial tile at the edge is kept."""
    tile = patch * mpp / mpp_slide
    w, h = slide.dimensions
    rows, cols = math.ceil(h / tile), math.ceil(w / tile)
    if rows * cols == 0 or tile < 1:
        raise DataError(
            f"slide of {w}x{h} px at {mpp_slide:g} µm/px is too small or too coarse for "
            f"{patch}-px tiles at {mpp:g} µm/px"
        )
    # The coarsest level that still has at least the model's resolution.
    level = slide.get_best_level_for_downsample(tile / patch + 1e-6)
    return TileGrid(rows, cols, tile, level, float(slide.level_downsamples[level]), mpp_slide, mpp)


def read_band(slide, grid: TileGrid, row: int, col0: int, col1: int, px: int) -> np.ndarray:
    """Tiles ``col0..col1-1`` of one tile row as RGB uint8, ``px`` pixels per tile side.

    Pixels outside the slide (or transparent) read as white glass.
    """
    from PIL import Image

    x0, y0 = round(col0 * grid.tile), round(row * grid.tile)
    scale = grid.downsample
    w = max(1, round((col1 - col0) * grid.tile / scale))
    h = max(1, round(grid.tile / scale))
    if w * h > MAX_BAND_PIXELS:
        raise DataError(
            f"a band of {w}x{h} pixels at level {grid.level}: the slide lacks a pyramid "
            "level near the model's resolution"
        )
    rgba = np.asarray(slide.read_region((x0, y0), grid.level, (w, h)))
    rgb = np.where(rgba[..., 3:] == 0, np.uint8(255), rgba[..., :3])
    size = ((col1 - col0) * px, px)
    if (w, h) != size:
        shrink = Image.Resampling.BOX if w > size[0] else Image.Resampling.BILINEAR
        rgb = np.asarray(Image.fromarray(rgb).resize(size, shrink))
    return rgb


def _band_tiles(band: np.ndarray, px: int) -> np.ndarray:
    """(px, n*px, 3) band -> (n, px, px, 3) tiles."""
    n = band.shape[1] // px
    return band.reshape(px, n, px, 3).transpose(1, 0, 2, 3)


def thumbnail(slide, grid: TileGrid, px: int = THUMB_PX) -> np.ndarray:
    """The whole tile grid at ``px`` pixels per tile, read band by band from a coarse level."""
    level = slide.get_best_level_for_downsample(grid.tile / px + 1e-6)
    coarse = replace(grid, level=level, downsample=float(slide.level_downsamples[level]))
    return np.concatenate([read_band(slide, coarse, r, 0, grid.cols, px) for r in range(grid.rows)])


def tissue_mask(thumb: np.ndarray, min_contrast: int = 16) -> np.ndarray:
    """Tissue pixels of an RGB thumbnail: no brighter than Otsu's threshold, cleaned up.

    Closing then opening smooths the boundary and drops specks; a thumbnail with no contrast
    (blank glass) has no tissue.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    grey = (thumb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    lo, hi = np.percentile(grey, [1, 99])
    if hi - lo < min_contrast:
        return np.zeros(grey.shape, bool)
    mask = grey <= threshold_otsu(grey)  # Otsu: classes are <= t and > t
    mask = ndimage.binary_closing(mask, iterations=2, border_value=0)
    return ndimage.binary_opening(mask, iterations=1)


def tile_tissue(mask: np.ndarray, grid: TileGrid, px: int = THUMB_PX) -> np.ndarray:
    """Fraction of tissue pixels in each tile: a (rows, cols) float grid."""
    return mask.reshape(grid.rows, px, grid.cols, px).mean(axis=(1, 3))


def read_tiles(slide, grid: TileGrid, tissue: np.ndarray, patch: int = PATCH_SIZE):
    """The tissue tiles (``tissue`` is a boolean grid) as uint8 (N, patch, patch, 3).

    Returns the tiles and their (row, col) indices, row-major.
    """
    from ..progress import progress_bar

    rows, cols = np.nonzero(tissue)
    if len(rows) > MAX_TILES:
        raise DataError(
            f"{len(rows)} tissue tiles exceed the limit of {MAX_TILES}; is the slide mpp right?"
        )
    tiles = np.empty((len(rows), patch, patch, 3), np.uint8)
    filled = 0
    with progress_bar("reading tiles", total=len(rows)) as advance:
        for r in np.unique(rows):
            cs = cols[rows == r]
            band = read_band(slide, grid, int(r), int(cs.min()), int(cs.max()) + 1, patch)
            tiles[filled : filled + len(cs)] = _band_tiles(band, patch)[cs - cs.min()]
            filled += len(cs)
            advance(len(cs))
    return tiles, rows, cols


class Scan(NamedTuple):
    """What is read of a slide: its tile grid, thumbnail, tissue fraction per tile, and the
    tissue tiles (uint8 (N, patch, patch, 3)) with their grid rows and columns."""

    grid: TileGrid
    thumb: np.ndarray
    fraction: np.ndarray
    tiles: np.ndarray
    rows: np.ndarray
    cols: np.ndarray


def read_slide(path: Path, slide_mpp, mpp: float, patch: int, min_tissue: float) -> Scan:
    """Tile, mask and read a slide at the model's resolution; a damaged one is a DataError."""
    import openslide

    slide = open_slide(path)
    try:
        grid = tile_grid(slide, read_mpp(slide, path, slide_mpp), mpp, patch)
        thumb = thumbnail(slide, grid)
        fraction = tile_tissue(tissue_mask(thumb), grid)
        tiles, rows, cols = read_tiles(slide, grid, fraction >= min_tissue, patch)
    except (OSError, ValueError, openslide.OpenSlideError) as e:
        raise DataError(f"{path}: cannot read the slide's pixels (damaged file?): {e}") from e
    finally:
        slide.close()
    return Scan(grid, thumb, fraction, tiles, rows, cols)


def write_tiff_slide(
    image: np.ndarray, path: str | Path, mpp: float, levels: int = 3, tile: int = 256
) -> Path:
    """Write an RGB image as a tiled, pyramidal TIFF that OpenSlide reads (generic-tiff).

    Level k is the image box-downsampled by 2**k; the resolution tags carry ``mpp``. Handy
    for viewing a rebuilt patient in QuPath, and for tests and benchmarks of the slide path.
    """
    import tifffile
    from PIL import Image

    path = Path(path)
    opts = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tif:
        level = np.ascontiguousarray(image)
        for k in range(levels):
            ppcm = 1e4 / (mpp * 2**k)  # pixels per centimetre
            tif.write(
                level,
                subfiletype=1 if k else 0,
                resolution=(ppcm, ppcm),
                resolutionunit="CENTIMETER",
                **opts,
            )
            h, w = level.shape[:2]
            if min(h, w) < 2 * tile:
                break
            level = np.asarray(Image.fromarray(level).reduce(2))
    return path
