"""Every file a model is made of is verified; what is derived from it lives in the user's cache.

A model folder's ``config.json`` lists the sha256 of its other files; an ONNX graph derived
from a model is kept in the user's cache with the sha256 of its bytes, checked at every
load; scoring writes nothing beside the model; a model is read and hashed once a process;
a file that is not a model gets an error that says what it is and what was expected.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from idcscope.data.cache import default_cache_dir, private_dir
from idcscope.errors import CheckpointError
from idcscope.inference import Predictor
from idcscope.inference.export import export_onnx, save_bundle
from idcscope.inference.graphs import cached_onnx, model_cache_dir, open_graph
from idcscope.inference.onnx import OnnxModel
from idcscope.inference.predict import predict
from idcscope.models import bundle, checkpoint, schema
from idcscope.models.checkpoint import load_model, read_checkpoint, update_checkpoint

SHIFT = 6.0  # the final bias moved by (-6, +6): benign patches scored as IDC


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own: a tampered graph never reaches another test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("IDCSCOPE_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def model_dir(trained_run, tmp_path_factory) -> Path:
    return save_bundle(trained_run / "best.pt", tmp_path_factory.mktemp("b") / "m", "# m\n")


@pytest.fixture(scope="module")
def patient(synthetic_root) -> Path:
    return sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]


def tampered(graph: Path, out: Path) -> Path:
    """``graph`` with its final bias shifted, its metadata (and so its claims) kept."""
    proto = onnx.load(graph)
    (bias,) = [
        t
        for t in proto.graph.initializer
        if list(t.dims) == [2] and t.data_type == onnx.TensorProto.FLOAT
    ]
    value = numpy_helper.to_array(bias) + np.array([-SHIFT, SHIFT], np.float32)
    bias.CopyFrom(numpy_helper.from_array(value, bias.name))
    onnx.save(proto, out)
    return out


def snapshot(folder: Path) -> dict:
    """Every path under ``folder`` with its bytes (None for a folder)."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None
        for p in sorted(folder.rglob("*"))
    }


# ----------------------------------------------------------------------------- tampered graphs


def test_a_tampered_cached_graph_is_exported_again_never_run(
    trained_run, patient, cache, tmp_path, caplog
):
    ckpt = shutil.copy(trained_run / "best.pt", tmp_path / "best.pt")
    ref = predict(ckpt, [patient], engine="torch")
    graph = cached_onnx(ckpt)
    evil = tampered(graph, tmp_path / "evil.onnx")
    # The control: the tampered graph, run as a user's own .onnx, does call other patches.
    shifted = predict(evil, [patient], engine="onnx")
    assert np.abs(shifted["prob_idc"] - ref["prob_idc"]).max() > 0.5
    graph.write_bytes(evil.read_bytes())  # the graph in the cache, changed behind its back
    with caplog.at_level(logging.WARNING, logger="idcscope.inference.graphs"):
        got = predict(ckpt, [patient], engine="onnx")
    np.testing.assert_allclose(got["prob_idc"], ref["prob_idc"], rtol=0, atol=1e-4)
    assert "exported again from the verified weights" in caplog.text
    again = cached_onnx(ckpt)
    assert again.read_bytes() != evil.read_bytes()


def test_a_graph_the_manifest_does_not_list_is_never_loaded(model_dir, patient, cache, tmp_path):
    folder = shutil.copytree(model_dir, tmp_path / "m")
    tampered(export_onnx(folder, tmp_path / "plain.onnx"), folder / "model.onnx")
    ref = predict(folder, [patient], engine="torch")
    for engine in ("onnx", "auto"):
        got = predict(folder, [patient], engine=engine)
        np.testing.assert_allclose(got["prob_idc"], ref["prob_idc"], rtol=0, atol=1e-4)
    assert open_graph(folder).path.parent == model_cache_dir(folder)


