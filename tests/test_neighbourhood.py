"""The model's view of a patch with its neighbours: lookup, the block, augmentation, training."""

import numpy as np
import pytest
import torch

from idcscope.data.augment import create_augment
from idcscope.data.grid import neighbour_counts, neighbour_rows
from idcscope.data.neighbourhood import GLASS, add_neighbourhood, block_planes
from idcscope.data.preprocess import Preprocessing
from tests.conftest import same_blocks

# Patient "a": an L of five patches and one without a place; patient "b": one patch at the
# same coordinates as a's first.
XS = np.array([0, 50, 100, 0, 0, np.nan, 0])
YS = np.array([0, 0, 0, 50, 100, 0, 0])
GROUPS = np.array(["a", "a", "a", "a", "a", "a", "b"])


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)


def _view(images: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """uint8 (N, 6, H, W): the patches' planes, then their blocks of ``neighbours``."""
    planes = np.zeros((len(images), 6, *images.shape[1:3]), np.uint8)
    planes[:, :3] = images.transpose(0, 3, 1, 2)
    return block_planes(planes, neighbours)


def test_neighbours_are_found_on_the_patients_grid():
    nb = neighbour_rows(GROUPS, XS, YS)
    assert nb.shape == (7, 9)
    assert (nb[:, 4] == np.arange(7)).all()  # the middle of every block is the patch itself
    # Patch 0 at (0, 0): right is 1, below is 3; nothing above or to the left.
    assert nb[0].tolist() == [-1, -1, -1, -1, 0, 1, -1, 3, -1]
    assert nb[3].tolist() == [-1, 0, 1, -1, 3, -1, -1, 4, -1]
    # No place, or another patient at the same coordinates: the patch alone.
    assert nb[5].tolist() == [-1] * 4 + [5] + [-1] * 4
    assert nb[6].tolist() == [-1] * 4 + [6] + [-1] * 4
    assert neighbour_rows(GROUPS, XS, YS, radius=2).shape == (7, 25)


def test_the_view_is_the_patch_then_its_block_averaged_down():
    images = _images(7)
    view = _view(images, neighbour_rows(GROUPS, XS, YS))
    out = view[np.array([3, 5])].transpose(0, 2, 3, 1)  # back to (N, H, W, C) to compare
    assert out.shape == (2, 6, 6, 6) and out.dtype == np.uint8 and view.shape == (7, 6, 6, 6)
    assert (out[..., :3] == images[[3, 5]]).all()
    # The 3x3 block around patch 3, glass where there is no patch, averaged over 3x3 pixels.
    block = np.full((18, 18, 3), GLASS, dtype=np.float64)
    for cell, row in enumerate([-1, 0, 1, -1, 3, -1, -1, 4, -1]):
        if row >= 0:
            r, c = divmod(cell, 3)
            block[6 * r : 6 * r + 6, 6 * c : 6 * c + 6] = images[row]
    expected = block.reshape(6, 3, 6, 3, 3).mean(axis=(1, 3))
    assert np.abs(out[0, ..., 3:] - expected).max() <= 0.5
    # A patch alone sits in the middle of glass.
    assert (out[1, 2:4, 2:4, 3:] != GLASS).any() and (out[1, 0, 0, 3:] == GLASS).all()


def test_a_subset_sees_the_same_neighbours_as_the_whole():
    images = _images(7, seed=1)
    prep = Preprocessing(mean=(0.5,) * 6, std=(0.2,) * 6, neighbourhood=1)
    whole = prep.model_input(images, GROUPS, (XS, YS))
    assert whole.shape == (7, 6, 6, 6) and whole.dtype == np.uint8
    # Neighbours are looked up among the patches given: patient b alone, or a without the
    # patch that has no place, see what they see among all patches.
    for rows in ([6], [0, 1, 2, 3, 4]):
        rows = np.array(rows)
        part = prep.model_input(images[rows], GROUPS[rows], (XS[rows], YS[rows]))
        assert (part == whole[rows]).all()
    # Without coordinates every patch is alone.
    alone = prep.model_input(images, GROUPS, None)
    assert (alone[0, 3:, 0, 0] == GLASS).all()
    empty = np.zeros((7, 6, 6, 6), np.uint8)
    empty[:, :3] = images.transpose(0, 3, 1, 2)
    assert (add_neighbourhood(empty, GROUPS, None, 1) == alone).all()


@pytest.mark.parametrize("preset", ["default", "strong", "report"])
def test_both_views_get_the_same_augmentation(preset):
    x = torch.rand(16, 3, 12, 12)
    both = create_augment(preset)(torch.cat([x, x], 1), torch.Generator().manual_seed(3))
    assert both.shape == (16, 6, 12, 12)
    torch.testing.assert_close(both[:, :3], both[:, 3:])
    # The same draws as the patch alone would get.
    alone = create_augment(preset)(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(both[:, :3], alone)


def test_dropped_neighbours_look_like_a_patch_without_a_place():
    from idcscope.data.neighbourhood import DropNeighbours
    from idcscope.data.preprocess import to_float

    images = _images(7, seed=2)
    placed = to_float(_view(images, neighbour_rows(GROUPS, XS, YS)))
    alone = to_float(_view(images, neighbour_rows(GROUPS, XS * np.nan, YS)))
    identity = lambda x, g: x  # noqa: E731
    kept = DropNeighbours(identity, 0.0, 1)(placed, torch.Generator().manual_seed(0))
    torch.testing.assert_close(kept, placed)
    dropped = DropNeighbours(identity, 1.0, 1)(placed, torch.Generator().manual_seed(0))
    torch.testing.assert_close(dropped, alone, atol=0.5 / 255, rtol=0)  # up to uint8 rounding
    # About p of the batch, drawn from the generator: the same draws give the same batch.
    big = placed.repeat(40, 1, 1, 1)
    some = DropNeighbours(identity, 0.25, 1)(big, torch.Generator().manual_seed(4))
    again = DropNeighbours(identity, 0.25, 1)(big, torch.Generator().manual_seed(4))
    torch.testing.assert_close(some, again)
    changed = (some != big).flatten(1).any(1)
    moved = (placed != alone).flatten(1).any(1).repeat(40)  # dropping moves these samples
    assert 0.15 < changed.sum() / moved.sum() < 0.35
    assert (some[:, :3] == big[:, :3]).all()  # the patch itself is never touched


@pytest.fixture(scope="module")
def nbhd_ckpt(trained_run, tmp_path_factory):
    """The shared run's model (the default recipe: it sees each patch's 3x3 neighbourhood),
    without logit smoothing on top."""
    from idcscope.models.checkpoint import read_checkpoint, update_checkpoint

    path = tmp_path_factory.mktemp("nbhd") / "best.pt"
    path.write_bytes((trained_run / "best.pt").read_bytes())
    config = read_checkpoint(path)["config"]
    assert (config["neighbourhood"], config["drop_neighbours"]) == (1, 0.2)
    return update_checkpoint(path, context={})


@pytest.fixture(scope="module")
def reference(nbhd_ckpt, synthetic_root):
    """P(IDC) of every patch by path (torch, fp32), each patient's patches seen together on
    their grid; and (``alone``) each patch without its place."""
    from idcscope.data.dataset import load_patch_data
    from idcscope.inference import Predictor

    data = load_patch_data(synthetic_root)
    rows = data.rows()
    coords = (data.table["x"].to_numpy(), data.table["y"].to_numpy())
    predictor = Predictor(nbhd_ckpt, "torch")
    paths = data.table["path"].to_numpy()[rows]
    ref = {
        "placed": dict(
            zip(
                paths,
                predictor.predict_proba(data.images, rows, data.patients, coords),
                strict=True,
            )
        ),
        "alone": dict(
            zip(paths, predictor.predict_proba(data.images, rows, data.patients), strict=True)
        ),
    }
    return data, rows, coords, ref


def test_the_checkpoint_describes_its_neighbourhood(nbhd_ckpt, reference):
    from idcscope.inference import Predictor
    from idcscope.models.checkpoint import read_checkpoint

    ckpt = read_checkpoint(nbhd_ckpt)
    assert ckpt["model"]["kwargs"]["in_chans"] == 6
    assert ckpt["preprocessing"]["neighbourhood"] == 1 and len(ckpt["preprocessing"]["mean"]) == 6
    data, rows, coords, ref = reference
    ref = ref["placed"]
    predictor = Predictor(nbhd_ckpt, "torch")
    # One patient alone gives its patches the scores they get among all patients.
    first = data.patients[rows] == data.patients[rows[0]]
    alone = predictor.predict_proba(data.images, rows[first], data.patients, coords)
    expected = np.array([ref[p] for p in data.table["path"].to_numpy()[rows[first]]])
    np.testing.assert_allclose(alone, expected, atol=1e-5)
    # Without their places the patches lose their neighbours, and their scores change.
    lost = predictor.predict_proba(data.images, rows, data.patients, None)
    assert np.abs(lost - np.array(list(ref.values()))).max() > 1e-3


def _assert_matches(paths, probs, ref, atol=1e-4):
    """Scores by file name (Kaggle names are unique: they carry the patient) match ``ref``."""
    from pathlib import Path

    by_name = {Path(p).name: v for p, v in ref.items()}
    expected = [by_name[Path(p).name] for p in paths]
    np.testing.assert_allclose(np.asarray(probs, dtype=np.float64), expected, atol=atol)


def test_every_entry_point_shows_the_model_the_neighbours(
    nbhd_ckpt, reference, synthetic_root, tmp_path
):
    import pandas as pd

    from idcscope.evaluation.evaluate import evaluate
    from idcscope.inference.explain import explain_patches
    from idcscope.inference.predict import predict
    from idcscope.spatial.heatmap import patient_heatmap

    data, rows, _, ref = reference
    ref = ref["placed"]
    evaluate(nbhd_ckpt, synthetic_root, tmp_path / "ev", n_boot=0)
    ev = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    _assert_matches(ev["path"], ev["prob_idc"], ref)
    for engine in ("torch", "onnx"):
        out = predict(nbhd_ckpt, [synthetic_root], engine=engine)
        _assert_matches(out["path"], out["prob_idc"], ref)

    patient = synthetic_root / str(data.patients[rows[0]])
    hm = patient_heatmap(nbhd_ckpt, patient, tmp_path / "hm")
    hm = pd.read_csv(hm["files"]["predictions"])
    _assert_matches(hm["path"], hm["prob_idc"], ref)
    # explain reads the places in the file names: a patient's patches see each other.
    files = sorted(patient.rglob("*.png"))
    shown = pd.DataFrame(explain_patches(nbhd_ckpt, files, tmp_path / "ex"))
    _assert_matches(shown["path"], shown["prob_idc"], ref)


def test_slide_tiles_see_their_neighbouring_tiles(nbhd_ckpt, reference, tmp_path):
    import pandas as pd

    from idcscope.spatial.heatmap import patient_mosaic
    from idcscope.spatial.slide import slide_inference
    from idcscope.spatial.wsi import write_tiff_slide

    data, rows, _, ref = reference
    one = rows[data.patients[rows] == data.patients[rows[0]]]
    t = data.table.iloc[one]
    mosaic, _ = patient_mosaic(data.images[one], t["x"], t["y"])
    slide = write_tiff_slide(mosaic, tmp_path / "s.tif", mpp=4.0)
    tiles = pd.read_csv(slide_inference(nbhd_ckpt, slide, tmp_path / "s")["files"]["tiles_csv"])
    # A tile whose block holds the same patches as its patch's block scores as the patch
    # (up to the stain statistics, fitted on the slide's tiles rather than the patches).
    col = (t["x"].to_numpy() - t["x"].min()) // 50
    row = (t["y"].to_numpy() - t["y"].min()) // 50
    patch_at = dict(zip(zip(row, col, strict=True), t["path"], strict=True))
    prob_at = dict(
        zip(zip(tiles["row"], tiles["col"], strict=True), tiles["prob_idc"], strict=True)
    )
    same = same_blocks(prob_at, patch_at)
    for cell in same:
        np.testing.assert_allclose(prob_at[cell], ref["placed"][patch_at[cell]], atol=1e-3)
    assert len(same) >= len(t) // 2


def test_no_context_scores_every_patch_alone(nbhd_ckpt, reference, synthetic_root, tmp_path):
    """--no-context: the patches' places are not used, neighbours included."""
    import pandas as pd

    from idcscope.evaluation.evaluate import evaluate
    from idcscope.inference import Predictor
    from idcscope.inference.predict import predict

    data, rows, coords, ref = reference
    alone = Predictor(nbhd_ckpt, "torch", context=False)
    prob = alone.predict_proba(data.images, rows, data.patients, coords)
    _assert_matches(data.table["path"].to_numpy()[rows], prob, ref["alone"], atol=1e-6)
    evaluate(nbhd_ckpt, synthetic_root, tmp_path / "ev", n_boot=0, context=False)
    ev = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    _assert_matches(ev["path"], ev["prob_idc"], ref["alone"])
    for engine in ("torch", "onnx"):
        out = predict(nbhd_ckpt, [synthetic_root], engine=engine, context=False)
        _assert_matches(out["path"], out["prob_idc"], ref["alone"])


@pytest.mark.parametrize("k", [1, 3, 5])
def test_few_patches_skip_numba_with_the_same_blocks(k, monkeypatch):
    """Up to ``SMALL`` patches the blocks are averaged by numpy (no numba to import when a
    few patches are scored): the same integer sums, so the same bytes."""
    import idcscope.data.neighbourhood as neighbourhood

    rng = np.random.default_rng(k)
    base = rng.integers(0, 256, (9, 6, 50, 50), dtype=np.uint8)
    nb = rng.integers(-1, 9, (9, k * k))  # -1: glass
    out = {}
    for how, limit in (("numpy", 10**9), ("numba", 0)):
        monkeypatch.setattr(neighbourhood, "SMALL", limit)
        out[how] = block_planes(base.copy(), nb)
    np.testing.assert_array_equal(out["numpy"], out["numba"])
    assert not np.array_equal(out["numpy"][:, 3:], base[:, 3:])


def test_neighbour_counts_say_how_much_context_a_patch_had():
    # A 3x3 block of one patient, a corner of it missing; one patch without a place; one
    # patch of another patient at a neighbouring place (patients never mix).
    xs = [0, 50, 100, 0, 50, 100, 0, 50, -1, 150]
    ys = [0, 0, 0, 50, 50, 50, 100, 100, -1, 0]
    groups = ["a"] * 9 + ["b"]
    counts = neighbour_counts(np.array(groups), np.array(xs, float), np.array(ys, float))
    np.testing.assert_array_equal(counts[:8], [3, 5, 3, 5, 7, 4, 3, 4])
    assert np.isnan(counts[8]) and counts[9] == 0
