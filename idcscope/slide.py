"""Whole-slide inference: tile a pyramidal slide at the model's resolution and map P(IDC).

The IDC patches are 50x50 pixels at about 4 µm/px (2.5x). A slide scanned at 0.25 µm/px
(40x) is therefore cut into tiles of 800x800 level-0 pixels, each read from the pyramid
level closest to (and not coarser than) 4 µm/px and resized to 50x50. Only tiles that an
Otsu tissue mask on a thumbnail calls tissue are scored. Tiles are read a row band at a
time, so memory stays bounded by one band plus the tissue tiles themselves.

Outputs: a per-tile CSV, a heatmap overlay PNG, and the IDC regions as GeoJSON polygons in
level-0 pixel coordinates, the convention QuPath imports.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError

logger = logging.getLogger(__name__)

PATCH = 50
THUMB_PX = 8  # thumbnail pixels per tile side for the tissue mask
MAX_LEVEL0_PIXELS = 200_000 * 200_000  # larger than any real slide: a malformed header
MAX_TILES = 400_000  # tissue tiles held in memory (50x50x3 bytes each: 3 GB at the limit)
MAX_BAND_PIXELS = 64_000_000  # one read_region call


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
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such slide file")
    try:
        slide = openslide.open_slide(str(path))
    except (openslide.OpenSlideError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a slide OpenSlide or Pillow can read ({e})") from e
    w, h = slide.dimensions
    if w <= 0 or h <= 0 or w * h > MAX_LEVEL0_PIXELS:
        slide.close()
        raise DataError(f"{path}: implausible slide size {w}x{h} pixels")
    return slide


def read_mpp(slide, path: str | Path, override: float | None = None) -> float:
    """Microns per level-0 pixel: ``override``, else the slide's own ``openslide.mpp-x``."""
    if override is not None:
        if not override > 0:
            raise DataError(f"slide mpp must be positive, got {override}")
        return float(override)
    try:
        mpp = float(slide.properties["openslide.mpp-x"])
    except (KeyError, ValueError):
        mpp = 0.0
    if not mpp > 0:
        raise DataError(
            f"{path}: the slide does not record its resolution (openslide.mpp-x); pass it "
            "with --slide-mpp (e.g. 0.25 for 40x, 0.5 for 20x)"
        )
    return mpp


