"""Grad-CAM and saliency on every registered model, and explanation panels end to end."""

import csv

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from typer.testing import CliRunner

from idcscope.cli import app
from idcscope.errors import IdcscopeError
from idcscope.inference.explain import CSV_COLUMNS, GradCAM, explain_patches, saliency
from idcscope.inference.panels import overlay
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
        assert row["call"] in ("idc", "no_idc", "uncertain")
        assert row["input_check"] == "ok"  # a model without a check passes every patch
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
    assert list(table[0]) == list(CSV_COLUMNS)
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


# --------------------------------------------------------------- neighbourhood models


def _grid_patches(n_side=3):
    """A patient of n_side x n_side patches, each one flat colour that names its cell."""
    n = n_side * n_side
    patches = np.zeros((n, 50, 50, 3), np.uint8)
    for i in range(n):
        patches[i] = (10 * i, 100 + i, 200 - i)
    ys, xs = np.divmod(np.arange(n), n_side)
    return patches, xs * 50.0, ys * 50.0


def test_block_holds_the_patch_in_the_centre_its_neighbours_in_place_and_glass_elsewhere():
    from idcscope.data.neighbourhood import GLASS
    from idcscope.data.preprocess import Preprocessing
    from idcscope.inference.attribution import block_rows, neighbour_blocks

    patches, xs, ys = _grid_patches()
    inputs = Preprocessing(neighbourhood=1).model_input(patches, None, (xs, ys))
    blocks = neighbour_blocks(inputs, block_rows(9, None, (xs, ys), 1))
    assert blocks.shape == (9, 150, 150, 3)
    assert blocks.dtype == np.uint8
    # The middle patch (4) sees all eight neighbours where they lie on the grid.
    for cell in range(9):
        r, c = divmod(cell, 3)
        np.testing.assert_array_equal(
            blocks[4, 50 * r : 50 * (r + 1), 50 * c : 50 * (c + 1)], patches[cell]
        )
    # Patch 0 (top-left corner): itself in the centre, glass above and to the left.
    np.testing.assert_array_equal(blocks[0, 50:100, 50:100], patches[0])
    np.testing.assert_array_equal(blocks[0, 50:100, 100:150], patches[1])
    np.testing.assert_array_equal(blocks[0, 100:150, 100:150], patches[4])
    assert (blocks[0, :50] == GLASS).all()
    assert (blocks[0, :, :50] == GLASS).all()
    # Averaged down by 3, each block is what the model read as its neighbourhood planes.
    down = blocks.reshape(9, 50, 3, 50, 3, 3).astype(np.int64).sum((2, 4))
    np.testing.assert_array_equal((down + 4) // 9, inputs[:, 3:].transpose(0, 2, 3, 1))
    # A patch without a place is alone on glass.
    lone = neighbour_blocks(inputs[:1], block_rows(1, None, None, 1))
    np.testing.assert_array_equal(lone[0, 50:100, 50:100], patches[0])
    lone[0, 50:100, 50:100] = GLASS
    assert (lone == GLASS).all()


class _LinearNet(nn.Module):
    """Logits linear in the input: Integrated Gradients is exact for any number of steps."""

    def __init__(self, chans=6):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(chans, 4, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x):
        return self.head(self.conv(x))


def test_group_attributions_split_the_logit_difference_exactly_on_a_linear_model():
    from idcscope.inference.attribution import block_map, group_maps, integrated_gradients

    model = _LinearNet()
    x, glass = torch.rand(3, 6, 50, 50), torch.ones(1, 6, 1, 1)
    groups = group_maps(integrated_gradients(model, x, glass, target=1, steps=2))
    assert groups.shape == (3, 2, 50, 50)
    with torch.no_grad():
        f = lambda z: model(z)[:, 1].numpy()  # noqa: E731
        whole = f(x) - f(glass.expand_as(x))
        only_patch = x.clone()
        only_patch[:, 3:] = 1.0  # the neighbourhood planes at glass
        patch_part = f(only_patch) - f(glass.expand_as(x))
    # The two groups are the two parts of one sum: the patch planes' part is what the
    # patch alone adds to glass, the neighbourhood planes' is the rest.
    np.testing.assert_allclose(groups.sum((1, 2, 3)), whole, atol=1e-4)
    np.testing.assert_allclose(groups[:, 0].sum((1, 2)), patch_part, atol=1e-4)
    np.testing.assert_allclose(groups[:, 1].sum((1, 2)), whole - patch_part, atol=1e-4)
    # Drawn over the block, each cell's share spread over its 3x3 pixels: the same total,
    # and outside the centre only the neighbourhood planes.
    blk = block_map(groups)
    assert blk.shape == (3, 150, 150)
    np.testing.assert_allclose(blk.sum((1, 2)), whole, atol=1e-4)
    np.testing.assert_allclose(blk[:, :3, :3].sum((1, 2)), groups[:, 1, 0, 0], atol=1e-6)
    hood = blk.copy()
    hood[:, 50:100, 50:100] -= groups[:, 0]  # the patch planes lie over the centre cell
    np.testing.assert_allclose(hood, groups[:, 1].repeat(3, 1).repeat(3, 2) / 9, atol=1e-6)


def test_integrated_gradients_is_complete_on_a_real_network_and_leaves_it_as_found():
    from idcscope.inference.attribution import integrated_gradients

    torch.manual_seed(0)
    model = create_model("cancernet", in_chans=6).train()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.uniform_(-0.1, 0.1)
    hooks, state = _hooks(model), _state(model)
    x, glass = torch.rand(2, 6, 50, 50), torch.ones(1, 6, 1, 1)
    ig = integrated_gradients(model, x, glass, steps=64)
    model.eval()
    with torch.no_grad():
        delta = model(x)[:, 1] - model(glass.expand_as(x))[:, 1]
    model.train()
    gap = (ig.sum((1, 2, 3)) - delta).abs()
    assert (gap <= 0.05 * delta.abs().clamp_min(0.1)).all(), (gap, delta)
    assert _hooks(model) == hooks
    assert _state(model) == state
    assert all(p.grad is None for p in model.parameters())


class _DarkSpotNet(nn.Module):
    """On white glass, the IDC logit grows with dark pixels, in any of the six planes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 4, 3, padding=1, padding_mode="replicate")
        nn.init.constant_(self.conv.weight, -0.1)
        nn.init.constant_(self.conv.bias, 4.0)  # white stays below zero, a dark group not

    def forward(self, x):
        evidence = F.relu(self.conv(x)).sum((1, 2, 3)) / 100
        return torch.stack([torch.zeros_like(evidence), evidence - 1], 1)


def test_deletion_test_tells_a_faithful_map_from_a_random_one():
    from idcscope.inference.attribution import deletion, group_maps, integrated_gradients

    x = torch.ones(4, 6, 50, 50)  # glass, with dark evidence in each group
    for i in range(4):
        r, c = 5 + 9 * i, 40 - 9 * i
        x[i, :3, r : r + 6, c : c + 6] = 0.1  # in the patch
        x[i, 3:, c : c + 5, r : r + 5] = 0.2  # in the neighbourhood
    model, glass = _DarkSpotNet(), torch.ones(1, 6, 1, 1)
    ig = torch.from_numpy(group_maps(integrated_gradients(model, x, glass, steps=16)))
    gen = torch.Generator().manual_seed(0)

    def faithful(scores) -> bool:
        drop = deletion(model, x, scores, fill=glass)  # (fractions, B)
        rand = np.mean(
            [deletion(model, x, torch.rand(ig.shape, generator=gen), fill=glass) for _ in range(5)],
            0,
        )
        return bool((drop < rand - 0.05).all())

    assert faithful(ig)
    assert not faithful(torch.rand(ig.shape, generator=gen))
    # Both groups hold evidence: a map of the patch planes alone removes less of it.
    patch_only = ig.clone()
    patch_only[:, 1] = -1e9
    drop_ig = deletion(model, x, ig, fill=glass)
    assert (deletion(model, x, patch_only, fill=glass)[-1] > drop_ig[-1]).all()


def test_explainer_shows_a_neighbourhood_model_the_block_it_saw(checkpoint, synthetic_root):
    from idcscope.data.manifest import index_files
    from idcscope.data.neighbourhood import GLASS
    from idcscope.inference.explain import Explainer
    from idcscope.inference.predictor import Predictor

    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    table = index_files([patient]).table
    x, y = table["x"].to_numpy(), table["y"].to_numpy()
    centre = int(np.argmin((x - np.median(x)) ** 2 + (y - np.median(y)) ** 2))
    near = (np.abs(x - x[centre]) <= 50) & (np.abs(y - y[centre]) <= 50)
    table = table[near].reset_index(drop=True)
    ex = Explainer(Predictor(checkpoint)).explain(table)
    n = int(ex.ok.sum())
    assert n == len(table)
    assert ex.blocks.shape == (n, 150, 150, 3)
    assert ex.attribution.shape == (n, 2, 50, 50)
    assert np.isfinite(ex.attribution).all()
    i = int(np.flatnonzero((table["x"] == x[centre]) & (table["y"] == y[centre]))[0])
    seen = set()
    for j, (xj, yj) in enumerate(zip(table["x"], table["y"], strict=True)):
        r, c = int(yj - y[centre]) // 50 + 1, int(xj - x[centre]) // 50 + 1
        cell = ex.blocks[i, 50 * r : 50 * (r + 1), 50 * c : 50 * (c + 1)]
        np.testing.assert_array_equal(cell, ex.patches[j])  # stain "none": as decoded
        seen.add((r, c))
    for r, c in set(np.ndindex(3, 3)) - seen:
        assert (ex.blocks[i, 50 * r : 50 * (r + 1), 50 * c : 50 * (c + 1)] == GLASS).all()
