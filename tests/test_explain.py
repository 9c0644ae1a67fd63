"""Grad-CAM and saliency on every registered model, and explanation panels end to end."""

import csv

import numpy as np
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from idcscope.cli import app
from idcscope.errors import IdcscopeError
from idcscope.inference.explain import GradCAM, explain_patches, overlay, saliency
from idcscope.models import create_model, list_models

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _hooks(model):
    return {n: (dict(m._forward_hooks), dict(m._backward_hooks)) for n, m in model.named_modules()}


def _state(model):
    return (
        {n: m.training for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


@pytest.mark.parametrize("name", list_models())
def test_gradcam_and_saliency_leave_every_model_as_found(name):
    torch.manual_seed(0)
    model = create_model(name).train()
    hooks, state = _hooks(model), _state(model)
    x = torch.rand(2, 3, 50, 50)
    with GradCAM(model) as cam, GradCAM(model, method="hirescam") as hires:
        assert not model.training
        assert cam.module._forward_hooks  # hooked while inside
        maps = cam(x, target=1)
        assert hires(x, target=1).shape == maps.shape
    assert maps.shape == (2, 50, 50)
    assert torch.isfinite(maps).all()
    assert maps.min() >= 0
    assert maps.max() <= 1
    # A frozen backbone (resnet50) must still give a gradient at the target layer.
    assert maps.flatten(1).amax(1).gt(0).any()
    sal = saliency(model, x, target=1)
    assert sal.shape == (2, 50, 50)
    assert torch.isfinite(sal).all()
    assert sal.min() >= 0
    assert sal.max() == pytest.approx(1.0)
    assert _hooks(model) == hooks
    assert _state(model) == state  # training flags module by module, requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_frozen_backbone_stays_frozen_and_in_eval_mode():
    model = create_model("resnet50").train()
    with GradCAM(model) as cam:
        cam(torch.rand(1, 3, 50, 50))
    assert model.training
    assert model.head.training
    assert not model.backbone.training
    assert not any(p.requires_grad for p in model.backbone.parameters())


class _SpotNet(nn.Module):
    """The IDC logit is the mean of a positive response to bright pixels, so only the bright
    region of the input can drive it."""

    cam_layer = "features"

    def __init__(self):
        super().__init__()
        conv = nn.Conv2d(3, 4, 3, padding=1)
        nn.init.constant_(conv.weight, 0.1)
        nn.init.constant_(conv.bias, -0.5)  # dark pixels stay below zero after the ReLU
        self.features = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        with torch.no_grad():
            self.head[2].weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]))
            self.head[2].bias.zero_()

    def forward(self, x):
        return self.head(self.features(x))


@pytest.mark.parametrize("method", ["gradcam", "hirescam"])
def test_maps_peak_where_the_evidence_is(method):
    x = torch.zeros(2, 3, 50, 50)
    x[0, :, 30:40, 5:15] = 1.0
    x[1, :, 4:12, 36:46] = 1.0
    boxes = [(30, 40, 5, 15), (4, 12, 36, 46)]
    model = _SpotNet()
    with GradCAM(model, method=method) as cam:
        maps = cam(x, target=1)
        against = cam(x, target=0)
        sal = saliency(model, x, target=1)  # other passes inside the block are untouched
    for heat in (maps, sal):
        for i, (y0, y1, x0, x1) in enumerate(boxes):
            r, c = divmod(int(heat[i].argmax()), 50)
            assert y0 - 2 <= r < y1 + 2, (i, r, c)
            assert x0 - 2 <= c < x1 + 2, (i, r, c)
            outside = heat[i].clone()
            outside[max(y0 - 3, 0) : y1 + 3, max(x0 - 3, 0) : x1 + 3] = 0
            assert outside.max() < 0.05
    # The bright spot argues against class 0: the ReLU leaves nothing, and zero stays zero.
    assert torch.equal(against, torch.zeros_like(against))


