"""Temperature scaling on logits with known miscalibration, the report, and thresholds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from idcscope.evaluation.metrics import expected_calibration_error, youden_threshold
from idcscope.inference.calibration import probabilities
from idcscope.training.calibration import (
    T_BOUNDS,
    calibration_report,
    choose_threshold,
    fit_temperature,
)


def _calibrated(n: int = 20_000, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Two-class logits whose softmax is the true P(y = 1): calibrated by construction."""
    rng = np.random.default_rng(seed)
    margin = rng.normal(0.0, 2.0, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-margin))).astype(np.int64)
    logits = np.stack([-margin / 2, margin / 2], axis=1)
    return torch.tensor(logits, dtype=torch.float32), y


def test_recovers_the_temperature_of_overconfident_logits():
    logits, y = _calibrated()
    over = logits * 3  # overconfident: the fitted temperature should undo the factor
    t = fit_temperature(over, y)
    assert t == pytest.approx(3.0, rel=0.15)
    before, after = probabilities(over), probabilities(over, temperature=t)
    assert expected_calibration_error(y, after) < expected_calibration_error(y, before)


def test_calibrated_logits_keep_temperature_one():
    logits, y = _calibrated(seed=1)
    assert fit_temperature(logits, y) == pytest.approx(1.0, rel=0.1)
    # Arrays, tensors and positive-class margins give the same answer.
    margin = (logits[:, 1] - logits[:, 0]).numpy()
    assert fit_temperature(margin, y) == pytest.approx(fit_temperature(logits.numpy(), y))
    assert fit_temperature(logits, torch.from_numpy(y)) == pytest.approx(fit_temperature(logits, y))


def test_underconfident_logits_get_t_below_one():
    logits, y = _calibrated(seed=2)
    assert fit_temperature(logits / 2, y) == pytest.approx(0.5, rel=0.15)


@pytest.mark.parametrize(
    ("logits", "labels"),
    [
        (np.zeros((0, 2)), np.zeros(0)),  # empty
        (np.array([[0.0, 2.0], [1.0, -1.0]]), np.array([1, 1])),  # one class
        (np.array([[0.0, 2.0]]), np.array([0])),  # one sample
    ],
)
def test_degenerate_inputs_give_one(logits, labels):
    assert fit_temperature(logits, labels) == 1.0


