"""Spatial context: logits averaged over the patient's patch grid, width fitted on validation."""

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from idcscope.data.grid import smooth as smooth_logits
from idcscope.data.grid import smooth_rows
from idcscope.training.calibration import fit_sigma


def blob_patients(n_patients=2, side=24, noise=2.0, seed=0, shuffle_labels=False):
    """Patients on a side x side grid with one round IDC region each, and noisy logits."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:side, :side]
    xs, ys, groups, labels = [], [], [], []
    for p in range(n_patients):
        centre = rng.uniform(side * 0.3, side * 0.7, 2)
        label = ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < (side / 4) ** 2).ravel()
        xs.append(cols.ravel() * 50 + 1)  # Kaggle coordinates: 1, 51, 101, ...
        ys.append(rows.ravel() * 50 + 1)
        groups.append(np.full(side * side, f"p{p}"))
        labels.append(rng.permutation(label) if shuffle_labels else label)
    xs, ys, groups = np.concatenate(xs), np.concatenate(ys), np.concatenate(groups)
    y = np.concatenate(labels).astype(int)
    margin = (2 * y - 1) + rng.normal(0, noise, len(y))
    logits = np.stack([-margin / 2, margin / 2], axis=1)
    return logits, y, groups, xs.astype(float), ys.astype(float)


def test_width_zero_is_the_patch_alone():
    logits, _, groups, xs, ys = blob_patients()
    np.testing.assert_array_equal(smooth_logits(logits, groups, xs, ys, 0.0), logits)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_a_constant_map_stays_constant_up_to_the_tissue_edge(sigma):
    """Weights are normalised over cells with a patch: glass and edges pull nothing."""
    _, _, groups, xs, ys = blob_patients(n_patients=1)
    keep = np.random.default_rng(1).random(len(xs)) < 0.6  # ragged tissue with holes
    values = np.full((int(keep.sum()), 2), [-0.7, 2.5])
    out = smooth_logits(values, groups[keep], xs[keep], ys[keep], sigma)
    np.testing.assert_allclose(out, values)


def test_patients_never_mix_and_unplaced_patches_keep_their_own_score():
    # Two patients on the same coordinates, opposite scores: each stays its own.
    xs, ys = np.array([1.0, 51, 1, 51, -1, np.nan]), np.array([1.0, 1, 1, 1, -1, 5])
    groups = np.array(["a", "a", "b", "b", "a", "a"])
    values = np.array([3.0, 1.0, -3.0, -1.0, 9.0, 7.0])
    out = smooth_logits(values, groups, xs, ys, 1.0)
    assert 1.0 < out[1] < out[0] < 3.0 and out[0] + out[1] == pytest.approx(4.0)  # pulled
    assert -3.0 < out[2] < out[3] < -1.0 and out[2] + out[3] == pytest.approx(-4.0)
    assert out[4] == 9.0 and out[5] == 7.0  # no coordinates: the patch alone


def test_far_apart_patches_do_not_reach_each_other():
    values = np.array([[0.0, 1.0], [0.0, -1.0]])
    xs, ys = np.array([1.0, 1 + 50 * 20]), np.array([1.0, 1.0])  # 20 cells apart
    np.testing.assert_array_equal(smooth_logits(values, np.zeros(2), xs, ys, 2.0), values)


def test_smoothing_recovers_regions_from_noisy_patch_scores():
    logits, y, groups, xs, ys = blob_patients(noise=2.0)
    before = roc_auc_score(y, logits[:, 1])
    sigma, losses = fit_sigma(logits, y, groups, xs, ys)
    after = roc_auc_score(y, smooth_logits(logits, groups, xs, ys, sigma)[:, 1])
    assert sigma >= 1.0 and losses[sigma] < losses[0.0]
    assert before < 0.8 and after > 0.95


def test_fit_keeps_the_patch_alone_when_neighbours_carry_no_information():
    # Labels shuffled over the grid: a neighbour's label says nothing about a patch's.
    logits, y, groups, xs, ys = blob_patients(noise=0.5, shuffle_labels=True)
    sigma, losses = fit_sigma(logits, y, groups, xs, ys)
    assert sigma == 0.0 and losses[0.0] == min(losses.values())


def test_smooth_rows_applies_a_checkpoints_context():
    logits, _, groups, xs, ys = blob_patients(n_patients=2)
    out = smooth_rows(logits, groups, (xs, ys), {"sigma": 1.0, "step": 50})
    np.testing.assert_allclose(out, smooth_logits(logits, groups, xs, ys, 1.0))
    same = smooth_rows(logits, groups, (xs, ys), {"sigma": 0.0, "step": 50})
    np.testing.assert_array_equal(same, logits)
    assert smooth_rows(logits, groups, None, {"sigma": 1.0}) is logits  # no places: as is


# ----------------------------------------------------------------------------- in use


@pytest.fixture(scope="module")
def context_ckpt(trained_run, tmp_path_factory):
    """The shared run's checkpoint with a known context width and temperature 1."""
    from idcscope.models.checkpoint import update_checkpoint

    path = tmp_path_factory.mktemp("context") / "best.pt"
    path.write_bytes((trained_run / "best.pt").read_bytes())
    # The run's own temperature and bias stay: calibration commutes with the smoothing.
    return update_checkpoint(path, context={"sigma": 1.5, "step": 50})


