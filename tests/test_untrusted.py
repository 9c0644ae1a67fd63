"""Untrusted files: checkpoints, split files, configs and caches someone else wrote.

A planted pickle whose ``__reduce__`` would create a marker file must be refused by every
loader with a clear error naming the file, and the marker must never appear. Malformed
checkpoints (wrong tag, missing keys, truncated) get errors that name the file too.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from idcscope.data.preprocess import Preprocessing
from idcscope.errors import CheckpointError, DataError
from idcscope.inference import Predictor
from idcscope.models import create_model
from idcscope.models.checkpoint import load_model, read_checkpoint, save_checkpoint
from idcscope.models.schema import FORMAT, REQUIRED
from tests.conftest import write_patch


class Payload:
    """Unpickling this creates ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


def _plant(path: Path, marker: Path, how: str) -> Path:
    """A checkpoint-looking file that runs the payload when unpickled."""
    payload = Payload(marker)
    if how == "inside a torch checkpoint":
        torch.save({"format": FORMAT, "state_dict": {}, "model": payload}, path)
    elif how == "as the whole torch checkpoint":
        torch.save(payload, path)
    else:  # a bare pickle, as torch.save wrote before its zip format
        path.write_bytes(pickle.dumps({"format": FORMAT, "state_dict": payload}))
    return path


PLANTS = ["inside a torch checkpoint", "as the whole torch checkpoint", "as a bare pickle"]


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    """A small but complete checkpoint, written the way training writes one."""
    path = tmp_path_factory.mktemp("ckpt") / "good.pt"
    model = create_model("cancernet", num_classes=2)
    return save_checkpoint(
        path,
        model,
        model={"name": "cancernet", "kwargs": {}},
        class_names=["no_idc", "idc"],
        preprocessing=dataclasses.asdict(Preprocessing()),
        threshold=0.5,
        epoch=1,
    )


def _variant(good: Path, path: Path, **changes) -> Path:
    """A copy of the good checkpoint with fields changed (None removes a field)."""
    ckpt = torch.load(good, weights_only=True)
    for key, value in changes.items():
        if value is None:
            ckpt.pop(key)
        else:
            ckpt[key] = value
    torch.save(ckpt, path)
    return path


# ----------------------------------------------------------------------------- planted pickles


@pytest.mark.parametrize("how", PLANTS)
def test_the_planted_payload_is_live(how, tmp_path, marker):
    # The control: loading it the unsafe way does run it, so the refusals below mean something.
    path = _plant(tmp_path / "evil.pt", marker, how)
    if how == "as a bare pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


LOADERS = {
    "read_checkpoint": read_checkpoint,
    "load_model": load_model,
    "Predictor": Predictor,
}


@pytest.mark.parametrize("how", PLANTS)
@pytest.mark.parametrize("loader", list(LOADERS))
def test_planted_pickle_is_refused(loader, how, tmp_path, marker):
    path = _plant(tmp_path / "evil.pt", marker, how)
    with pytest.raises(CheckpointError, match=r"evil\.pt: not a safe idcscope checkpoint"):
        LOADERS[loader](path)
    assert not marker.exists()


def test_entry_points_refuse_a_planted_pickle(tmp_path, marker):
    from idcscope.evaluation.evaluate import evaluate
    from idcscope.inference.predict import predict
    from idcscope.spatial.heatmap import patient_heatmap

    evil = _plant(tmp_path / "evil.pt", marker, PLANTS[0])
    patch = write_patch(tmp_path / "data" / "1" / "0" / "1_idx5_x1_y1_class0.png")
    for run in (
        lambda: predict(evil, [patch], workers=1),
        lambda: evaluate(evil, tmp_path / "data", tmp_path / "eval"),
        lambda: patient_heatmap(evil, tmp_path / "data" / "1", tmp_path / "heatmap"),
    ):
        with pytest.raises(CheckpointError, match=r"evil\.pt"):
            run()
    assert not marker.exists()


def test_cli_refuses_a_planted_pickle(tmp_path, marker, caplog):
    from idcscope.cli import app

    evil = _plant(tmp_path / "evil.pt", marker, PLANTS[0])
    patch = write_patch(tmp_path / "p.png")
    res = CliRunner().invoke(
        app, ["predict", str(patch), "--out", str(tmp_path / "o"), "--model", str(evil)]
    )
    assert res.exit_code == 1
    assert "evil.pt: not a safe idcscope checkpoint" in caplog.text
    assert not marker.exists()


# ----------------------------------------------------------------------------- malformed checkpoints


def test_the_good_checkpoint_loads(good_checkpoint):
    model, _ = load_model(good_checkpoint)
    assert model(torch.zeros(1, 3, 50, 50)).shape == (1, 2)
    assert Predictor(good_checkpoint).threshold == 0.5


