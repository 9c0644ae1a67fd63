"""Patient heatmaps: mosaic geometry, probability grids, Dice/IoU, and a run end to end."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from idcscope.cli import app
from idcscope.errors import DataError
from idcscope.models.checkpoint import read_checkpoint
from idcscope.spatial.heatmap import dice_iou, patient_heatmap, patient_mosaic, probability_grid
from tests.conftest import write_patch

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RED, BLUE = (220, 20, 30), (20, 30, 220)


def _patches(*colours):
    return np.stack([np.full((50, 50, 3), c, np.uint8) for c in colours])


def test_mosaic_puts_each_patch_at_its_coordinates():
    mosaic, origin = patient_mosaic(_patches(RED, BLUE), xs=[101, 201], ys=[201, 251])
    assert origin == (101, 201)
    assert mosaic.shape == (100, 150, 3)
    assert (mosaic[0:50, 0:50] == RED).all()
    assert (mosaic[50:100, 100:150] == BLUE).all()
    assert (mosaic[50:100, 0:100] == 255).all()  # glass between them
    assert (mosaic[0:50, 50:150] == 255).all()


def test_mosaic_scales_down():
    mosaic, origin = patient_mosaic(_patches(RED, BLUE), xs=[1, 101], ys=[1, 51], scale=0.2)
    assert origin == (1, 1)
    assert mosaic.shape == (20, 30, 3)
    assert (mosaic[0:10, 0:10] == RED).all()
    assert (mosaic[10:20, 20:30] == BLUE).all()
    assert (mosaic[10:20, 0:20] == 255).all()


def test_probability_grid_has_nan_where_no_patch():
    grid, origin = probability_grid([51, 151, 151, 51], [1, 1, 101, 101], [0.2, 0.9, 0.4, 0.6])
    assert origin == (51, 1)
    assert grid.shape == (3, 3)
    np.testing.assert_allclose(grid[[0, 0, 2, 2], [0, 2, 2, 0]], [0.2, 0.9, 0.4, 0.6])
    assert np.isnan(grid[1]).all()
    assert np.isnan(grid[:, 1]).all()
    assert np.isnan(grid).sum() == 5


def test_probability_grid_averages_patches_in_one_cell():
    grid, _ = probability_grid([1, 1, 51], [1, 1, 1], [0.2, 0.6, 1.0])
    np.testing.assert_allclose(grid, [[0.4, 1.0]])


def test_grid_and_mosaic_errors():
    with pytest.raises(ValueError, match="as many"):
        probability_grid([1, 2], [1], [0.5, 0.5])
    with pytest.raises(ValueError, match="as many"):
        patient_mosaic(_patches(RED), [], [])


@pytest.mark.parametrize(
    ("pred", "true", "dice", "iou"),
    [
        ([[1, 1], [0, 0]], [[1, 0], [1, 0]], 2 * 1 / 4, 1 / 3),
        ([[1, 1], [0, 0]], [[1, 1], [0, 0]], 1.0, 1.0),
        ([[1, 0], [0, 0]], [[0, 0], [0, 1]], 0.0, 0.0),
        ([[0, 0], [0, 0]], [[0, 1], [1, 1]], 0.0, 0.0),  # nothing predicted, IDC missed
        ([[1, 1, 1], [0, 0, 0]], [[1, 1, 0], [0, 0, 0]], 2 * 2 / 5, 2 / 3),
    ],
)
def test_dice_iou_hand_computed(pred, true, dice, iou):
    got = dice_iou(np.array(pred, bool), np.array(true, bool))
    assert got["dice"] == pytest.approx(dice)
    assert got["iou"] == pytest.approx(iou)


def test_dice_iou_empty_masks_and_tissue():
    empty = np.zeros((2, 2), bool)
    assert dice_iou(empty, empty) == {"dice": None, "iou": None}
    pred = np.array([[1, 1], [0, 0]], bool)
    tissue = np.array([[1, 0], [1, 1]], bool)  # the second predicted cell is glass
    assert dice_iou(pred, np.array([[1, 0], [0, 0]], bool), tissue) == {"dice": 1.0, "iou": 1.0}
    assert dice_iou(pred, empty, ~pred) == {"dice": None, "iou": None}
    with pytest.raises(ValueError, match="shapes"):
        dice_iou(pred, np.zeros((3, 3), bool))


def _brightest(fig, ax, cells, patch: int = 50, half: int = 12) -> list[int]:
    """The brightest pixel near the centre of each (row, col) cell of ``ax``, as drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3]
    out = []
    for r, c in cells:
        x, y = ax.transData.transform(((c + 0.5) * patch, (r + 0.5) * patch))
        row, col = round(rgb.shape[0] - y), round(x)
        out.append(int(rgb[row - half : row + half, col - half : col + half].min(2).max()))
    return out


