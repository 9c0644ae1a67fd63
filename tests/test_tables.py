"""One prediction table (``inference.tables``): predict, evaluate, heatmap, slide and the
web page name, order and write the same things alike, and for the same patch they say the
same thing."""

from __future__ import annotations

import functools
import secrets
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from idcscope.inference import Predictor

F32 = {"rtol": float(np.finfo(np.float32).eps), "atol": 1e-12}  # float32 precision
# Every column any table has for the same thing, in the one order (``file``: the web page's
# ``path``, a file as the client named it).
ORDER = [
    "path", "file", "patient", "x", "y", "label", "neighbours", "prob_idc", "pred", "call", "input_check", "error", "margin"
]  # fmt: skip


@pytest.fixture(scope="module")
def model(trained_run) -> Path:
    return trained_run / "best.pt"


@pytest.fixture(scope="module")
def patient(synthetic_root) -> Path:
    return sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]


@pytest.fixture(scope="module")
def tables(model, patient, tmp_path_factory) -> dict[str, Path]:
    """The CSV each of the five writes for one patient, all scored by the torch engine."""
    from idcscope.evaluation.evaluate import evaluate
    from idcscope.inference.predict import predict
    from idcscope.spatial.heatmap import patient_heatmap
    from idcscope.spatial.slide import slide_inference

    out = tmp_path_factory.mktemp("tables")
    predictor = Predictor(model, "torch")
    predict(predictor, [patient], out / "predict.csv")
    evaluate(model, patient, out / "ev", n_boot=0, engine="torch")
    heatmap = patient_heatmap(predictor, patient, out / "hm")["files"]["predictions"]
    slide = slide_inference(predictor, _slide(patient, out / "s.tif"), out / "sl")
    return {
        "predict": out / "predict.csv",
        "evaluate": out / "ev" / "predictions.csv",
        "heatmap": Path(heatmap),
        "slide": Path(slide["files"]["tiles_csv"]),
        "web": _web_table(model, patient, out / "web"),
    }


def _slide(patient: Path, path: Path) -> Path:
    """The patient's patches pasted at their places, as a pyramidal TIFF at 4 µm/px."""
    from idcscope.data.manifest import index_dataset
    from idcscope.spatial.heatmap import patient_mosaic
    from idcscope.spatial.wsi import write_tiff_slide

    ix = index_dataset(patient)
    images = [np.asarray(Image.open(ix.root / p).convert("RGB")) for p in ix.table["path"]]
    mosaic, _ = patient_mosaic(images, ix.table["x"], ix.table["y"])
    return write_tiff_slide(mosaic, path, mpp=4.0)


def _web_table(model: Path, patient: Path, folder: Path) -> Path:
    """The web page's CSV of the patient's patches uploaded by name."""
    from idcscope.serve import analysis
    from idcscope.serve.jobs import Job
    from idcscope.serve.uploads import Upload

    folder.mkdir()
    with pytest.MonkeyPatch.context() as mp:  # the engine the other tables were scored by
        mp.setattr(analysis, "Predictor", functools.partial(Predictor, engine="torch"))
        analyst = analysis.Analyst(model)
    uploads = [Upload(p.name, p, p.stat().st_size) for p in sorted(patient.rglob("*.png"))]
    job = Job(secrets.token_urlsafe(8), "patches", folder)
    analyst.patches(job, uploads, max_pixels=10**9)
    return folder / "predictions.csv"


def test_every_table_has_the_columns_in_one_order(tables):
    from idcscope.inference.tables import PATCH_IDS, prediction_columns

    columns = {name: list(pd.read_csv(path, nrows=0).columns) for name, path in tables.items()}
    assert columns == {
        "predict": prediction_columns(PATCH_IDS, error=True),
        "evaluate": prediction_columns(PATCH_IDS, label=True),
        "heatmap": prediction_columns(PATCH_IDS, label=True),
        "slide": prediction_columns(["row", "col", "x", "y", "size", "tissue"]),
        "web": prediction_columns(["file", "patient", "x", "y"], label=True, error=True),
    }
    for name, have in columns.items():
        shared = [c for c in have if c in ORDER]
        assert shared == sorted(shared, key=ORDER.index), name


def test_every_table_writes_its_numbers_alike(tables):
    for name, path in tables.items():
        text = pd.read_csv(path, dtype=str, keep_default_na=False)
        assert set(text["pred"]) <= {"0", "1", ""}, name  # an integer call, never 0.0
        prob = text["prob_idc"][text["prob_idc"] != ""]
        assert (prob.str.split(".").str[-1].str.len() <= 6).all(), name
        assert (prob.astype(float).round(6) == prob.astype(float)).all(), name
        margin = text["margin"][text["margin"] != ""].astype(float)
        # in full: more digits than P(IDC) keeps, for calibration to be fitted on
        assert (margin != margin.round(6)).mean() > 0.9, name


def test_the_tables_of_a_patch_agree(tables):
    """The same file, read from its name and scored with its patient, gets the same row
    from predict, evaluate, heatmap and the web page."""
    read = {
        name: pd.read_csv(tables[name], dtype={"patient": str})
        for name in ("predict", "evaluate", "heatmap", "web")
    }
    for table in read.values():
        table.index = [Path(p).name for p in table.get("path", table.get("file"))]
    want = read["predict"].sort_index()
    assert (want["error"].isna()).all() and len(want) > 0
    for name in ("evaluate", "heatmap", "web"):
        got = read[name].reindex(want.index)
        same = ["patient", "x", "y", "neighbours", "pred"]
        assert (got[same] == want[same]).all(axis=None), name
        np.testing.assert_allclose(got["prob_idc"], want["prob_idc"], atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got["margin"], want["margin"], **F32, err_msg=name)
    labels = [read[n].reindex(want.index)["label"] for n in ("evaluate", "heatmap", "web")]
    assert (labels[0] == labels[1]).all() and (labels[0] == labels[2]).all()


def test_neighbours_say_the_context_each_patch_was_scored_in(model, patient, tables, tmp_path):
    """Within its patient a patch has its neighbours; uploaded alone it has a place but
    none; scored without context it has no context at all (empty)."""
    from idcscope.data.grid import neighbour_counts
    from idcscope.inference.predict import predict

    whole = pd.read_csv(tables["predict"], dtype={"patient": str})
    expected = neighbour_counts(whole["patient"].to_numpy(), whole["x"], whole["y"])
    np.testing.assert_array_equal(whole["neighbours"].to_numpy(float), expected)
    assert whole["neighbours"].max() == 8
    one = sorted(patient.rglob("*.png"))[0]
    alone = predict(Predictor(model, "torch"), [one], tmp_path / "one.csv")
    assert alone["neighbours"].tolist() == [0]
    off = predict(Predictor(model, "torch", context=False), [patient], tmp_path / "off.csv")
    assert off["neighbours"].isna().all()
