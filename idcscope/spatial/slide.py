"""Whole-slide inference: tile a pyramidal slide at the model's resolution and map P(IDC).

The IDC patches are 50x50 pixels at about 4 µm/px (2.5x). A slide scanned at 0.25 µm/px
(40x) is therefore cut into tiles of 800x800 level-0 pixels, each read from the pyramid
level closest to (and not coarser than) 4 µm/px and resized to 50x50. Only tiles that an
Otsu tissue mask on a thumbnail calls tissue are scored. Tiles are read a row band at a
time, so memory stays bounded by one band plus the tissue tiles themselves.

Outputs: a per-tile CSV (calibrated P(IDC) and the uncalibrated logit margin of each
tile), a heatmap overlay PNG, and the IDC regions as GeoJSON polygons in level-0 pixel
coordinates, the convention QuPath imports.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.grid import TRUNCATE
from ..inference.tables import Verdicts, prediction_table
from .wsi import THUMB_PX, Scan, TileGrid, check_mpp, read_slide

logger = logging.getLogger(__name__)

# Share of tissue tiles the input check finds at the wrong magnification above which the
# slide, not its tiles, is at fault: most likely its stated µm/px, which sets the tiles' scale.
WRONG_SCALE_SHARE = 0.5
MIN_TISSUE = 0.25  # share of a tile the tissue mask must cover for the tile to be scored
BANDS = 8  # row bands a slide is scored in when it is drawn as it is scored (``each``)


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


def tile_places(scan: Scan, name: str, patch: int) -> tuple[np.ndarray, tuple]:
    """The tissue tiles as the Predictor scores them: ``(groups, (xs, ys))``. One slide is
    one patient for stain normalisation and spatial context (``name``), and each tile lies
    at its place on the tile grid in model-resolution pixels (``patch`` per tile)."""
    return np.full(len(scan.tiles), name), (scan.cols * patch, scan.rows * patch)


def input_reach(predictor) -> int | None:
    """How many cells of the tile grid around a tile the model input of that tile holds:
    its neighbourhood planes' radius (0 when the Predictor scores tiles alone). None when
    the whole slide sets it: a model that normalises stain per slide."""
    if any(m.preprocessing.get("stain", "none") != "none" for m in predictor.models):
        return None
    if not predictor.context:
        return 0
    return max(int(m.preprocessing.get("neighbourhood", 0)) for m in predictor.models)


def score_reach(predictor, patch: int) -> int | None:
    """How many cells of the tile grid around a tile its score depends on: the tiles its
    logits are smoothed with (scipy's Gaussian stops at ``int(TRUNCATE * sigma + 0.5)``
    cells), each with its model input (:func:`input_reach`), and at least the 8 neighbours
    that set its context. None when the whole slide does (:func:`input_reach`, or a
    smoothing grid other than the tiles')."""
    reach = input_reach(predictor)
    if reach is None or not predictor.context:
        return reach
    smoothing = 0
    for meta in predictor.models:
        sigma = float((meta.context or {}).get("sigma", 0.0))
        if sigma > 0 and int(meta.context.get("step", patch)) != patch:
            return None
        smoothing = max(smoothing, int(TRUNCATE * sigma + 0.5) if sigma > 0 else 0)
    return max(1, reach + smoothing)


def row_bands(rows: np.ndarray, reach: int | None, height: int) -> list[tuple[np.ndarray, ...]]:
    """The tiles on grid rows ``rows`` cut into bands ``height`` rows high, top to bottom:
    per band, the tiles to score together (the band and ``reach`` rows on each side, the
    tiles its scores depend on) and which of those the band keeps. One band (every tile)
    when ``reach`` is None."""
    everything = np.arange(len(rows))
    if reach is None or not len(rows):
        return [(everything, np.ones(len(rows), bool))]
    bands = []
    for top in range(int(rows.min()), int(rows.max()) + 1, max(1, height)):
        scored = everything[(rows >= top - reach) & (rows < top + height + reach)]
        keep = (rows[scored] >= top) & (rows[scored] < top + height)
        if keep.any():
            bands.append((scored, keep))
    return bands


def score_tiles(predictor, scan: Scan, name: str, patch: int, each=None, height=None) -> Verdicts:
    """The slide's tissue tiles scored, in the scan's order (``tile_places``).

    With ``each``, the slide is scored in bands of grid rows (``height`` rows; default:
    ``BANDS`` bands, at least 4 reaches high, so that the rows scored twice cost at most
    half as much again), each band with the tiles its scores depend on
    (:func:`score_reach`): every tile gets what one pass over the slide gives it.
    ``each(index, verdicts)`` hears of each band's tiles as soon as they are final.
    """
    from ..inference.stream import ArraySource, Bucket

    group, where = tile_places(scan, name, patch)
    if each is None:
        return predictor.predict(scan.tiles, None, group, where).verdicts
    reach = score_reach(predictor, patch)
    if height is None:
        span = int(scan.rows.max() - scan.rows.min()) + 1 if len(scan.rows) else 1
        height = max(4 * (reach or 1), -(-span // BANDS))
    bands = row_bands(scan.rows, reach, height)
    buckets = [Bucket(i, scored) for i, (scored, _) in enumerate(bands)]
    out = Verdicts.empty(len(scan.tiles))
    scores = predictor.score(group, where, ArraySource(scan.tiles), buckets)
    for s, (_, keep) in zip(scores, bands, strict=True):
        part = s.verdicts.take(keep)
        out.put(s.rows[keep], part)
        each(s.rows[keep], part)
    return out


def slide_inference(
    predictor,
    slide_path: str | Path,
    out_dir: str | Path,
    *,
    slide_mpp: float | None = None,
    threshold: float | None = None,
    tta: bool = False,
    batch_size: int | None = None,
    min_tissue: float = MIN_TISSUE,
    context: bool = True,
    engine: str = "auto",
    scan: Scan | None = None,
    each=None,
) -> dict:
    """Score every tissue tile of a slide and write the heatmap, tile table and IDC GeoJSON.

    Args:
        predictor: An :class:`~idcscope.inference.Predictor`, or a checkpoint path (or a
            list of them, for an ensemble).
        slide_path: A slide OpenSlide reads (.svs, .ndpi, .mrxs, tiled .tif, ...), or an image.
        out_dir: Receives ``<slide>_tiles.csv``, ``<slide>_overlay.png``,
            ``<slide>_idc.geojson`` and ``<slide>_slide.json``.
        slide_mpp: Microns per level-0 pixel, when the file does not record it.
        threshold: Decision threshold; defaults to the checkpoint's (chosen on validation).
        tta, batch_size: The 8 dihedral transforms averaged; tiles per forward pass.
        min_tissue: Fraction of a tile the tissue mask must cover for it to be scored.
        context: Score each tile with its neighbouring tiles (neighbourhood input and
            spatial context, as far as the model has them); False scores each alone.
        engine: The Predictor's engine, when ``predictor`` is a path.
        scan: The slide already read as this reads it (``wsi.read_slide``; the viewer
            reads it first, to show the tissue early and keep the tiles it explains).
        each: Hears of the tiles' scores band by band (:func:`score_tiles`: the viewer's).

    Returns:
        The JSON summary: grid, tile counts, IDC area and fraction, timings (tiles/s), the
        files written and ``warnings`` (sentences, also logged): the slide's stated µm/px
        doubted when the input check finds most of its tissue tiles at the wrong
        magnification (``WRONG_SCALE_SHARE``).

    Raises:
        DataError: ``slide_mpp`` (or the one the slide records) is not a finite number in
            ``wsi.MPP_RANGE``; the slide cannot be read, is implausibly large, or is a plain
            image too large to decode.
    """
    from ..inference.predictor import Predictor

    if slide_mpp is not None:  # refused before the model is loaded or a file written
        slide_mpp = check_mpp(slide_mpp)
    if not isinstance(predictor, Predictor):
        predictor = Predictor(predictor, engine, tta=tta, batch_size=batch_size, context=context)
    prep = predictor.models[0].preprocessing
    mpp, patch = float(prep["mpp"]), int(prep["patch_size"])
    threshold = predictor.threshold if threshold is None else float(threshold)
    path, out = Path(slide_path), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    scan = scan or read_slide(path, slide_mpp, mpp, patch, min_tissue)
    t_read = time.perf_counter() - t0
    rows, cols = scan.rows, scan.cols
    prob = np.full((scan.grid.rows, scan.grid.cols), np.nan)
    verdicts = Verdicts.empty(len(scan.tiles))
    if len(scan.tiles):
        verdicts = score_tiles(predictor, scan, path.stem, patch, each)
        prob[rows, cols] = verdicts.prob
    elapsed = time.perf_counter() - t0

    summary = _summary(path, scan, prob, threshold, predictor, mpp, elapsed, t_read)
    summary |= verdicts.counts()
    summary["warnings"] = _warnings(path, scan.grid, verdicts.check, slide_mpp is not None)
    for warning in summary["warnings"]:
        logger.warning("%s", warning)
    summary["files"] = _write_maps(out, path, scan, prob, verdicts, threshold, mpp * patch)
    (out / f"{path.stem}_slide.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info(
        "%s: %d tissue tiles, %s, %.1f tiles/s",
        path.name, summary["n_tiles"], _found(summary), summary["tiles_per_s"] or 0,
    )  # fmt: skip
    return summary


def _summary(path, scan: Scan, prob, threshold, predictor, mpp, elapsed, t_read) -> dict:
    grid, n = scan.grid, len(scan.tiles)
    hot = int((prob[scan.rows, scan.cols] >= threshold).sum())
    tile_mm2 = (grid.tile * grid.slide_mpp / 1000) ** 2
    t_score = elapsed - t_read
    return {
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


def _warnings(path: Path, grid: TileGrid, check: np.ndarray, given: bool) -> list[str]:
    """What to know before reading the slide's map: that most of its tissue tiles look to
    the model's input check (``check``: each tile's reason) like the wrong magnification,
    which one tile may be but a slide's tiles are when its µm/px is wrong (``given``: it
    was given, else the file records it)."""
    n = len(check)
    share = float(np.mean(check == "magnification")) if n else 0.0
    if share <= WRONG_SCALE_SHARE:
        return []
    stated = "given with --slide-mpp" if given else "as the file records it"
    return [
        f"{path.name}: {share:.0%} of its {n} tissue tiles look to the model's input check "
        f"like the wrong magnification: the slide's stated {grid.slide_mpp:g} µm/px "
        f"({stated}), which sets the scale its tiles are cut at ({grid.tile:g} level-0 px for "
        f"{grid.mpp:g} µm/px), may be wrong; those tiles' calls are uncertain"
    ]


def _found(summary: dict) -> str:
    n = summary["n_tiles"]
    return (
        "no tissue found"
        if not n
        else f"IDC in {summary['n_idc_tiles'] / n:.0%} of {n} tissue tiles"
    )


def _write_maps(out: Path, path: Path, scan: Scan, prob, verdicts, threshold, tile_um) -> dict:
    """The tile table, the IDC regions as GeoJSON and the overlay; returns their paths.

    The table has a row per tissue tile (``verdicts``: what the model says of each, in
    their order): its place on the tile grid and in level-0 pixels, its size and tissue
    fraction, then the prediction columns every table has (``inference.tables``).
    ``tile_um``: a tile's side in µm.
    """
    from .heatmap import _save_png, plot_patient_heatmap

    name, grid, rows, cols = path.stem, scan.grid, scan.rows, scan.cols
    files = {
        "tiles_csv": out / f"{name}_tiles.csv",
        "geojson": out / f"{name}_idc.geojson",
        "overlay": out / f"{name}_overlay.png",
    }
    ids = pd.DataFrame(
        {
            "row": rows,
            "col": cols,
            "x": np.round(cols * grid.tile).astype(int),
            "y": np.round(rows * grid.tile).astype(int),
            "size": round(grid.tile, 3),
            "tissue": scan.fraction[rows, cols].round(3),
        }
    )
    table = prediction_table(ids, verdicts, threshold)
    table.to_csv(files["tiles_csv"], index=False)
    files["geojson"].write_text(json.dumps(idc_regions(prob, threshold, grid)) + "\n")
    hot = int((prob[rows, cols] >= threshold).sum())
    found = _found({"n_tiles": len(scan.tiles), "n_idc_tiles": hot})
    uncertain = np.zeros(prob.shape, bool)
    uncertain[rows, cols] = verdicts.call == -1
    if uncertain.any():
        found += f", {int(uncertain.sum())} uncertain"
    fig = plot_patient_heatmap(
        scan.thumb, prob, (0, 0), threshold, patch=THUMB_PX, mpp=tile_um / THUMB_PX,
        title=f"{path.name}: {found}", uncertain=uncertain,
    )  # fmt: skip
    _save_png(fig, files["overlay"])
    return {k: str(v) for k, v in files.items()}


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
    from ..distributed import process_group, shard
    from ..inference.predictor import Predictor

    with process_group("cpu") as ctx:
        predictor = model
        if not isinstance(model, Predictor):
            keys = ("engine", "tta", "batch_size", "context", "alpha")
            kwargs = {k: options.pop(k) for k in keys if k in options}
            predictor = Predictor(model, threads=ctx.threads, **kwargs)
        mine = shard(list(enumerate(slide_paths)), ctx)
        rows = [(i, slide_inference(predictor, p, out_dir, **options)) for i, p in mine]
        if ctx.enabled:
            import torch.distributed as dist

            gathered: list | None = [None] * ctx.world if ctx.is_main else None
            dist.gather_object(rows, gathered, dst=0)
            rows = [r for part in gathered or [] for r in part]
    summaries = [s for _, s in sorted(rows, key=lambda r: r[0])]
    if ctx.is_main:
        table = pd.DataFrame([{k: s[k] for k in SUMMARY_COLUMNS} for s in summaries])
        table.reindex(columns=SUMMARY_COLUMNS).to_csv(Path(out_dir) / "slides.csv", index=False)
    return summaries