def tile_grid(slide, mpp_slide: float, mpp: float, patch: int = PATCH) -> TileGrid:
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


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of uint8 values: the split maximising between-class variance."""
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256).astype(float)
    p = hist / hist.sum()
    omega, mu = np.cumsum(p), np.cumsum(p * np.arange(256))
    with np.errstate(invalid="ignore", divide="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1 - omega))
    return float(np.nanargmax(between)) if np.isfinite(between).any() else 255.0


def tissue_mask(thumb: np.ndarray, min_contrast: int = 16) -> np.ndarray:
    """Tissue pixels of an RGB thumbnail: no brighter than Otsu's threshold, cleaned up.

    Closing then opening smooths the boundary and drops specks; a thumbnail with no contrast
    (blank glass) has no tissue.
    """
    from scipy import ndimage

    grey = (thumb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    lo, hi = np.percentile(grey, [1, 99])
    if hi - lo < min_contrast:
        return np.zeros(grey.shape, bool)
    mask = grey <= otsu_threshold(grey)  # Otsu: classes are <= t and > t
    mask = ndimage.binary_closing(mask, iterations=2, border_value=0)
    return ndimage.binary_opening(mask, iterations=1)


def tile_tissue(mask: np.ndarray, grid: TileGrid, px: int = THUMB_PX) -> np.ndarray:
    """Fraction of tissue pixels in each tile: a (rows, cols) float grid."""
    return mask.reshape(grid.rows, px, grid.cols, px).mean(axis=(1, 3))


def read_tiles(slide, grid: TileGrid, tissue: np.ndarray, patch: int = PATCH):
    """The tissue tiles (``tissue`` is a boolean grid) as uint8 (N, patch, patch, 3).

    Returns the tiles and their (row, col) indices, row-major.
    """
    from .progress import progress_bar

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


def idc_regions(prob: np.ndarray, threshold: float, grid: TileGrid) -> dict:
    """IDC regions (tiles at or above ``threshold``, merged) as a GeoJSON FeatureCollection.

    Coordinates are level-0 pixels, y down, as QuPath expects; each region records its area
    in mm², its tile count and mean P(IDC).
    """
    import shapely
    from scipy import ndimage

    hot = np.nan_to_num(prob, nan=0.0) >= threshold
    labels, n = ndimage.label(hot)  # 4-connected: regions touching at a corner stay apart
    features = []
    mm2_per_px = (grid.slide_mpp / 1000) ** 2
    for k in range(1, n + 1):
        r, c = np.nonzero(labels == k)
        boxes = shapely.box(c * grid.tile, r * grid.tile, (c + 1) * grid.tile, (r + 1) * grid.tile)
        geom = shapely.union_all(boxes).simplify(0)
        features.append(
            {
                "type": "Feature",
                "geometry": json.loads(shapely.to_geojson(geom)),
                "properties": {
                    "objectType": "annotation",
                    "name": f"IDC region {k}",
                    "classification": {"name": "IDC", "color": [214, 39, 40]},
                    "isLocked": False,
                    "measurements": {
                        "area_mm2": round(geom.area * mm2_per_px, 5),
                        "n_tiles": len(r),
                        "mean_prob_idc": round(float(prob[r, c].mean()), 4),
                    },
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def slide_inference(
    predictor,
    slide_path: str | Path,
    out_dir: str | Path,
    *,
    slide_mpp: float | None = None,
    threshold: float | None = None,
    tta: bool = False,
    batch_size: int | None = None,
    min_tissue: float = 0.25,
    context: bool = True,
    engine: str = "auto",
) -> dict:
    """Score every tissue tile of a slide and write the heatmap, tile table and IDC GeoJSON.

    Args:
        predictor: An :class:`~idcscope.inference.Predictor`, or a checkpoint path (or a
            list of them, for an ensemble).
        slide_path: A slide OpenSlide reads (.svs, .ndpi, .mrxs, tiled .tif, ...) or a plain
            image.
        out_dir: Receives ``<slide>_tiles.csv``, ``<slide>_overlay.png``,
            ``<slide>_idc.geojson`` and ``<slide>_slide.json``.
        slide_mpp: Microns per level-0 pixel, when the file does not record it.
        threshold: Decision threshold; defaults to the checkpoint's (chosen on validation).
        tta: Average the 8 dihedral transforms of each tile.
        batch_size: Tiles per forward pass.
        min_tissue: Fraction of a tile the tissue mask must cover for it to be scored.
        context: Score each tile with its neighbouring tiles (neighbourhood input and
            spatial context, as far as the model has them); False scores each alone.
        engine: The Predictor's engine, when ``predictor`` is a path.

    Returns:
        The JSON summary: grid, tile counts, IDC area and fraction, timings (tiles/s) and
        the files written.
    """
    from .heatmap import _save_png, plot_patient_heatmap
    from .inference.predictor import Predictor

    if not isinstance(predictor, Predictor):
        predictor = Predictor(predictor, engine, tta=tta, batch_size=batch_size, context=context)
    ckpt = predictor.checkpoints[0]
    mpp = float(ckpt["preprocessing"]["mpp"])
    patch = int(ckpt["preprocessing"]["patch_size"])
    threshold = predictor.threshold if threshold is None else float(threshold)
    path = Path(slide_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = path.stem

    t0 = time.perf_counter()
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
    t_read = time.perf_counter() - t0
    prob = np.full((grid.rows, grid.cols), np.nan)
    if len(tiles):  # one slide is one patient for stain normalisation and spatial context
        where = (cols * patch, rows * patch)  # the tile grid in model-resolution pixels
        prob[rows, cols] = predictor.predict_proba(tiles, None, np.full(len(tiles), name), where)
    elapsed = time.perf_counter() - t0
    t_score = elapsed - t_read

    n, hot = len(tiles), int((prob[rows, cols] >= threshold).sum())
    tile_mm2 = (grid.tile * grid.slide_mpp / 1000) ** 2
    summary = {
        "slide": str(path),
        "slide_mpp": grid.slide_mpp,
        "mpp": mpp,
        "level": grid.level,
        "grid": [grid.rows, grid.cols],
        "tile_px_level0": round(grid.tile, 3),
        "threshold": threshold,
        "tta": predictor.tta,
        "context_sigma": predictor.context_sigma,
        "n_tiles": n,
        "n_idc_tiles": hot,
        "idc_fraction": hot / n if n else None,
        "tissue_mm2": round(n * tile_mm2, 4),
        "idc_mm2": round(hot * tile_mm2, 4),
        "engine": predictor.engine,
        "seconds": round(elapsed, 3),
        "seconds_reading": round(t_read, 3),
        "seconds_scoring": round(t_score, 3),
        "tiles_per_s": round(n / elapsed, 1) if n else None,
        "scoring_tiles_per_s": round(n / t_score, 1) if n and t_score > 0 else None,
    }
    files = {
        "tiles_csv": out / f"{name}_tiles.csv",
        "geojson": out / f"{name}_idc.geojson",
        "overlay": out / f"{name}_overlay.png",
    }
    pd.DataFrame(
        {
            "row": rows,
            "col": cols,
            "x": np.round(cols * grid.tile).astype(int),
            "y": np.round(rows * grid.tile).astype(int),
            "size": round(grid.tile, 3),
            "tissue": fraction[rows, cols].round(3),
            "prob_idc": prob[rows, cols].round(6),
            "pred": (prob[rows, cols] >= threshold).astype(int),
        }
    ).to_csv(files["tiles_csv"], index=False)
    files["geojson"].write_text(json.dumps(idc_regions(prob, threshold, grid)) + "\n")
    frac = "no tissue found" if not n else f"IDC in {hot / n:.0%} of {n} tissue tiles"
    fig = plot_patient_heatmap(
        thumb,
        prob,
        (0, 0),
        threshold,
        patch=THUMB_PX,
        mpp=mpp * patch / THUMB_PX,
        title=f"{path.name}: {frac}",
    )
    _save_png(fig, files["overlay"])
    summary["files"] = {k: str(v) for k, v in files.items()}
    (out / f"{name}_slide.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info(
        "%s: %d tissue tiles, %s, %.1f tiles/s", path.name, n, frac, summary["tiles_per_s"] or 0
    )
    return summary


SUMMARY_COLUMNS = (
    "slide", "n_tiles", "n_idc_tiles", "idc_fraction", "tissue_mm2", "idc_mm2", "seconds",
    "tiles_per_s",
)  # fmt: skip


def slides_inference(model, slide_paths: list, out_dir: str | Path, **options) -> list[dict]:
    """:func:`slide_inference` of several slides, and ``slides.csv``: a row per slide.

    Under torchrun the slides are shared out between the processes (whole slides, every
    ``world``-th one per rank), each writes its slides' files, and rank 0 writes the table,
    in the order the slides were given, as one process does. Returns the slides'
    summaries (rank 0: all of them, in that order).
    """
    from .distributed import init_distributed, shard, shutdown
    from .inference.predictor import Predictor

    ctx = init_distributed("cpu")
    try:
        predictor = model
        if not isinstance(model, Predictor):
            keys = ("engine", "tta", "batch_size", "context")
            kwargs = {k: options.pop(k) for k in keys if k in options}
            predictor = Predictor(model, threads=ctx.threads, **kwargs)
        mine = shard(list(enumerate(slide_paths)), ctx)
        rows = [(i, slide_inference(predictor, p, out_dir, **options)) for i, p in mine]
        if ctx.enabled:
            import torch.distributed as dist

            gathered: list | None = [None] * ctx.world if ctx.is_main else None
            dist.gather_object(rows, gathered, dst=0)
            rows = [r for part in gathered or [] for r in part]
    finally:
        shutdown(ctx)
    summaries = [s for _, s in sorted(rows, key=lambda r: r[0])]
    if ctx.is_main:
        table = pd.DataFrame([{k: s[k] for k in SUMMARY_COLUMNS} for s in summaries])
        table.reindex(columns=SUMMARY_COLUMNS).to_csv(Path(out_dir) / "slides.csv", index=False)
    return summaries


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
