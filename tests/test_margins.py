"""The uncalibrated logit margin: the Predictor gives it, and the prediction tables of
evaluate, predict and slide write it in full beside P(IDC) (which they round to 6
decimals), so that out-of-fold calibration is fitted on it (test_cv.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from idcscope.data.dataset import load_patch_data
from idcscope.inference import Predictor

F32 = {"rtol": float(np.finfo(np.float32).eps), "atol": 1e-12}  # float32 precision


@pytest.fixture(scope="module")
def model(trained_run) -> Path:
    return trained_run / "best.pt"


@pytest.fixture(scope="module")
def data(synthetic_root):
    return load_patch_data(synthetic_root)


def by_name(paths, values) -> dict[str, float]:
    return {Path(p).name: float(v) for p, v in zip(paths, values, strict=True)}


def assert_same(got: dict[str, float], want: dict[str, float]) -> None:
    assert sorted(got) == sorted(want)
    names = sorted(want)
    np.testing.assert_allclose([got[n] for n in names], [want[n] for n in names], **F32)


def test_the_predictor_gives_the_margin_it_calibrates(model, data, tmp_path):
    """One model: P(IDC) is the sigmoid of the margin, calibrated or not. An ensemble: the
    mean of its members' margins, each after its own spatial context."""
    from idcscope.models.checkpoint import update_checkpoint

    rows = data.rows()[:150]
    coords = tuple(data.table[c].to_numpy(np.float64) for c in "xy")
    one = Predictor(model, "torch")
    got = one.predict(data.images, rows, data.patients, coords)
    assert got.margin.dtype == np.float64 and np.isfinite(got.margin).all()
    np.testing.assert_allclose(expit(got.margin), got.prob_uncalibrated, rtol=1e-12)
    t, b = one.models[0].calibrated()
    np.testing.assert_allclose(got.prob, expit(got.margin / t + b), rtol=1e-12)

    wide = tmp_path / "wide.pt"  # the same weights, smoothed over a wider context
    wide.write_bytes(model.read_bytes())
    update_checkpoint(wide, context={"sigma": 2.0, "step": 50})
    other = Predictor(wide, "torch").predict(data.images, rows, data.patients, coords).margin
    assert np.abs(other - got.margin).max() > 0.01
    both = Predictor([model, wide], "torch").predict(data.images, rows, data.patients, coords)
    np.testing.assert_allclose(both.margin, (got.margin + other) / 2, **F32)


def test_evaluate_and_predict_write_the_predictors_margin(model, synthetic_root, tmp_path):
    from idcscope.data.manifest import index_datasets
    from idcscope.evaluation.evaluate import evaluate
    from idcscope.inference.predict import predict

    index = index_datasets(synthetic_root, read_sizes=False)
    scored = Predictor(model, "torch").score_files(index.table, index.root)
    want = by_name(index.table["path"], scored.margin)

    evaluate(model, synthetic_root, tmp_path / "ev", n_boot=0, engine="torch")
    ev = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    assert list(ev.columns) == [
        "path", "patient", "x", "y", "label", "neighbours", "prob_idc", "pred", "call", "input_check", "margin"
    ]  # fmt: skip
    assert_same(by_name(ev["path"], ev["margin"]), want)

    predict(model, [synthetic_root], tmp_path / "p.csv", engine="torch")
    table = pd.read_csv(tmp_path / "p.csv")
    assert list(table.columns)[-1] == "margin"
    assert_same(by_name(table["path"], table["margin"]), want)
    # the margin carries what P(IDC) to 6 decimals cannot: every digit
    assert (ev["margin"] != ev["margin"].round(6)).mean() > 0.9


def test_slide_tiles_carry_the_predictors_margin(model, data, tmp_path):
    from idcscope.spatial.heatmap import patient_mosaic
    from idcscope.spatial.slide import slide_inference
    from idcscope.spatial.wsi import read_slide, write_tiff_slide

    rows = data.rows(data.patients == sorted(set(data.patients))[0])
    t = data.table.iloc[rows]
    mosaic, _ = patient_mosaic(data.images[rows], t["x"], t["y"])
    slide = write_tiff_slide(mosaic, tmp_path / "s.tif", mpp=4.0)
    predictor = Predictor(model, "torch")
    summary = slide_inference(predictor, slide, tmp_path / "out")
    tiles = pd.read_csv(summary["files"]["tiles_csv"])
    assert list(tiles.columns)[-1] == "margin" and len(tiles) == summary["n_tiles"] > 0

    scan = read_slide(slide, None, 4.0, 50, 0.25)  # the tiles slide_inference scored
    where = (scan.cols * 50, scan.rows * 50)
    want = predictor.predict(scan.tiles, None, np.full(len(scan.tiles), "s"), where)
    np.testing.assert_array_equal(tiles[["row", "col"]].to_numpy().T, [scan.rows, scan.cols])
    np.testing.assert_allclose(tiles["margin"], want.margin, **F32)
    np.testing.assert_allclose(tiles["prob_idc"], want.prob, atol=5e-7)
