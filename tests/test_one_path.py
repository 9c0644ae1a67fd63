"""One path: a real patient scored through every entry point gets the same P(IDC) per patch.

predict (torch and ONNX Runtime), evaluate, explain, heatmap and the web page (a patient's
zip and single patches) all score through the one Predictor, so a patch's P(IDC) may
differ between them only by float rounding: at most 1e-4, with its patient's places, and
for lone uploads that carry none. The model is the default recipe trained on the real
sample (stain augmentation, the 3x3 neighbourhood as input, spatial context),
the patient a real one from the sample.
"""

from __future__ import annotations

import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from idcscope.evaluation.evaluate import evaluate
from idcscope.inference.explain import explain_patches
from idcscope.inference.predict import predict
from idcscope.serve import Settings, create_app
from idcscope.spatial.heatmap import patient_heatmap

ATOL = 1e-4
PATIENT = "9124"  # the smallest whole patient of the sample: 465 patches, mostly IDC


pytestmark = pytest.mark.slow  # the model is trained on the real sample (shared with
# the learning test)


@pytest.fixture(scope="module")
def model(real_run) -> Path:
    return real_run / "best.pt"


@pytest.fixture(scope="module")
def patient(real_sample, tmp_path_factory) -> Path:
    """The real patient alone in a dataset folder of its own."""
    root = tmp_path_factory.mktemp("one_patient")
    shutil.copytree(real_sample / PATIENT, root / PATIENT)
    return root / PATIENT


@pytest.fixture(scope="module")
def lone(patient, tmp_path_factory) -> Path:
    """Sixty of its patches under names that carry no patient and no place."""
    folder = tmp_path_factory.mktemp("lone")
    for i, f in enumerate(sorted(patient.rglob("*.png"))[::7][:60]):
        shutil.copy(f, folder / f"upload_{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def client(model, tmp_path_factory):
    settings = Settings(max_patch_files=1000, temp_dir=str(tmp_path_factory.mktemp("serve")))
    with TestClient(create_app(model, settings)) as c:
        yield c


def by_name(paths, probs) -> dict[str, float]:
    return {Path(p).name: float(v) for p, v in zip(paths, probs, strict=True)}


def assert_same(got: dict[str, float], reference: dict[str, float]) -> None:
    assert sorted(got) == sorted(reference)
    names = sorted(reference)
    diff = np.abs(np.array([got[n] for n in names]) - np.array([reference[n] for n in names]))
    assert diff.max() <= ATOL, f"max |dP| {diff.max():.2e} at {names[int(diff.argmax())]}"


def web_patches(client, folder: Path) -> dict[str, float]:
    files = [
        ("files", (f.name, f.read_bytes(), "image/png")) for f in sorted(folder.rglob("*.png"))
    ]
    r = client.post("/api/patches", files=files)
    assert r.status_code == 200, r.text
    rows = r.json()["rows"]
    assert all(row["error"] == "" for row in rows)
    return {row["file"]: row["prob_idc"] for row in rows}


def test_a_real_patient_scores_alike_everywhere(model, patient, client, tmp_path):
    ref = predict(model, [patient], engine="torch")
    reference = by_name(ref["path"], ref["prob_idc"])
    assert len(reference) == 465 and ref["error"].eq("").all()
    # The places matter for this model: scored alone, the patches score differently.
    alone = predict(model, [patient], engine="torch", context=False)
    assert np.abs(alone["prob_idc"] - ref["prob_idc"]).max() > 100 * ATOL

    onnx = predict(model, [patient], engine="onnx")
    assert_same(by_name(onnx["path"], onnx["prob_idc"]), reference)

    evaluate(model, patient.parent, tmp_path / "ev", n_boot=0)
    ev = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    assert_same(by_name(ev["path"], ev["prob_idc"]), reference)

    hm = patient_heatmap(model, patient, tmp_path / "hm")
    hm = pd.read_csv(hm["files"]["predictions"])
    assert_same(by_name(hm["path"], hm["prob_idc"]), reference)

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in patient.rglob("*.png"):
            zf.writestr(f.relative_to(patient.parent).as_posix(), f.read_bytes())
    r = client.post("/api/patient", files=[("files", ("p.zip", buf.getvalue(), "application/zip"))])
    assert r.status_code == 200, r.text
    table = pd.read_csv(io.StringIO(client.get(r.json()["files"]["csv"]).text))
    assert_same(by_name(table["path"], table["prob_idc"]), reference)

    assert_same(web_patches(client, patient), reference)


def test_explain_shows_the_probability_predict_gives(model, patient, client, tmp_path):
    """On part of the patient (explain draws a panel per patch): those patches see each
    other's stain and places, here as in predict and the web page."""
    part = tmp_path / "part"
    part.mkdir()
    for f in sorted(patient.rglob("*.png"))[100:140]:
        shutil.copy(f, part / f.name)
    ref = predict(model, [part], engine="torch")
    reference = by_name(ref["path"], ref["prob_idc"])
    shown = explain_patches(model, [part], tmp_path / "ex", upscale=1)
    assert_same(by_name([r["path"] for r in shown], [r["prob_idc"] for r in shown]), reference)
    assert_same(web_patches(client, part), reference)


def test_lone_uploads_without_places_score_alike_everywhere(model, lone, client, tmp_path):
    ref = predict(model, [lone], engine="torch")
    reference = by_name(ref["path"], ref["prob_idc"])
    assert len(reference) == 60 and (ref["x"] == -1).all()
    assert ref["patient"].nunique() == 60  # no name tells a patient: each is its own
    onnx = predict(model, [lone], engine="onnx")
    assert_same(by_name(onnx["path"], onnx["prob_idc"]), reference)
    shown = explain_patches(model, [lone], tmp_path / "ex", upscale=1)
    assert_same(by_name([r["path"] for r in shown], [r["prob_idc"] for r in shown]), reference)
    assert_same(web_patches(client, lone), reference)
