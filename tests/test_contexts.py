"""Calibration and calls by scoring context (``training.contexts``) on scores the tests make."""

from __future__ import annotations

import crepes
import numpy as np
import pandas as pd
import pytest

from idcscope.evaluation.metrics import call_metrics, expected_calibration_error
from idcscope.models.schema import ModelMeta
from idcscope.training import contexts as cx


def _scores(n: int, seed: int, scale: float = 2.0, shift: float = 0.0):
    """Labels (30% IDC) and logit margins separating them at ``scale``, ``shift`` off."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    return y, scale * (2 * y - 1) + rng.normal(0, 1.5, n) + shift


@pytest.mark.parametrize("n", [7, 40, 501])
@pytest.mark.parametrize("level", [0.01, 0.05, 0.2, 0.5])
def test_conformal_bound_gives_crepes_prediction_sets(n, level):
    rng = np.random.default_rng(n)
    cal, test = rng.random(n).round(2), rng.random(300).round(2)  # ties included
    cc = crepes.ConformalClassifier().fit(cal)
    theirs = cc.predict_set(test[:, None], confidence=1 - level, smoothing=False)[:, 0]
    mine = test <= cx.conformal_bound(cal, level)
    np.testing.assert_array_equal(mine, theirs.astype(bool))


def test_band_keeps_each_class_error_among_the_decided_within_alpha():
    y, margin = _scores(20_000, 0)
    prob = 1 / (1 + np.exp(-margin))
    fit = cx.conformal_band(prob, y, 0.05)
    lo, hi = fit["band"]
    assert 0 < lo <= hi < 1
    for yy, pp in ((y, prob), _fresh(1)):  # the patients it was fitted on, and new ones
        call = np.where(pp >= hi, 1, np.where(pp < lo, 0, -1))
        m = call_metrics(yy, call)
        assert m["sensitivity_decided"] >= 0.95 - 0.01 and m["specificity_decided"] >= 0.94
        assert 0.3 < m["coverage"] < 0.95  # a real band: neither everything nor nothing
    # a plain class-conditional band at 0.05 would not do it: among the decided, more errors
    plain = np.where(prob >= 1 - cx.conformal_bound(1 - prob[y == 1], 0.05), 1, 0)
    assert call_metrics(y, plain)["sensitivity_decided"] < 0.95 + 0.001


def _fresh(seed):
    y, margin = _scores(20_000, seed)
    return y, 1 / (1 + np.exp(-margin))


def test_each_context_is_calibrated_on_its_own():
    # with neighbours: sharp scores; alone: half as sharp and shifted towards IDC
    y1, m1 = _scores(6000, 2, scale=3.0)
    y0, m0 = _scores(6000, 3, scale=1.0, shift=1.5)
    frame = pd.DataFrame({
        "label": np.r_[y1, y0], "margin": np.r_[m1, m0],
        "neighbours": np.r_[np.full(6000, 8.0), np.full(6000, np.nan)],
    })  # fmt: skip
    fit = cx.fit_decisions(frame, ("youden", None))
    assert [c["name"] for c in fit["contexts"]] == [c[0] for c in cx.CONTEXTS]
    decided = cx.decide(fit["contexts"], frame, fit["threshold"])
    lone = frame["neighbours"].isna().to_numpy()
    for labels, rows in ((y0, lone), (y1, ~lone)):
        assert expected_calibration_error(labels, decided["prob_idc"][rows]) < 0.02
    one = 1 / (1 + np.exp(-frame["margin"].to_numpy()))  # one calibration for both
    assert expected_calibration_error(y0, one[lone]) > 0.1
    # the lone context decides fewer of its patches: its scores say less
    assert (decided["call"][lone] >= 0).mean() < (decided["call"][~lone] >= 0).mean()
    # the model applies them as fitted
    meta = ModelMeta({}, [], {}, contexts=fit["contexts"], threshold=fit["threshold"])
    d = meta.decisions(frame["neighbours"].to_numpy())
    assert np.allclose(d.temperature[lone], fit["contexts"][0]["temperature"])
    assert np.allclose(d.temperature[~lone], fit["contexts"][-1]["temperature"])


def test_contexts_cover_every_neighbour_count():
    assert cx.context_index([np.nan, 0, 1, 3, 4, 6, 7, 8]).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    meta = ModelMeta({}, [], {}, contexts=[{"neighbours": [0, 6], "temperature": 1,
                                            "logit_bias": 0, "band": [0.2, 0.8]}])  # fmt: skip
    with pytest.raises(ValueError, match="miss"):
        meta.decisions(np.array([8.0]))


def test_cross_fitting_fits_each_fold_on_the_others():
    y, margin = _scores(3000, 4)
    frame = pd.DataFrame({
        "label": y, "margin": margin, "neighbours": 8.0, "fold": np.arange(3000) % 3,
        "patient": (np.arange(3000) // 100).astype(str),
    })  # fmt: skip
    out = cx.cross_fitted(frame, ("youden", None))
    assert out.index.equals(frame.index)
    for fold in range(3):
        mine = frame["fold"] == fold
        fit = cx.fit_decisions(frame[~mine], ("youden", None))
        expect = cx.decide(fit["contexts"], frame[mine], fit["threshold"])
        np.testing.assert_array_equal(out.loc[mine, "call"], expect["call"])
    r = cx.report(out.assign(pred=out["pred"]), n_boot=50)
    calls = {"coverage", "sensitivity_decided", "specificity_decided"}
    assert set(r["ci95"]) == {"auc", "ece"} | calls
    lo, hi = r["ci95"]["ece"]
    assert 0 <= lo <= hi <= 1


def _patients(n_patients: int, seed: int, missed: float = 0.0):
    """Labels (30% IDC), logit margins each patient shifts by its own offset, and folds;
    ``missed``: the share of IDC patches scored as benign ones are (a carcinoma the
    network does not see, or an outline drawn coarser than the patches)."""
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(n_patients), 200)
    y = (rng.random(len(pid)) < 0.3).astype(int)
    margin = 2.5 * (2 * y - 1) + rng.normal(0, 1.2, len(pid)) + rng.normal(0, 1.0, n_patients)[pid]
    missing = (y == 1) & (rng.random(len(pid)) < missed)
    return y, np.where(missing, margin - 5.0, margin), pid % 3


def _applied(c: dict, y: np.ndarray, margin: np.ndarray) -> dict:
    prob = 1 / (1 + np.exp(-(margin / c["temperature"] + c["logit_bias"])))
    return call_metrics(y, np.where(prob >= c["band"][1], 1, np.where(prob < c["band"][0], 0, -1)))


def test_the_band_is_held_to_alpha_on_patients_it_did_not_see():
    """A band exact on the patients it was fitted on errs more on new ones; the levels
    held out over the fit's folds keep new patients' error among the decided nearer alpha."""
    y, margin, folds = _patients(60, 5)
    exact = cx.fit_contexts(margin, y, np.full(len(y), 8.0), 0.05)[-1]
    held = cx.fit_contexts(margin, y, np.full(len(y), 8.0), 0.05, folds)[-1]
    assert min(held["target"]) < 0.05 and exact["target"] == [0.05, 0.05]
    new_y, new_margin, _ = _patients(300, 6)
    errors = {}
    for name, c in (("exact", exact), ("held", held)):
        m = _applied(c, new_y, new_margin)
        errors[name] = 1 - min(m["sensitivity_decided"], m["specificity_decided"])
    assert errors["held"] < errors["exact"]
    assert errors["held"] <= 0.05 + 0.01


def test_each_class_level_is_held_out_on_its_own():
    """Where some carcinoma scores as benign tissue does, narrowing the IDC level cannot
    undo those misses, and narrowing the no-IDC level with it (one share for both) only
    raises the edge where IDC is called: the levels held out apart decide more of the new
    patients' patches, as right among the decided (one share would need the narrower
    of the two for both)."""
    y, margin, folds = _patients(60, 7, missed=0.06)
    held = cx.fit_contexts(margin, y, np.full(len(y), 8.0), 0.05, folds)[-1]
    assert held["target"][0] != held["target"][1]
    both = dict(held, **cx.conformal_band(
        1 / (1 + np.exp(-(margin / held["temperature"] + held["logit_bias"]))), y,
        min(held["target"]),
    ))  # fmt: skip
    new_y, new_margin, _ = _patients(300, 8, missed=0.06)
    apart, one = _applied(held, new_y, new_margin), _applied(both, new_y, new_margin)
    assert apart["coverage"] > one["coverage"] + 0.1
    for m in (apart, one):
        assert min(m["sensitivity_decided"], m["specificity_decided"]) >= 0.95 - 0.01
