"""One model schema: every field survives .pt -> model folder -> .onnx, older formats load,
unknown ones are refused with a clear error, and a field the schema does not name is
never written."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from idcscope.errors import CheckpointError
from idcscope.evaluation.evaluate import evaluate
from idcscope.inference.export import export_onnx, save_bundle
from idcscope.inference.onnx import OnnxModel
from idcscope.models.checkpoint import read_checkpoint, read_meta, save_checkpoint
from idcscope.models.schema import FORMAT, OLD_FORMATS, ModelMeta, migrate, plain


@pytest.fixture(scope="module")
def exports(trained_run, tmp_path_factory):
    """The trained run's best.pt, its model folder, and the folder's ONNX graph."""
    root = tmp_path_factory.mktemp("exports")
    pt = trained_run / "best.pt"
    folder = save_bundle(pt, root / "model", "# m\n")
    graph = export_onnx(folder, root / "model.onnx")
    return pt, folder, graph


def _published(meta: ModelMeta) -> dict:
    fields = plain(meta.to_fields())
    for local in ("out", "cache_dir"):  # the training machine's paths stay behind
        fields["config"].pop(local, None)
    return fields


def test_every_field_survives_the_round_trip(exports):
    pt, folder, graph = exports
    from_pt = _published(read_meta(pt))
    from_folder = _published(read_meta(folder))
    from_onnx = _published(ModelMeta.from_fields(OnnxModel(graph).metadata, graph))
    names = [f.name for f in dataclasses.fields(ModelMeta)]
    assert list(from_pt) == ["format", *names]
    for name in from_pt:  # field by field, to name the one that is lost
        assert from_folder[name] == from_pt[name], name
        assert from_onnx[name] == from_pt[name], name
    assert from_pt["splits"]["test"]  # what `evaluate --split test` needs


def test_the_onnx_graph_evaluates_the_test_split_as_the_folder_does(
    exports, synthetic_root, tmp_path
):
    _, folder, graph = exports
    kw = {"split": "test", "n_boot": 20, "engine": "onnx"}
    by_folder = evaluate(folder, synthetic_root, tmp_path / "folder", **kw)
    by_graph = evaluate(graph, synthetic_root, tmp_path / "graph", **kw)
    assert by_graph["data_summary"]["n_patches"] == by_folder["data_summary"]["n_patches"] > 0
    assert by_graph["auc"] == pytest.approx(by_folder["auc"], abs=1e-6)


@pytest.mark.parametrize("old", OLD_FORMATS)
def test_older_formats_migrate(old, trained_run):
    fields = {**read_checkpoint(trained_run / "best.pt"), "format": old}
    fields.pop("lone_calibration", None)  # a field older models may not have
    meta = ModelMeta.from_fields(fields, "old.pt")
    assert meta.lone_calibration is None
    assert meta.calibrated(lone=True) == meta.calibrated()
    assert migrate(fields, "old.pt")["format"] == FORMAT


def test_a_folder_of_the_first_format_loads_and_decides_every_patch(tmp_path):
    """The shipped folder as idcscope wrote it before there were contexts and input checks
    (format idcscope-model/1): it loads, and calls every patch at its threshold."""
    from idcscope.models.bundle import DEFAULT_MODEL, read_config, resolve_model

    folder = shutil.copytree(resolve_model(DEFAULT_MODEL), tmp_path / "old")
    config = json.loads((folder / "config.json").read_text())
    for field in ("contexts", "input_check"):
        config.pop(field)
    (folder / "config.json").write_text(json.dumps({**config, "format": OLD_FORMATS[1]}))
    assert read_config(folder)["format"] == FORMAT
    meta = read_meta(folder)
    assert meta.contexts == [] and meta.input_check == {}
    d = meta.decisions(np.array([8.0, np.nan]))
    assert (d.no_idc_below == d.idc_from).all() and (d.idc_from == meta.threshold).all()
    assert d.temperature[1] == meta.lone_calibration["temperature"]  # alone: its own


def test_an_unknown_format_is_refused_clearly(exports, tmp_path):
    _, folder, _ = exports
    copy = shutil.copytree(folder, tmp_path / "m")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "format": "idcscope-model/9"}))
    with pytest.raises(CheckpointError, match=r"'idcscope-model/9' is not one this idcscope reads"):
        read_meta(copy)
    with pytest.raises(CheckpointError, match="names no format"):
        ModelMeta.from_fields({"model": {"name": "cancernet"}}, "x.onnx")


def test_a_field_the_schema_does_not_name_is_never_written(trained_run, tmp_path):
    fields = {k: v for k, v in read_checkpoint(trained_run / "best.pt").items()}
    fields.pop("state_dict"), fields.pop("format")
    module = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match=r"\['thresold'\] are not fields of a model"):
        save_checkpoint(tmp_path / "x.pt", module, **fields, thresold=0.3)
    assert not (tmp_path / "x.pt").exists()
    save_checkpoint(tmp_path / "x.pt", module, **fields)
    assert read_checkpoint(tmp_path / "x.pt")["format"] == FORMAT
