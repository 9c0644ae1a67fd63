"""Whole-slide inference on pyramidal TIFFs the tests write from real sample patches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from idcscope.errors import DataError
from idcscope.spatial.slide import slide_inference
from idcscope.spatial.wsi import (
    open_slide,
    read_mpp,
    tile_grid,
    tissue_mask,
    write_tiff_slide,
)

PATIENT = "8951"  # the smallest sample patient: 613 patches


@pytest.fixture(scope="module")
def patient(real_sample):
    """One real patient: patches, their grid cells, and the rebuilt tissue at 4 µm/px."""
    from idcscope.data.decode import decode_files
    from idcscope.data.manifest import index_dataset
    from idcscope.spatial.heatmap import patient_mosaic

    ix = index_dataset(real_sample / PATIENT)
    t = ix.table
    decoded = decode_files([str(ix.root / p) for p in t["path"]])
    assert decoded.ok.all()
    mosaic, (x0, y0) = patient_mosaic(decoded.images, t["x"], t["y"])
    cells = np.stack([(t["y"] - y0) // 50, (t["x"] - x0) // 50], axis=1)
    return decoded.images, cells, t["label"].to_numpy(), mosaic


@pytest.fixture(scope="module")
def slide_2mpp(patient, tmp_path_factory):
    """The patient scanned at 2 µm/px: level 0 is the mosaic upsampled 2x, level 1 the mosaic."""
    mosaic = patient[3]
    path = tmp_path_factory.mktemp("slide") / f"{PATIENT}.tif"
    return write_tiff_slide(np.repeat(np.repeat(mosaic, 2, axis=0), 2, axis=1), path, mpp=2.0)


def test_pyramid_is_read_at_the_model_resolution(slide_2mpp, patient):
    slide = open_slide(slide_2mpp)
    grid = tile_grid(slide, read_mpp(slide, slide_2mpp), mpp=4.0)
    assert slide.level_count >= 2
    assert (grid.tile, grid.level, grid.downsample) == (100.0, 1, 2.0)
    h, w = patient[3].shape[:2]
    assert (grid.rows, grid.cols) == (h // 50, w // 50)


def test_slide_tiles_match_the_patches_they_were_built_from(
    trained_run, slide_2mpp, patient, tmp_path
):
    from idcscope.inference import Predictor

    images, cells, _, _ = patient
    # Patches alone (no neighbours seen, no smoothing): the tile set differs from the patch
    # set at the tissue's edge, so their neighbourhoods would too (slides with neighbours:
    # test_neighbourhood.py, with smoothing: test_context.py).
    predictor = Predictor(trained_run / "best.pt", context=False)
    summary = slide_inference(predictor, slide_2mpp, tmp_path)
    tiles = __import__("pandas").read_csv(summary["files"]["tiles_csv"])
    assert summary["n_tiles"] == len(tiles) > 0
    # The tissue mask keeps most patch cells and almost no glass.
    patch_cells = {tuple(c) for c in cells}
    scored = set(zip(tiles["row"], tiles["col"], strict=True))
    assert len(scored & patch_cells) >= 0.8 * len(patch_cells)
    assert len(scored - patch_cells) <= 0.05 * len(scored)
    # A tile read from the pyramid is its patch, pixel for pixel: same probability.
    by_cell = {tuple(c): i for i, c in enumerate(cells)}
    both = [
        (by_cell[c], k)
        for k, c in enumerate(zip(tiles["row"], tiles["col"], strict=True))
        if c in by_cell
    ]
    rows, ks = map(np.array, zip(*both, strict=True))
    expected = predictor.predict_proba(images, rows)
    np.testing.assert_allclose(tiles["prob_idc"].to_numpy()[ks], expected, atol=1e-4)
    # Level-0 coordinates and outputs.
    assert (tiles["x"] == tiles["col"] * 100).all()
    assert summary["tiles_per_s"] > 0
    assert (tmp_path / f"{PATIENT}_overlay.png").stat().st_size > 10_000


def test_geojson_regions_cover_the_idc_tiles(trained_run, slide_2mpp, tmp_path):
    summary = slide_inference(trained_run / "best.pt", slide_2mpp, tmp_path, threshold=0.3)
    regions = json.loads((tmp_path / f"{PATIENT}_idc.geojson").read_text())
    assert regions["type"] == "FeatureCollection"
    area = sum(f["properties"]["measurements"]["area_mm2"] for f in regions["features"])
    assert area == pytest.approx(summary["idc_mm2"], rel=1e-3)
    assert (
        sum(f["properties"]["measurements"]["n_tiles"] for f in regions["features"])
        == summary["n_idc_tiles"]
    )
    w, h = open_slide(summary["slide"]).dimensions
    for f in regions["features"]:
        assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")
        assert f["properties"]["classification"]["name"] == "IDC"
        xy = np.array(_coords(f["geometry"]))
        assert xy.min() >= 0 and (xy[:, 0] <= w + 100).all() and (xy[:, 1] <= h + 100).all()


def _coords(geometry) -> list:
    rings = geometry["coordinates"]
    if geometry["type"] == "MultiPolygon":
        rings = [r for poly in rings for r in poly]
    return [pt for ring in rings for pt in ring]


def test_resampling_from_a_finer_scan(trained_run, patient, tmp_path):
    """A 1 µm/px scan (4x the model's resolution) gives nearly the same map as a 2 µm/px one."""
    mosaic = patient[3][:600, :800]
    fine = write_tiff_slide(np.repeat(np.repeat(mosaic, 4, 0), 4, 1), tmp_path / "fine.tif", 1.0)
    coarse = write_tiff_slide(mosaic, tmp_path / "coarse.tif", 4.0)
    a = slide_inference(trained_run / "best.pt", fine, tmp_path / "a", min_tissue=0.0)
    b = slide_inference(trained_run / "best.pt", coarse, tmp_path / "b", min_tissue=0.0)
    assert a["grid"] == b["grid"] == [12, 16]
    pa = __import__("pandas").read_csv(a["files"]["tiles_csv"])["prob_idc"]
    pb = __import__("pandas").read_csv(b["files"]["tiles_csv"])["prob_idc"]
    assert len(pa) == len(pb) and np.abs(pa - pb).max() < 0.02


def test_blank_slide_has_no_tissue_and_still_reports(trained_run, tmp_path):
    glass = np.full((400, 600, 3), 243, np.uint8)
    summary = slide_inference(
        trained_run / "best.pt", write_tiff_slide(glass, tmp_path / "g.tif", 4.0), tmp_path
    )
    assert summary["n_tiles"] == 0 and summary["idc_fraction"] is None
    assert json.loads((tmp_path / "g_idc.geojson").read_text())["features"] == []


def test_slide_errors_name_the_file_and_the_fix(trained_run, tmp_path):
    not_slide = tmp_path / "notes.svs"
    not_slide.write_text("not a slide")
    with pytest.raises(DataError, match=r"notes\.svs"):
        slide_inference(trained_run / "best.pt", not_slide, tmp_path)
    with pytest.raises(DataError, match="no such slide"):
        slide_inference(trained_run / "best.pt", tmp_path / "missing.svs", tmp_path)
    import tifffile

    bare = tmp_path / "bare.tif"
    tifffile.imwrite(bare, np.zeros((512, 512, 3), np.uint8), tile=(256, 256), photometric="rgb")
    with pytest.raises(DataError, match="--slide-mpp"):
        slide_inference(trained_run / "best.pt", bare, tmp_path)
    out = slide_inference(trained_run / "best.pt", bare, tmp_path, slide_mpp=4.0)
    assert out["grid"] == [11, 11]


def test_tissue_mask_separates_stain_from_glass():
    thumb = np.full((40, 40, 3), 240, np.uint8)
    thumb[10:30, 10:30] = (150, 80, 160)
    mask = tissue_mask(thumb)
    assert mask[12:28, 12:28].all() and not mask[:8].any()


def test_cli_slide(trained_run, slide_2mpp, tmp_path):
    from typer.testing import CliRunner

    from idcscope.cli import app

    ckpt = str(trained_run / "best.pt")
    res = CliRunner().invoke(
        app, ["slide", str(slide_2mpp), "--out", str(tmp_path), "--model", ckpt]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout[res.stdout.index("{") :])["n_tiles"] > 0
    assert (tmp_path / f"{PATIENT}_idc.geojson").exists()
    res = CliRunner().invoke(
        app, ["slide", str(tmp_path / "none.svs"), "--out", str(tmp_path), "--model", ckpt]
    )
    assert res.exit_code == 2  # a usage error: no such slide