def test_gradcam_needs_the_with_block_and_a_real_layer():
    model = _SpotNet()
    with pytest.raises(RuntimeError, match="context manager"):
        GradCAM(model)(torch.rand(1, 3, 50, 50))
    with pytest.raises(IdcscopeError, match="no layer"):
        GradCAM(model, layer="nope")
    with pytest.raises(IdcscopeError, match="hirescam"):
        GradCAM(model, method="scorecam")
    hooks = _hooks(model)
    with pytest.raises(ValueError, match="boom"), GradCAM(model):
        raise ValueError("boom")
    assert _hooks(model) == hooks
    assert model.training


def test_gradcam_works_under_no_grad_and_autocast():
    model = _SpotNet()
    x = torch.zeros(1, 3, 50, 50)
    x[0, :, 10:20, 10:20] = 1
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), GradCAM(model) as cam:
        maps = cam(x)
    assert maps.dtype == torch.float32
    assert maps.max() == 1


def test_overlay_blends_on_the_patch():
    patch = np.full((50, 50, 3), 200, np.uint8)
    heat = np.zeros((50, 50))
    heat[:10] = 1.0
    out = overlay(patch, heat, alpha=0.5)
    assert out.dtype == np.uint8
    assert out.shape == patch.shape
    assert not np.array_equal(out[0, 0], out[40, 40])  # hot and cold differ
    np.testing.assert_array_equal(overlay(patch, heat, alpha=0.0), patch)
    np.testing.assert_array_equal(overlay(patch, torch.from_numpy(heat), 0.5), out)
    with pytest.raises(ValueError, match="does not match"):
        overlay(patch, np.zeros((10, 10)))


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    return trained_run / "best.pt"


@pytest.fixture(scope="module")
def patches(synthetic_root):
    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    return [sorted((patient / c).glob("*.png"))[0] for c in "01"]


def test_explain_patches_end_to_end(checkpoint, patches, tmp_path):
    bad = tmp_path / "broken_idx5_x1_y1_class1.png"
    bad.write_bytes(b"not a png")
    missing = tmp_path / "missing.png"
    rows = explain_patches(checkpoint, [*patches, bad, missing], tmp_path / "out", upscale=2)
    assert [r["path"] for r in rows] == [str(p) for p in (*patches, bad, missing)]
    for row, label in zip(rows[:2], (0, 1), strict=True):
        assert row["error"] == ""
        assert row["label"] == label
        assert 0 <= row["prob_idc"] <= 1
        assert row["pred"] in (0, 1)
        panel = tmp_path / "out" / row["output"]
        assert panel.name.endswith("_explain.png")
        assert panel.read_bytes().startswith(PNG_MAGIC)
    assert rows[2]["error"]
    assert rows[2]["label"] == 1
    assert rows[2]["prob_idc"] is None
    assert rows[3]["error"]
    assert rows[3]["label"] is None
    with (tmp_path / "out" / "explanations.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["path", "prob_idc", "pred", "label", "output", "error"]
    assert [bool(r["error"]) for r in table] == [False, False, True, True]
    assert table[1]["label"] == "1"
    assert table[3]["label"] == ""


def test_cli_explain(checkpoint, patches, tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        app, ["explain", str(patches[0]), "--out", str(tmp_path), "--model", str(checkpoint)]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / f"{patches[0].stem}_explain.png").is_file()
    res = runner.invoke(
        app,
        [
            "explain",
            "--model",
            str(checkpoint),
            str(patches[1].parent),
            "--out",
            str(tmp_path / "hires"),
            "--cam",
            "hirescam",
        ],
    )
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "hires").glob("*_explain.png"))) == len(
        list(patches[1].parent.glob("*.png"))
    )
    res = runner.invoke(
        app,
        ["explain", str(patches[0]), "--out", str(tmp_path), "--model", str(tmp_path / "none.pt")],
    )
    assert res.exit_code == 1
