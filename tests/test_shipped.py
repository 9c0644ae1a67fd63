"""The model that ships with idcscope: present, the one its card describes, and used when
no --model is given."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from typer.testing import CliRunner

from idcscope.cli import app
from idcscope.models import bundle
from idcscope.models.checkpoint import read_checkpoint

DEMO_PATIENT = "9124"  # never seen in training: the demo's patient


@pytest.fixture(scope="module")
def shipped():
    models = bundle.bundled_models()
    assert bundle.DEFAULT_MODEL in models, f"no bundled model in {models}"
    return models[bundle.DEFAULT_MODEL]


def test_the_shipped_weights_are_the_ones_its_card_describes(shipped):
    card = (shipped / "README.md").read_text()
    config = json.loads((shipped / "config.json").read_text())
    stated = re.search(r"sha256 `([0-9a-f]{64})`", card)
    assert stated, "the card states the sha256 of model.safetensors"
    assert stated[1] == config["weights_sha256"] == bundle.sha256_of(shipped / "model.safetensors")
    assert config["files"] == {
        name: bundle.sha256_of(shipped / name) for name in ("model.safetensors", "README.md")
    }
    ckpt = read_checkpoint(shipped)  # checks the sha256 again, and that it loads
    assert ckpt["model"]["name"] in card
    splits = ckpt["splits"]
    assert DEMO_PATIENT in splits["test"]
    assert DEMO_PATIENT not in splits["train"] + splits["val"]
    assert len(splits["train"]) + len(splits["val"]) == 135  # every other real patient


def test_commands_score_with_the_shipped_model_by_default(shipped, real_sample, tmp_path):
    files = sorted((real_sample / DEMO_PATIENT).rglob("*.png"))[:40]
    installed = {p.name: p.read_bytes() for p in shipped.iterdir()}
    out = tmp_path / "p.csv"
    res = CliRunner().invoke(app, ["predict", *map(str, files), "--out", str(out)])
    assert res.exit_code == 0, res.output
    with_name = tmp_path / "q.csv"
    res = CliRunner().invoke(
        app, ["predict", *map(str, files), "--out", str(with_name), "--model", "idc-default"]
    )
    assert res.exit_code == 0, res.output
    assert out.read_text() == with_name.read_text()
    assert len(out.read_text().splitlines()) == len(files) + 1
    # Scoring writes nothing into the installed package: its graph is in the user's cache.
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == installed


def test_the_demo_patient_is_the_real_one_the_model_never_saw(tmp_path, real_sample):
    from idcscope.data import demo_patients
    from idcscope.data.manifest import index_dataset

    table = index_dataset(demo_patients(tmp_path / "demo")).table
    assert set(table["patient"]) == {DEMO_PATIENT} and len(table) == 465
    real = sorted(p.name for p in (real_sample / DEMO_PATIENT).rglob("*.png"))
    assert sorted(table["path"].str.rsplit("/", n=1).str[-1]) == real


def test_models_lists_the_shipped_model_with_its_card(shipped):
    res = CliRunner().invoke(app, ["models"])
    assert res.exit_code == 0, res.output
    assert bundle.DEFAULT_MODEL in res.output
    assert "AUC" in res.output  # the card's summary: its numbers on unseen patients


@pytest.mark.slow
def test_the_built_wheel_carries_the_weights(shipped, tmp_path):
    """A plain (not editable) install gets the model: the wheel holds the whole folder."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    repo = Path(__file__).parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    shutil.copytree(repo / "idcscope", src / "idcscope", ignore=shutil.ignore_patterns(
        "__pycache__", "*.onnx", "*.engine.json"
    ))  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(src)],
        check=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("idcscope-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    inside = f"idcscope/models/weights/{bundle.DEFAULT_MODEL}/"
    for name in ("config.json", "model.safetensors", "README.md"):
        assert inside + name in names, name
    assert "idcscope/data/demo/9124.zip" in names  # the demo's real patient


def _as_sent(table, how: str, seed: int = 0):
    """A patient's patches as a user sends them: ``whole``, as ``uploads`` of 8 patches
    (each upload its own group: the patches have places, few of their neighbours), or
    each patch ``alone`` (no place)."""
    if how == "whole":
        return table
    if how == "alone":
        return table.assign(x=-1, y=-1)
    upload = np.random.default_rng(seed).permutation(len(table)) // 8
    return table.assign(patient=[f"upload{u}" for u in upload])


@pytest.mark.parametrize("patient", ["8913", DEMO_PATIENT])
def test_the_same_patch_is_called_as_its_context_allows(shipped, real_sample, patient):
    """Each real patch of a patient (8913, 9% IDC; 9124, 62%, never seen) scored whole, in
    uploads of 8 and alone is calibrated and called for that context. With one calibration
    for every patch with a place, the uploads of 8 called 476 of 8913's 873 benign patches
    IDC (and 52 of 9124's 175); now a few, the rest of what the patch alone cannot tell
    is uncertain."""
    from idcscope.data.manifest import index_datasets
    from idcscope.inference import Predictor

    index = index_datasets(real_sample, read_sizes=False)
    table = index.table[index.table["patient"] == patient].reset_index(drop=True)
    y = table["label"].to_numpy()
    predictor = Predictor(shipped)
    scored = {
        how: predictor.score_files(_as_sent(table, how), index.root)
        for how in ("whole", "uploads", "alone")
    }
    assert np.nanmedian(scored["whole"].neighbours) >= 7
    assert np.nanmax(scored["uploads"].neighbours) <= 3
    assert np.isnan(scored["alone"].neighbours).all()
    decided = {how: (s.call >= 0).mean() for how, s in scored.items()}
    assert decided["whole"] > 1.5 * max(decided["uploads"], decided["alone"])
    for how in ("uploads", "alone"):  # the contexts the old calibration got most wrong
        call = scored[how].call
        wrong = ((call == 1) & (y == 0)) | ((call == 0) & (y == 1))
        assert wrong.mean() <= 0.03, (how, wrong.sum())
    # the same patch's P(IDC) differs with its context: each is calibrated for its own
    assert not np.allclose(scored["whole"].prob, scored["alone"].prob, atol=0.05)