@pytest.mark.parametrize("fmt", ["idcscope-checkpoint/0", "timm", None])
def test_wrong_format_tag(fmt, good_checkpoint, tmp_path):
    path = _variant(good_checkpoint, tmp_path / "other.pt", format=fmt)
    with pytest.raises(CheckpointError, match=r"other\.pt: not an idcscope checkpoint"):
        load_model(path)


def test_not_a_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match=r"list\.pt: not an idcscope checkpoint"):
        read_checkpoint(path)


@pytest.mark.parametrize("key", ["state_dict", *REQUIRED])
def test_missing_key(key, good_checkpoint, tmp_path):
    path = _variant(good_checkpoint, tmp_path / "partial.pt", **{key: None})
    with pytest.raises(
        CheckpointError, match=rf"partial\.pt: not a complete checkpoint \(no {key}\)"
    ):
        Predictor(path)


MALFORMED = {
    "unknown model": {"model": {"name": "no_such_net", "kwargs": {}}},
    "model without name": {"model": {"kwargs": {}}},
    "model arguments not a dict": {"model": {"name": "cancernet", "kwargs": [1, 2]}},
    "unknown model argument": {"model": {"name": "cancernet", "kwargs": {"rm_rf": True}}},
    "asks for hub weights": {"model": {"name": "cancernet", "kwargs": {"pretrained": True}}},
    "asks to read a file": {"model": {"name": "cancernet", "kwargs": {"weights": "/etc/passwd"}}},
    "unknown preprocessing": {"preprocessing": {"mean": [0, 0, 0], "evil": 1}},
    "preprocessing not a dict": {"preprocessing": [0.5, 0.5]},
}


@pytest.mark.parametrize("what", list(MALFORMED))
def test_malformed_model_description(what, good_checkpoint, tmp_path):
    path = _variant(good_checkpoint, tmp_path / "odd.pt", **MALFORMED[what])
    with pytest.raises(CheckpointError, match=r"odd\.pt: the model it describes cannot be built"):
        load_model(path)


def test_weights_of_another_model(good_checkpoint, tmp_path):
    path = _variant(good_checkpoint, tmp_path / "mixed.pt", state_dict={"w": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"mixed\.pt: weights do not fit model 'cancernet'"):
        load_model(path)


@pytest.mark.parametrize("keep", [0, 10, 0.5, -100])
def test_truncated_checkpoint(keep, good_checkpoint, tmp_path):
    data = good_checkpoint.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match=r"cut\.pt: not a safe idcscope checkpoint"):
        load_model(path)


def test_text_file_as_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match=r"notes\.pt: not a safe idcscope checkpoint"):
        load_model(path)


@pytest.mark.parametrize("where", ["missing.pt", "a_folder.pt"])
def test_no_checkpoint_file_there(where, tmp_path):
    (tmp_path / "a_folder.pt").mkdir()
    with pytest.raises(CheckpointError, match=re.escape(where) + ": checkpoint not found"):
        load_model(tmp_path / where)


# ----------------------------------------------------------------------------- other files


@pytest.mark.parametrize(
    "content",
    [
        {"train": "8863", "test": ["9000"]},  # a string is not a list of ids
        {"train": {"8863": 1}, "test": []},
        {"train": 8863},
    ],
)
def test_malformed_split_file(content, tmp_path):
    from idcscope.data.splits import load_splits

    path = tmp_path / "folds.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"folds\.json: 'train' must be a list of patient ids"):
        load_splits(path)


def test_yaml_config_cannot_run_code(tmp_path, marker):
    from idcscope.errors import IdcscopeError
    from idcscope.training.config import make_config

    path = tmp_path / "evil.yaml"
    path.write_text(f"epochs: !!python/object/apply:builtins.open ['{marker}', 'w']\n")
    with pytest.raises(IdcscopeError, match=r"evil\.yaml: not a readable YAML.*python/object"):
        make_config("default", yaml_path=path)
    assert not marker.exists()
    path.write_text("- a list, not a mapping\n")
    with pytest.raises(IdcscopeError, match="mapping"):
        make_config("default", yaml_path=path)


def test_planted_pickle_in_the_patch_cache_is_never_loaded(tmp_path, marker, caplog):
    from idcscope.data.cache import load_or_build
    from idcscope.data.manifest import index_dataset

    write_patch(tmp_path / "d" / "7" / "0" / "7_idx5_x1_y1_class0.png")
    ix = index_dataset(tmp_path / "d")
    load_or_build(ix.root, ix.table, tmp_path / "c", workers=1)
    folder = next((tmp_path / "c").iterdir())
    np.save(folder / "ok.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    again = load_or_build(ix.root, ix.table, tmp_path / "c", workers=1)
    assert "damaged" in caplog.text and again.ok.all()
    assert not marker.exists()