def test_separable_data_sharpens_within_bounds():
    # All correct: the NLL falls as T shrinks until it underflows (at once for huge margins).
    logits = torch.tensor([[-1.0, 1.0], [1.0, -1.0]] * 50)
    for scale in (1.0, 5.0, 1e4):
        t = fit_temperature(logits * scale, np.array([1, 0] * 50))
        assert T_BOUNDS[0] <= t <= 1.0 and (t < 1.0 or scale > 100)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="0/1"):
        fit_temperature(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(np.array([[0.0, np.nan], [0.0, 1.0]]), np.array([0, 1]))
    with pytest.raises(ValueError, match="logits"):
        fit_temperature(np.zeros((2, 3)), np.array([0, 1]))


def test_calibration_report_improves_and_is_json_safe():
    logits, y = _calibrated(n=5000, seed=3)
    over = logits * 3
    t = fit_temperature(over, y)
    report = calibration_report(y, probabilities(over), probabilities(over, temperature=t))
    assert set(report) == {
        "n",
        "ece_before",
        "ece_after",
        "brier_before",
        "brier_after",
        "nll_before",
        "nll_after",
    }
    assert report["n"] == 5000
    for metric in ("ece", "brier", "nll"):
        assert report[f"{metric}_after"] < report[f"{metric}_before"]
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    # Hard 0/1 probabilities keep a finite log-likelihood.
    hard = calibration_report([0, 1], [1.0, 0.0], [0.0, 1.0])
    assert np.isfinite(hard["nll_before"]) and hard["nll_after"] < 1e-6


def test_choose_threshold():
    logits, y = _calibrated(n=2000, seed=4)
    p = probabilities(logits)
    assert choose_threshold(y, p) == youden_threshold(y, p)
    for target in (0.8, 0.95, 1.0):
        t = choose_threshold(y, p, "sensitivity", target=target)
        assert (p[y == 1] >= t).mean() >= target
    with pytest.raises(ValueError, match="target"):
        choose_threshold(y, p, "sensitivity")
    with pytest.raises(ValueError, match="choose from"):
        choose_threshold(y, p, "f1")


def test_platt_recovers_temperature_and_the_prior_of_balanced_training():
    from idcscope.training.calibration import fit_platt

    rng = np.random.default_rng(0)
    margin = rng.normal(0, 4, 20_000)
    y = (rng.random(margin.size) < 1 / (1 + np.exp(-(margin / 2 - 1)))).astype(int)
    t, b = fit_platt(margin, y)
    assert t == pytest.approx(2.0, rel=0.1) and b == pytest.approx(-1.0, abs=0.1)
    assert fit_platt(margin, np.ones_like(y)) == (1.0, 0.0)


def test_patches_scored_alone_take_the_lone_calibration(trained_run, synthetic_root, tmp_path):
    """A patch without a place gets the checkpoint's lone calibration, one with a place its
    calibration; a checkpoint without a lone one calibrates both alike."""
    from scipy.special import expit, logit

    from idcscope.data.dataset import load_patch_data
    from idcscope.inference import Predictor
    from idcscope.models.checkpoint import read_checkpoint, read_meta, update_checkpoint

    path = tmp_path / "best.pt"
    path.write_bytes((trained_run / "best.pt").read_bytes())
    plain = read_checkpoint(path)
    assert read_meta(path).calibrated(lone=True) == read_meta(path).calibrated()
    update_checkpoint(path, lone_calibration={"temperature": 2.5, "logit_bias": 0.7})
    t, b = read_meta(path).calibrated()
    assert (t, b) == (plain["temperature"], plain["logit_bias"])
    assert read_meta(path).calibrated(lone=True) == (2.5, 0.7)

    data = load_patch_data(synthetic_root)
    rows = data.rows()[:96]
    xs, ys = (data.table[c].to_numpy(np.float64) for c in "xy")
    lone = np.zeros(len(xs), bool)
    lone[rows[::3]] = True  # a third of them come without a place
    xs = np.where(lone, np.nan, xs)
    got = Predictor(path, precision="fp32").predict(data.images, rows, data.patients, (xs, ys))
    margin = logit(got.prob_uncalibrated)
    expected = np.where(lone[rows], expit(margin / 2.5 + 0.7), expit(margin / t + b))
    np.testing.assert_allclose(got.prob, expected, atol=1e-9)
    alone = Predictor(path, precision="fp32", context=False).predict(data.images, rows)
    np.testing.assert_allclose(alone.prob, expit(logit(alone.prob_uncalibrated) / 2.5 + 0.7))


def test_validation_and_oof_fits_are_the_one_posthoc_fit_as_before():
    """``posthoc`` (validation patients) and ``oof`` (out-of-fold predictions) fit through
    `fit_posthoc`: the same fields from the same margins, the numbers both gave before."""
    import dataclasses
    from pathlib import Path

    import pandas as pd

    from idcscope.data.dataset import PatchData
    from idcscope.training.config import TrainConfig
    from idcscope.training.oof import fit_decision
    from idcscope.training.posthoc import fit_on_validation

    rng = np.random.default_rng(7)
    n = 240
    margin = rng.normal(0.5, 3, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-margin / 2 + 0.8))).astype(int)
    logits = torch.from_numpy(np.stack([-margin / 2, margin / 2], 1).astype(np.float32))
    table = pd.DataFrame({"patient": "a", "x": 0, "y": 0, "label": y}, index=range(n))
    data = PatchData(Path(), "flat", table, np.zeros((n, 1)), np.ones(n, bool), [], 0, n)
    val = np.arange(40, n)
    exact = (logits[:, 1].double() - logits[:, 0].double()).numpy()[val]
    before = {  # fit_on_validation and oof.fit_decision before they shared fit_posthoc
        "youden": (1.971703700607845, -1.0377949363897936, 0.3842188044275916),
        "sensitivity": (1.971703700607845, -1.0377949363897936, 0.14363009136102664),
    }
    for method, (t, b, threshold) in before.items():
        cfg = dataclasses.replace(
            TrainConfig(), context="none", threshold=method, target_sensitivity=0.95
        )
        fields, prob = fit_on_validation(logits[val], data, val, cfg)
        oof = fit_decision(exact, y[val], cfg)
        named = "youden" if method == "youden" else "sensitivity 0.95"
        assert fields["threshold_method"] == f"{named} on validation patients"
        assert oof["threshold_method"] == f"{named} on out-of-fold predictions of 200 patches"
        for key in ("temperature", "logit_bias", "threshold", "calibration"):
            assert fields[key] == oof[key]
        assert fields["temperature"] == pytest.approx(t, rel=1e-9)
        assert fields["logit_bias"] == pytest.approx(b, rel=1e-9)
        assert fields["threshold"] == pytest.approx(threshold, rel=1e-9)
        assert fields["calibration"]["nll_after"] == pytest.approx(0.4991093244220029, rel=1e-9)
        assert fields["context"] == {"sigma": 0.0, "step": 50}
        np.testing.assert_allclose(prob, probabilities(exact, t, b), rtol=1e-9)
    empty, prob = fit_on_validation(logits[:0], data, val[:0], TrainConfig())
    assert (empty["temperature"], empty["logit_bias"], empty["threshold"]) == (1.0, 0.0, 0.5)
    assert empty["calibration"] == empty["val_metrics"] == {} and prob.size == 0