def test_uncertain_cells_are_hatched_and_named_in_the_legend():
    from idcscope.spatial.figures import plot_patient_heatmap, plot_probability_map

    prob = np.zeros((4, 6))  # no IDC anywhere: black under the colour map
    uncertain = np.zeros(prob.shape, bool)
    uncertain[1:3, 2:4] = True
    mosaic = np.full((200, 300, 3), 255, np.uint8)
    heatmap = plot_patient_heatmap(mosaic, prob, (0, 0), 0.5, uncertain=uncertain)
    probability = plot_probability_map(prob, (0, 0), uncertain=uncertain)
    for fig, ax in ((heatmap, heatmap.axes[1]), (probability, probability.axes[0])):
        assert "uncertain (4)" in [t.get_text() for t in ax.get_legend().get_texts()]
        hatched = _brightest(fig, ax, [(1, 2), (1, 3), (2, 2), (2, 3)])
        plain = _brightest(fig, ax, [(0, 0), (0, 5), (1, 1), (2, 4)])  # not under the legend
        assert min(hatched) > 200  # white hatch lines over the grey
        assert max(plain) < 120
    # nothing uncertain: nothing drawn, no legend entry
    fig = plot_probability_map(prob, (0, 0), uncertain=np.zeros(prob.shape, bool))
    assert fig.axes[0].get_legend() is None


@pytest.fixture(scope="module")
def checkpoint(trained_run):
    return trained_run / "best.pt"


@pytest.fixture(scope="module")
def patient(synthetic_root):
    return sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]


def test_patient_heatmap_end_to_end(checkpoint, patient, tmp_path):
    s = patient_heatmap(checkpoint, patient, tmp_path)
    pid = patient.name
    n_files = len(list(patient.glob("*/*.png")))
    assert s["patient"] == pid
    assert s["n_patches"] == n_files
    assert s["threshold"] == pytest.approx(read_checkpoint(checkpoint)["threshold"])
    for key in ("idc_fraction_pred", "idc_fraction_true"):
        assert 0 <= s[key] <= 1
    n_true = len(list(patient.glob("1/*.png")))
    assert s["idc_fraction_true"] == pytest.approx(n_true / s["n_tissue_cells"])
    for key in ("dice", "iou", "auc"):
        assert s[key] is None or 0 <= s[key] <= 1
    assert json.loads((tmp_path / f"{pid}_heatmap.json").read_text()) == s
    for name in (f"{pid}_heatmap.png", f"{pid}_probability.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) < 400_000
    with Image.open(tmp_path / f"{pid}_heatmap.png") as im:
        assert im.width > im.height  # panels side by side

    # The same patient through the dataset folder and its id; every patch above a zero
    # threshold is predicted IDC.
    again = patient_heatmap(checkpoint, patient.parent, tmp_path / "b", patient=pid, threshold=0)
    assert again["n_patches"] == s["n_patches"]
    assert again["idc_fraction_pred"] == 1.0
    assert again["threshold"] == 0


def test_patient_heatmap_counts_uncertain_patches(checkpoint, patient, tmp_path):
    from tests.test_serve import with_contexts

    s = patient_heatmap(with_contexts(checkpoint, tmp_path), patient, tmp_path)
    predictions = pd.read_csv(tmp_path / f"{patient.name}_predictions.csv")
    called = predictions["call"].value_counts().to_dict()
    assert s["calls"] == {k: called.get(k, 0) for k in ("idc", "no_idc", "uncertain")}
    assert s["calls"]["uncertain"] == int((predictions["neighbours"] <= 4).sum()) > 0
    assert s["input_check"] == {"ok": s["n_patches"]}


def test_patient_heatmap_refuses_several_patients(checkpoint, synthetic_root, tmp_path):
    with pytest.raises(DataError, match="patients"):
        patient_heatmap(checkpoint, synthetic_root, tmp_path)


def test_patient_heatmap_without_coordinates(checkpoint, tmp_path):
    write_patch(tmp_path / "p" / "0" / "a.png")
    with pytest.raises(DataError, match="coordinates"):
        patient_heatmap(checkpoint, tmp_path / "p", tmp_path / "out")


def test_cli_heatmap(checkpoint, patient, tmp_path):
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "heatmap",
            "--model",
            str(checkpoint),
            str(patient),
            "--out",
            str(tmp_path),
            "--threshold",
            "0.5",
            "--tta",
        ],
    )
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / f"{patient.name}_heatmap.json").read_text())
    assert s["threshold"] == 0.5
    assert s["tta"] is True
    res = runner.invoke(
        app,
        ["heatmap", str(tmp_path / "nobody"), "--out", str(tmp_path), "--model", str(checkpoint)],
    )
    assert res.exit_code == 2  # a usage error: the folder does not exist
