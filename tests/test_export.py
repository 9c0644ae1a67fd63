"""ONNX export: every registered model agrees with torch, describes itself and predicts alike."""

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from idcscope.checkpoint import load_model, save_checkpoint
from idcscope.cli import app
from idcscope.data.cache import decode_files
from idcscope.engine import Preprocessing, predict_logits, probabilities, to_float
from idcscope.errors import IdcscopeError
from idcscope.export import FORMAT, OnnxPredictor, export_onnx, to_float_nchw
from idcscope.models import create_model, list_models
from idcscope.predict import predict

PREP = Preprocessing(mean=(0.80, 0.62, 0.76), std=(0.13, 0.17, 0.11), mpp=4.0)


@pytest.fixture(scope="module")
def patches(synthetic_root) -> np.ndarray:
    """Uint8 H&E-like patches (N, 50, 50, 3) from the synthetic patients."""
    files = sorted(str(p) for p in synthetic_root.rglob("*.png"))[:40]
    return decode_files(files, workers=1).images


def make_checkpoint(path, name: str, patches: np.ndarray):
    """A random-init model whose BatchNorm statistics come from real-looking patches."""
    torch.manual_seed(0)
    model = create_model(name)
    model.train()  # a few forward passes set running statistics away from (0, 1)
    with torch.no_grad():
        for _ in range(3):
            model(PREP(to_float(patches)))
    save_checkpoint(
        path,
        model.eval(),
        model={"name": name, "kwargs": {}},
        class_names=["no_idc", "idc"],
        preprocessing=dataclasses.asdict(PREP),
        threshold=0.37,
        epoch=3,
    )
    return path


@pytest.fixture(scope="module", params=list_models())
def exported(request, tmp_path_factory, patches):
    """(model name, checkpoint, onnx file) for each registered model, exported once."""
    ckpt = make_checkpoint(
        tmp_path_factory.mktemp(request.param) / "best.pt", request.param, patches
    )
    return request.param, ckpt, export_onnx(ckpt)


def torch_probabilities(ckpt, images: np.ndarray) -> np.ndarray:
    model, _ = load_model(ckpt)
    return probabilities(predict_logits(model, images, None, PREP, precision="fp32"))


def test_onnx_agrees_with_torch(exported, patches):
    _, ckpt, path = exported
    onnx.checker.check_model(str(path), full_check=True)
    runner = OnnxPredictor(path)
    got = probabilities(runner.logits(to_float(patches)))
    np.testing.assert_allclose(got, torch_probabilities(ckpt, patches), atol=1e-4)


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch(exported, patches, batch):
    _, ckpt, path = exported
    logits = OnnxPredictor(path).logits(to_float(patches[:batch]))
    assert logits.shape == (batch, 2)
    assert logits.dtype == torch.float32
    np.testing.assert_allclose(
        probabilities(logits), torch_probabilities(ckpt, patches[:batch]), atol=1e-4
    )


def test_metadata_round_trips(exported):
    name, _, path = exported
    meta = OnnxPredictor(path).metadata
    assert meta["format"] == FORMAT
    assert meta["class_names"] == ["no_idc", "idc"]
    assert meta["threshold"] == pytest.approx(0.37)
    assert meta["preprocessing"] == json.loads(json.dumps(dataclasses.asdict(PREP)))
    assert meta["model"] == {"name": name, "kwargs": {}}
    assert meta["epoch"] == 3
    graph = onnx.load(path).graph
    assert [i.name for i in graph.input] == ["patches"]
    assert graph.output[0].name == "logits"


def test_numpy_conversion_matches_to_float(patches):
    np.testing.assert_array_equal(to_float_nchw(patches), to_float(patches).numpy())


def test_fixed_batch_export_pads_ragged_batches(tmp_path, patches):
    ckpt = make_checkpoint(tmp_path / "c.pt", "cancernet", patches)
    runner = OnnxPredictor(export_onnx(ckpt, tmp_path / "b8.onnx", batch_size=8))
    assert runner.fixed_batch == 8
    got = probabilities(runner.logits(to_float(patches[:13])))
    np.testing.assert_allclose(got, torch_probabilities(ckpt, patches[:13]), atol=1e-4)


def test_old_opset_is_refused(tmp_path, patches):
    ckpt = make_checkpoint(tmp_path / "c.pt", "cancernet", patches)
    with pytest.raises(IdcscopeError, match="opset"):
        export_onnx(ckpt, opset=13)


@pytest.fixture(scope="module")
def cancernet_ckpt(tmp_path_factory, patches):
    return make_checkpoint(tmp_path_factory.mktemp("cn") / "best.pt", "cancernet", patches)


@pytest.mark.parametrize("tta", [False, True])
def test_predict_onnx_equals_torch(cancernet_ckpt, synthetic_root, tmp_path, tta):
    # fp32 on both sides: the torch default, bf16 autocast, differs from fp32 by ~1e-2.
    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    ref = predict(cancernet_ckpt, [patient], precision="fp32", tta=tta)
    onnx_file = export_onnx(cancernet_ckpt, tmp_path / "m.onnx")
    for source in (cancernet_ckpt, onnx_file):  # a .pt is exported on the fly
        df = predict(source, [patient], engine="onnx", tta=tta)
        assert list(df.columns) == list(ref.columns)
        assert (df["path"] == ref["path"]).all()
        np.testing.assert_allclose(df["prob_idc"], ref["prob_idc"], atol=1e-4)
        tie = (ref["prob_idc"] - 0.37).abs() < 1e-4  # only these may fall either side
        assert (df["pred"] == ref["pred"])[~tie].all()


def test_predict_onnx_normalises_stains_per_patient_like_torch(
    cancernet_ckpt, synthetic_root, patches, tmp_path
):
    """A stain-normalising checkpoint: ONNX Runtime gets the same normalised patches."""
    from idcscope.checkpoint import update_checkpoint
    from idcscope.stain import fit_reference

    ckpt = tmp_path / "stain.pt"
    ckpt.write_bytes(cancernet_ckpt.read_bytes())
    reference = fit_reference(patches[..., ::-1], "reinhard")  # far off: blue for red
    prep = dataclasses.replace(PREP, stain="reinhard", stain_reference=reference)
    update_checkpoint(ckpt, preprocessing=dataclasses.asdict(prep))
    ref = predict(ckpt, [synthetic_root], precision="fp32")
    df = predict(ckpt, [synthetic_root], engine="onnx")
    np.testing.assert_allclose(df["prob_idc"], ref["prob_idc"], atol=1e-4)
    moved = prep.normalize_stain(patches, np.zeros(len(patches))).astype(int) - patches
    assert np.abs(moved).mean() > 2  # the normalisation does move pixels


def test_unknown_engine_is_refused(cancernet_ckpt, synthetic_root):
    with pytest.raises(IdcscopeError, match="engine"):
        predict(cancernet_ckpt, [synthetic_root], engine="tensorrt")


def test_cli_export_and_predict(cancernet_ckpt, synthetic_root, tmp_path):
    runner = CliRunner()
    out = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", str(cancernet_ckpt), "--onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert OnnxPredictor(out).threshold == pytest.approx(0.37)
    assert runner.invoke(app, ["export", str(cancernet_ckpt)]).exit_code == 1  # no format
    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    csv = tmp_path / "preds.csv"
    result = runner.invoke(
        app, ["predict", str(out), str(patient), "--out", str(csv), "--engine", "onnx"]
    )
    assert result.exit_code == 0, result.output
    assert csv.read_text().startswith("path,patient,x,y,prob_idc,pred")