@pytest.fixture(scope="module")
def unsmoothed_ckpt(context_ckpt, tmp_path_factory):
    """The same model without spatial context: what the smoothing starts from. (The
    neighbourhood input stays; ``context=False`` would drop it too.)"""
    from idcscope.models.checkpoint import update_checkpoint

    path = tmp_path_factory.mktemp("unsmoothed") / "best.pt"
    path.write_bytes(context_ckpt.read_bytes())
    return update_checkpoint(path, context={})


# Tolerances from the arithmetic, not from one CPU. A logit in fp32 carries a relative
# rounding error of about 1e-7 per operation; the few thousand accumulations of a forward
# pass, summed in whatever order a kernel (AVX2, AVX-512, AMX, ONNX Runtime) picks, leave up
# to ~1e-5 of the logit's scale. P(IDC) = expit(logit) moves by p(1 - p) times that, and
# the tables write P to 6 decimals (5e-7).
LOGIT_RTOL = 1e-5
CSV_ROUNDING = 5e-7


def prob_tolerance(prob, logit):
    prob, logit = np.asarray(prob, np.float64), np.asarray(logit, np.float64)
    return prob * (1 - prob) * LOGIT_RTOL * (1 + np.abs(logit)) + CSV_ROUNDING


def smoothed_from_alone(prob, groups, xs, ys, sigma=1.5):
    """What context must give: the patch-alone logits smoothed (temperature and bias commute
    with the smoothing, whose weights sum to 1, so probabilities suffice). ``prob`` must be
    the unrounded scores: a neighbour written as 0.000000 has lost its logit."""
    from scipy.special import expit, logit

    return expit(smooth_logits(logit(np.asarray(prob, np.float64)), groups, xs, ys, sigma))


def assert_smoothed(with_context, alone, groups, xs, ys, alone_rounded=False):
    """``with_context`` (as written: 6 decimals) is ``alone`` smoothed. With
    ``alone_rounded``, ``alone`` was written to 6 decimals too: each neighbour's logit is
    then off by up to 5e-7 / (q (1 - q)), and the smoothing's weighted mean of those bounds
    (weights >= 0, summing to 1) bounds the error it carries over."""
    from scipy.special import logit

    expected = smoothed_from_alone(alone, groups, xs, ys)
    with_context = np.asarray(with_context, np.float64)
    err = np.abs(with_context - expected)
    tol = prob_tolerance(expected, logit(expected))
    if alone_rounded:
        q = np.asarray(alone, np.float64)
        carried = smooth_logits(CSV_ROUNDING / np.maximum(q * (1 - q), 1e-300), groups, xs, ys, 1.5)
        tol = tol + expected * (1 - expected) * carried
    assert (err <= tol).all(), f"max error/tolerance {np.max(err / tol):.2f}"
    assert np.abs(with_context - alone).max() > 100 * tol.max()  # it does move scores
    assert np.std(with_context) < np.std(alone)  # and evens out patch-to-patch noise


def test_predictor_smooths_each_patients_logits_over_its_grid(
    context_ckpt, unsmoothed_ckpt, synthetic_root
):
    from idcscope.data.dataset import load_patch_data
    from idcscope.inference import Predictor

    data = load_patch_data(synthetic_root)
    rows, t = data.rows(), data.table
    coords = (t["x"].to_numpy(), t["y"].to_numpy())
    with_context = Predictor(context_ckpt, precision="fp32")
    alone = Predictor(unsmoothed_ckpt, precision="fp32")
    assert (with_context.context_sigma, alone.context_sigma) == (1.5, 0.0)
    p_alone = alone.predict_proba(data.images, rows, data.patients, coords)
    p_ctx = with_context.predict_proba(data.images, rows, data.patients, coords)
    assert_smoothed(p_ctx, p_alone, data.patients[rows], coords[0][rows], coords[1][rows])
    no_places = with_context.predict_proba(data.images, rows, data.patients)
    np.testing.assert_array_equal(no_places, alone.predict_proba(data.images, rows, data.patients))