def test_every_file_of_a_model_folder_is_listed_and_checked(model_dir, tmp_path):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["files"] == {
        f: bundle.sha256_of(model_dir / f) for f in ("model.safetensors", "README.md")
    }
    assert config["weights_sha256"] == config["files"]["model.safetensors"]
    folder = shutil.copytree(model_dir, tmp_path / "card")
    (folder / "README.md").write_text("# a card that claims other numbers\n")
    with pytest.raises(CheckpointError, match=r"card[/\\]README\.md: sha256 .* changed"):
        read_checkpoint(folder)
    folder = shutil.copytree(model_dir, tmp_path / "outside")
    config["files"]["../best.pt"] = config["weights_sha256"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: lists '\.\./best\.pt', not a file"):
        read_checkpoint(folder)


def test_a_folder_written_before_the_list_still_loads(model_dir, tmp_path):
    folder = shutil.copytree(model_dir, tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    del config["files"]  # only weights_sha256, as bundles were written before
    (folder / "config.json").write_text(json.dumps(config))
    assert read_checkpoint(folder)["threshold"] == config["threshold"]
    (folder / "model.safetensors").write_bytes(b"\0" + (folder / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 .* changed"):
        read_checkpoint(folder)


# ----------------------------------------------------------------------------- nothing beside


def test_scoring_leaves_the_model_and_its_folder_untouched(
    model_dir, trained_run, patient, cache, tmp_path
):
    folder = shutil.copytree(model_dir, tmp_path / "folder" / "m")
    run = tmp_path / "run"
    run.mkdir()
    ckpt = shutil.copy(trained_run / "best.pt", run / "best.pt")
    before = {p: snapshot(p.parent) for p in (folder, ckpt)}
    for model in (folder, ckpt):
        for engine in ("auto", "onnx"):
            predict(model, [patient], engine=engine)
        after = snapshot(model.parent)
        assert after == before[model], sorted(after.keys() - before[model].keys())
        # What scoring derived is in the user's cache instead.
        derived = model_cache_dir(model)
        assert derived.is_relative_to(cache)
        assert {p.suffix for p in derived.iterdir()} == {".onnx", ".json"}
        assert (derived / "engine.json").is_file()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX modes")
def test_the_cache_is_the_users_alone(monkeypatch, tmp_path):
    monkeypatch.delenv("IDCSCOPE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert default_cache_dir() == tmp_path / "xdg" / "idcscope"
    monkeypatch.setenv("IDCSCOPE_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    deep = private_dir(tmp_path / "mine" / "onnx" / "abc")
    for f in (deep, deep.parent, deep.parent.parent):
        assert f.stat().st_mode & 0o777 == 0o700, f


# ----------------------------------------------------------------------------- read once


def test_a_model_is_read_and_hashed_once_a_process(
    model_dir, trained_run, cache, tmp_path, monkeypatch
):
    folder = shutil.copytree(model_dir, tmp_path / "m")
    ckpt = shutil.copy(trained_run / "best.pt", tmp_path / "best.pt")
    reads, hashes = [], []
    verified = bundle.verified_files
    digest = checkpoint.tensors_sha256
    monkeypatch.setattr(bundle, "verified_files", lambda p: reads.append(p) or verified(p))
    monkeypatch.setattr(checkpoint, "tensors_sha256", lambda s: hashes.append(1) or digest(s))
    for model in (folder, ckpt):
        read_checkpoint(model)
        load_model(model)
        cached_onnx(model)
        open_graph(model, threads=1)
        Predictor(model, "auto")
        Predictor(model, "onnx")
    assert len(reads) == 1  # the folder: its files hashed once
    assert len(hashes) == 1  # the .pt: its tensors hashed once
    # A file changed since is read again: what is remembered is that version of it.
    update_checkpoint(ckpt, threshold=0.123)
    assert read_checkpoint(ckpt)["threshold"] == 0.123
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="changed or damaged"):
        read_checkpoint(folder)


def test_a_callers_changes_do_not_reach_the_next_caller(trained_run):
    first = read_checkpoint(trained_run / "best.pt")
    first["preprocessing"]["mean"] = [0, 0, 0]
    first.pop("state_dict")
    second = read_checkpoint(trained_run / "best.pt")
    assert second["preprocessing"]["mean"] != [0, 0, 0] and "state_dict" in second


# ----------------------------------------------------------------------------- clear errors

EXPECTED = "a .pt checkpoint, an .onnx graph or a model folder with config.json"


def test_a_text_file_is_named_for_what_it_is(tmp_path, caplog):
    notes = tmp_path / "notes.txt"
    notes.write_text("these are notes\n")
    with pytest.raises(CheckpointError) as e:
        load_model(notes)
    assert str(e.value) == (
        f"{notes}: not a safe idcscope checkpoint: it is a text file, where idcscope expects "
        f"{EXPECTED}"
    )
    from idcscope.cli import app

    res = CliRunner().invoke(
        app, ["predict", str(notes), "--out", str(tmp_path / "o.csv"), "--model", str(notes)]
    )
    assert res.exit_code == 1
    assert "KeyError" not in caplog.text and "notes.txt: not a safe" in caplog.text


def test_a_folder_that_is_not_a_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match=rf"no config\.json is not|expected {EXPECTED}"):
        read_checkpoint(tmp_path)


class Payload:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_the_pickle_refusal_is_one_whole_message(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": schema.FORMAT, "model": Payload()}, evil)
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(evil)
    message = str(e.value)
    assert message.startswith(f"{evil}: not a safe idcscope checkpoint: it holds pickled")
    assert re.search(r"\(Unsupported global: GLOBAL (builtins\.)?print\); unpickling", message)
    assert message.endswith("(weights as safetensors).")
    assert "Do it only if" not in message and "\n" not in message


def test_a_bare_pickle_is_refused_whole(tmp_path):
    evil = tmp_path / "old.pt"
    evil.write_bytes(pickle.dumps({"format": schema.FORMAT, "model": Payload()}))
    with pytest.raises(CheckpointError, match=r"old\.pt: not a safe .*refuses to load it\."):
        read_checkpoint(evil)


def test_a_config_that_is_not_json_or_of_another_format(model_dir, tmp_path):
    folder = shutil.copytree(model_dir, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "format": "idcscope-model/9"}))
    with pytest.raises(
        CheckpointError,
        match=r"m[/\\]config\.json: model format 'idcscope-model/9' is not one this idcscope reads",
    ):
        read_checkpoint(folder)
    (folder / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "format"})
    )
    with pytest.raises(CheckpointError, match=r"config\.json: not an idcscope model config"):
        read_checkpoint(folder)
    (folder / "config.json").write_text("{'format': 'idcscope-model/1'")
    with pytest.raises(
        CheckpointError, match=r"config\.json: not a readable model config: not JSON"
    ):
        read_checkpoint(folder)


def test_an_onnx_file_that_is_not_one(tmp_path):
    from idcscope.errors import IdcscopeError

    fake = tmp_path / "model.onnx"
    fake.write_text("not a graph\n")
    with pytest.raises(
        IdcscopeError, match=r"model\.onnx: not an ONNX graph ONNX Runtime can load"
    ):
        OnnxModel(fake)
