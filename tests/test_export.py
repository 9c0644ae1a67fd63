"""ONNX export: every registered model agrees with torch, describes itself and predicts alike."""

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from idcscope.cli import app
from idcscope.data.decode import decode_files
from idcscope.data.preprocess import Preprocessing, to_float
from idcscope.errors import IdcscopeError
from idcscope.inference.backends import OnnxBackend, TorchBackend, as_float
from idcscope.inference.calibration import probabilities
from idcscope.inference.export import export_onnx
from idcscope.inference.graphs import cached_onnx, model_cache_dir
from idcscope.inference.onnx import OnnxModel
from idcscope.inference.predict import predict
from idcscope.models import create_model, list_models
from idcscope.models.checkpoint import load_model, save_checkpoint, weights_sha256
from idcscope.models.schema import FORMAT

PREP = Preprocessing(mean=(0.80, 0.62, 0.76), std=(0.13, 0.17, 0.11), mpp=4.0)


@pytest.fixture(scope="module")
def patches(synthetic_root) -> np.ndarray:
    """Uint8 H&E-like model input (N, 3, 50, 50) from the synthetic patients."""
    files = sorted(str(p) for p in synthetic_root.rglob("*.png"))[:40]
    return PREP.model_input(decode_files(files, workers=1).images)


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
    return probabilities(TorchBackend(model, PREP).logits(images))


def test_onnx_agrees_with_torch(exported, patches):
    _, ckpt, path = exported
    onnx.checker.check_model(str(path), full_check=True)
    got = probabilities(OnnxModel(path).logits(as_float(patches)))
    np.testing.assert_allclose(got, torch_probabilities(ckpt, patches), atol=1e-4)


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch(exported, patches, batch):
    _, ckpt, path = exported
    logits = OnnxModel(path).logits(as_float(patches[:batch]))
    assert logits.shape == (batch, 2)
    assert logits.dtype == np.float32
    np.testing.assert_allclose(
        probabilities(logits), torch_probabilities(ckpt, patches[:batch]), atol=1e-4
    )


@pytest.mark.parametrize("tta", [False, True])
def test_both_backends_give_the_same_logits(exported, patches, tta):
    _, ckpt, path = exported
    model, _ = load_model(ckpt)
    expected = TorchBackend(model, PREP).logits(patches, tta)
    got = OnnxBackend(OnnxModel(path), batch_size=16).logits(patches, tta)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_metadata_round_trips(exported):
    name, _, path = exported
    meta = OnnxModel(path).metadata
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
    np.testing.assert_array_equal(as_float(patches), to_float(patches).numpy())


def test_fixed_batch_export_pads_ragged_batches(tmp_path, patches):
    ckpt = make_checkpoint(tmp_path / "c.pt", "cancernet", patches)
    runner = OnnxModel(export_onnx(ckpt, tmp_path / "b8.onnx", batch_size=8))
    assert runner.fixed_batch == 8
    got = probabilities(runner.logits(as_float(patches[:13])))
    np.testing.assert_allclose(got, torch_probabilities(ckpt, patches[:13]), atol=1e-4)


def test_old_opset_is_refused(tmp_path, patches):
    ckpt = make_checkpoint(tmp_path / "c.pt", "cancernet", patches)
    with pytest.raises(IdcscopeError, match="opset"):
        export_onnx(ckpt, opset=13)


@pytest.fixture(scope="module")
def cancernet_ckpt(tmp_path_factory, patches):
    return make_checkpoint(tmp_path_factory.mktemp("cn") / "best.pt", "cancernet", patches)