def test_evaluate_predict_and_heatmap_use_the_patches_places(
    context_ckpt, unsmoothed_ckpt, synthetic_root, tmp_path
):
    """Each entry point's table, with context, is the same engine's unrounded patch-alone
    scores smoothed over the grid."""
    import pandas as pd

    from idcscope.data.dataset import load_patch_data
    from idcscope.evaluation.evaluate import evaluate
    from idcscope.inference import Predictor
    from idcscope.inference.predict import predict
    from idcscope.spatial.heatmap import patient_heatmap

    data = load_patch_data(synthetic_root)
    t = data.table
    coords = (t["x"].to_numpy(), t["y"].to_numpy())
    unrounded = {}  # engine -> file name -> P(IDC) of the patch alone, as the engine computes it
    for engine in ("torch", "onnx"):
        prob = Predictor(unsmoothed_ckpt, engine).predict_proba(
            data.images, data.rows(), data.patients, coords
        )
        unrounded[engine] = pd.Series(prob, index=[Path(p).name for p in t["path"]])

    def check(table: pd.DataFrame, engine: str, groups=None) -> None:
        alone = unrounded[engine].reindex([Path(p).name for p in table["path"]]).to_numpy()
        groups = table["patient"] if groups is None else groups
        assert_smoothed(table["prob_idc"], alone, groups, table["x"], table["y"])

    m = evaluate(context_ckpt, synthetic_root, tmp_path / "ev", n_boot=0, engine="torch")
    assert m["context_sigma"] == 1.5
    check(pd.read_csv(tmp_path / "ev" / "predictions.csv", dtype={"patient": str}), "torch")
    m = evaluate(unsmoothed_ckpt, synthetic_root, tmp_path / "ev0", n_boot=0, engine="torch")
    assert m["context_sigma"] == 0.0

    for engine in ("torch", "onnx"):
        check(predict(context_ckpt, [synthetic_root], engine=engine), engine)

    # the patient whose scores vary most: there smoothing must visibly move them
    spread = unrounded["torch"].groupby(data.patients[data.rows()]).std()
    patient = synthetic_root / spread.idxmax()
    ctx = patient_heatmap(Predictor(context_ckpt, "torch"), patient, tmp_path / "hm")
    alone = patient_heatmap(Predictor(unsmoothed_ckpt, "torch"), patient, tmp_path / "hm0")
    assert (ctx["context_sigma"], alone["context_sigma"]) == (1.5, 0.0)
    ctx = pd.read_csv(ctx["files"]["predictions"])
    check(ctx, "torch", groups=np.zeros(len(ctx)))


def test_slide_tiles_are_smoothed_over_the_tile_grid(
    context_ckpt, unsmoothed_ckpt, synthetic_root, tmp_path
):
    import pandas as pd

    from idcscope.data.dataset import load_patch_data
    from idcscope.spatial.heatmap import patient_mosaic
    from idcscope.spatial.slide import slide_inference
    from idcscope.spatial.wsi import write_tiff_slide

    data = load_patch_data(synthetic_root)
    # the patient with the most even mix of classes: its scores vary, so smoothing moves them
    mix = {p: abs(data.labels[data.patients == p].mean() - 0.5) for p in set(data.patients)}
    one = data.rows(data.patients == min(mix, key=mix.get))
    t = data.table.iloc[one]
    mosaic, _ = patient_mosaic(data.images[one], t["x"], t["y"])
    slide = write_tiff_slide(mosaic, tmp_path / "s.tif", mpp=4.0)
    alone = slide_inference(unsmoothed_ckpt, slide, tmp_path / "a")
    ctx = slide_inference(context_ckpt, slide, tmp_path / "c")
    assert ctx["context_sigma"] == 1.5
    a, c = (pd.read_csv(s["files"]["tiles_csv"]) for s in (alone, ctx))
    assert (a[["row", "col"]] == c[["row", "col"]]).all().all()
    xs, ys = a["col"] * 50, a["row"] * 50
    assert_smoothed(c["prob_idc"], a["prob_idc"], np.zeros(len(a)), xs, ys, alone_rounded=True)
