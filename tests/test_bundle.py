"""Model folders in the Hugging Face layout: written from a run, read back exactly, checked."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from idcscope.errors import CheckpointError
from idcscope.inference import Predictor
from idcscope.inference.export import save_bundle
from idcscope.inference.predict import predict
from idcscope.models import bundle
from idcscope.models.checkpoint import load_model, read_checkpoint
from idcscope.models.schema import FORMAT


@pytest.fixture(scope="module")
def model_dir(trained_run, tmp_path_factory):
    return save_bundle(
        trained_run / "best.pt", tmp_path_factory.mktemp("bundle") / "idc-test", "# card\n"
    )


def test_a_bundle_is_config_weights_and_card(model_dir, trained_run):
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    config = json.loads((model_dir / "config.json").read_text())
    ckpt = read_checkpoint(trained_run / "best.pt")
    assert config["format"] == FORMAT
    assert config["weights_sha256"] == bundle.sha256_of(model_dir / "model.safetensors")
    assert config["files"] == {
        name: bundle.sha256_of(model_dir / name) for name in ("model.safetensors", "README.md")
    }
    for key in ("model", "class_names", "preprocessing", "threshold", "temperature", "context"):
        assert json.loads(json.dumps(ckpt[key], default=float)) == config[key], key
    assert not {"optimizer", "generator", "history", "validation"} & set(config)
    assert not {"out", "cache_dir"} & set(config["config"])  # local paths: not the model's
    assert (model_dir / "README.md").read_text() == "# card\n"


def test_the_bundle_scores_as_its_checkpoint(model_dir, trained_run, synthetic_root):
    model, _ = load_model(model_dir)
    reference, _ = load_model(trained_run / "best.pt")
    for (name, a), (_, b) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert a.equal(b), name
    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    for engine in ("torch", "onnx"):
        got = predict(Predictor(model_dir, engine), [patient])
        ref = predict(Predictor(trained_run / "best.pt", engine), [patient])
        # The same weights (above); two graphs exported apart may round differently.
        np.testing.assert_allclose(got["prob_idc"], ref["prob_idc"], rtol=0, atol=1e-6)
    # Its graph is kept in the user's cache, not in the folder.
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(bundle.FILES)


def test_changed_weights_are_refused(model_dir, tmp_path):
    copy = shutil.copytree(model_dir, tmp_path / "changed")
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"sha256.*changed or damaged"):
        read_checkpoint(copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        read_checkpoint(copy)
    (copy / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not a readable model config"):
        read_checkpoint(copy)


def test_model_names_files_folders_and_the_hub(model_dir, trained_run, monkeypatch, tmp_path):
    assert bundle.resolve_model(str(model_dir)) == model_dir
    assert bundle.resolve_model(trained_run / "best.pt") == trained_run / "best.pt"
    with pytest.raises(CheckpointError, match="no bundled model of that name"):
        bundle.resolve_model("no-such-model")
    monkeypatch.setattr(bundle, "bundled_models", lambda: {"idc-test": model_dir})
    assert bundle.resolve_model("idc-test") == model_dir

    import huggingface_hub

    asked = {}

    def fake_download(repo, allow_patterns):
        asked.update(repo=repo, patterns=allow_patterns)
        return str(model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert bundle.resolve_model("hf://someone/idc-model") == model_dir
    assert asked == {"repo": "someone/idc-model", "patterns": list(bundle.FILES)}
    with pytest.raises(CheckpointError, match="hf://owner/name"):
        bundle.resolve_model("hf://just-a-name")


def test_the_hub_offline_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read when huggingface_hub is imported...
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # ...as here
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match=r"hf://someone/idc-model: cannot fetch.*OFFLINE"):
        bundle.resolve_model("hf://someone/idc-model")


def test_cli_exports_a_bundle_that_predict_takes(trained_run, synthetic_root, tmp_path, caplog):
    from typer.testing import CliRunner

    from idcscope.cli import app

    ckpt, folder = str(trained_run / "best.pt"), tmp_path / "m"
    card = tmp_path / "card.md"
    card.write_text("# a card\n")
    run = CliRunner().invoke
    res = run(app, ["export", ckpt, "--bundle", "--card", str(card), "--out", str(folder)])
    assert res.exit_code == 0, res.output
    assert (folder / "README.md").read_text() == "# a card\n"
    patient = str(sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0])
    for model, csv in ((str(folder), tmp_path / "a.csv"), (ckpt, tmp_path / "b.csv")):
        res = run(app, ["predict", patient, "--out", str(csv), "--model", model])
        assert res.exit_code == 0, res.output
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    res = run(app, ["export", ckpt, "--bundle"])
    assert res.exit_code == 1 and "--out FOLDER" in caplog.text
    res = run(app, ["export", ckpt])
    assert res.exit_code == 1 and "--onnx or --bundle" in caplog.text