def test_the_graph_is_cached_in_the_users_cache(cancernet_ckpt, tmp_path):
    from idcscope.data.cache import default_cache_dir
    from idcscope.models.checkpoint import update_checkpoint

    graph = cached_onnx(cancernet_ckpt)
    assert graph.parent == model_cache_dir(cancernet_ckpt)
    assert graph.is_relative_to(default_cache_dir() / "onnx")
    assert not cancernet_ckpt.with_suffix(".onnx").exists()  # nothing beside the checkpoint
    stamp = graph.stat().st_mtime_ns
    assert cached_onnx(cancernet_ckpt) == graph and graph.stat().st_mtime_ns == stamp
    # A copy with another threshold computes the same graph: it is not exported again.
    copy = tmp_path / "copy.pt"
    copy.write_bytes(cancernet_ckpt.read_bytes())
    update_checkpoint(copy, threshold=0.6)
    assert cached_onnx(copy) == graph and graph.stat().st_mtime_ns == stamp
    assert OnnxModel(graph).metadata["weights_sha256"] == weights_sha256(copy)
    assert not copy.with_suffix(".onnx").exists()
    # Retrained weights are a new graph.
    model, ckpt = load_model(copy)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    fields = {k: v for k, v in ckpt.items() if k not in ("state_dict", "format")}
    save_checkpoint(copy, model, **fields)
    assert cached_onnx(copy).parent not in (graph.parent, tmp_path)


def test_auto_picks_an_engine_and_remembers_it(cancernet_ckpt):
    from idcscope.inference import Predictor

    predictor = Predictor(cancernet_ckpt)
    assert predictor.engine in ("torch", "onnx")
    (record,) = json.loads((model_cache_dir(cancernet_ckpt) / "engine.json").read_text()).values()
    assert record["engine"] == predictor.engine
    assert record[predictor.engine] == max(record["torch"], record["onnx"])
    assert not cancernet_ckpt.with_suffix(".engine.json").exists()


@pytest.fixture(scope="module")
def cancernet_onnx(cancernet_ckpt, tmp_path_factory):
    """The cancernet checkpoint exported once, to a file of its own."""
    return export_onnx(cancernet_ckpt, tmp_path_factory.mktemp("cn_onnx") / "m.onnx")


@pytest.mark.parametrize("tta", [False, True])
def test_predict_onnx_equals_torch(cancernet_ckpt, cancernet_onnx, synthetic_root, tta):
    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    ref = predict(cancernet_ckpt, [patient], engine="torch", tta=tta)
    onnx_file = cancernet_onnx
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
    from idcscope.data.stain import fit_reference
    from idcscope.models.checkpoint import update_checkpoint

    ckpt = tmp_path / "stain.pt"
    ckpt.write_bytes(cancernet_ckpt.read_bytes())
    reference = fit_reference(patches[:, ::-1].transpose(0, 2, 3, 1), "reinhard")  # blue for red
    prep = dataclasses.replace(PREP, stain="reinhard", stain_reference=reference)
    update_checkpoint(ckpt, preprocessing=dataclasses.asdict(prep))
    ref = predict(ckpt, [synthetic_root], engine="torch")
    df = predict(ckpt, [synthetic_root], engine="onnx")
    np.testing.assert_allclose(df["prob_idc"], ref["prob_idc"], atol=1e-4)
    rgb = patches.transpose(0, 2, 3, 1)
    moved = prep.model_input(rgb).astype(int) - patches
    assert np.abs(moved).mean() > 2  # the normalisation does move pixels


def test_unknown_engine_is_refused(cancernet_ckpt, synthetic_root):
    with pytest.raises(IdcscopeError, match="engine"):
        predict(cancernet_ckpt, [synthetic_root], engine="tensorrt")


def test_cli_export_and_predict(cancernet_ckpt, synthetic_root, tmp_path):
    runner = CliRunner()
    out = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", str(cancernet_ckpt), "--onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert OnnxModel(out).threshold == pytest.approx(0.37)
    assert runner.invoke(app, ["export", str(cancernet_ckpt)]).exit_code == 1  # no format
    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    csv = tmp_path / "preds.csv"
    result = runner.invoke(
        app, ["predict", str(patient), "--out", str(csv), "--engine", "onnx", "--model", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert csv.read_text().startswith("path,patient,x,y,neighbours,prob_idc,pred")
