import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from idcscope.evaluation.metrics import (
    binary_metrics,
    bootstrap_ci,
    classification_report_text,
    expected_calibration_error,
    per_patient_metrics,
    reliability_curve,
    summarize,
    threshold_for_sensitivity,
    youden_threshold,
)

Y = np.array([0, 0, 0, 0, 1, 1, 1])
P = np.array([0.1, 0.4, 0.6, 0.2, 0.7, 0.3, 0.9])


def _no_nan(obj):
    """JSON round trip with allow_nan=False fails on any NaN or inf."""
    return json.loads(json.dumps(obj, allow_nan=False)) == obj


def _random_scores(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1)


def test_binary_metrics_hand_computed():
    m = binary_metrics(Y, P)
    # pred = [0,0,1,0,1,0,1]: tn=3, fp=1, fn=1, tp=2
    assert m["confusion_matrix"] == [[3, 1], [1, 2]]
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    # 12 positive/negative pairs; ranked correctly: 0.7 and 0.9 beat all 4, 0.3 beats 0.1 and 0.2
    assert m["auc"] == pytest.approx(10 / 12)
    assert m["n"] == 7
    assert m["n_positive"] == 3
    assert m["majority_baseline_accuracy"] == pytest.approx(4 / 7)
    assert m["brier"] == pytest.approx(np.mean((P - Y) ** 2))
    assert m["threshold"] == 0.5
    assert _no_nan(m)


def test_binary_metrics_match_sklearn():
    y, p = _random_scores()
    m = binary_metrics(y, p, threshold=0.6)
    pred = p >= 0.6
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(y, p))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()


def test_threshold_is_inclusive():
    m = binary_metrics([0, 1], [0.5, 0.5], threshold=0.5)
    assert m["confusion_matrix"] == [[0, 1], [0, 1]]


@pytest.mark.filterwarnings("error")
def test_binary_metrics_single_class():
    m = binary_metrics([0, 0, 0], [0.1, 0.7, 0.2])
    assert m["auc"] is None
    assert m["pr_auc"] is None
    assert m["recall"] == 0.0
    assert m["precision"] == 0.0
    assert m["f1"] == 0.0
    assert m["specificity"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)  # only the class present counts
    assert m["majority_baseline_accuracy"] == 1.0
    assert _no_nan(m)

    m = binary_metrics([1, 1], [0.9, 0.8])
    assert m["auc"] is None
    assert m["pr_auc"] == pytest.approx(1.0)
    assert m["specificity"] == 0.0


@pytest.mark.filterwarnings("error")
def test_binary_metrics_all_predicted_positive_and_none():
    m = binary_metrics(Y, np.ones(7))
    assert m["confusion_matrix"] == [[0, 4], [0, 3]]
    assert m["recall"] == 1.0
    assert m["specificity"] == 0.0
    assert m["precision"] == pytest.approx(3 / 7)
    assert m["auc"] == pytest.approx(0.5)
    m = binary_metrics(Y, np.zeros(7))
    assert m["precision"] == 0.0
    assert m["f1"] == 0.0
    assert _no_nan(m)


@pytest.mark.parametrize(
    ("y", "p"),
    [([0, 1], [0.1]), ([], []), ([0, 2], [0.1, 0.2]), ([0, 1], [0.1, float("nan")])],
)
def test_binary_metrics_rejects_bad_input(y, p):
    with pytest.raises(ValueError):  # noqa: PT011
        binary_metrics(y, p)


def test_per_patient_metrics():
    y = [1, 0, 1, 1, 0, 0, 1]
    p = [0.8, 0.3, 0.4, 0.9, 0.6, 0.2, 0.7]
    patients = [10, 10, 10, 9, 9, 2, 2]
    rows = per_patient_metrics(y, p, patients)
    # sorted as strings: "10" < "2" < "9"
    assert [r["patient"] for r in rows] == ["10", "2", "9"]
    r10, r2, r9 = rows
    assert r10["n"] == 3
    assert r10["n_positive"] == 2
    assert r10["auc"] == pytest.approx(1.0)
    assert r10["sensitivity"] == pytest.approx(0.5)
    assert r10["specificity"] == 1.0
    assert r10["accuracy"] == pytest.approx(2 / 3)
    assert r10["mean_prob_negative"] == pytest.approx(0.3)
    assert r10["mean_prob_positive"] == pytest.approx(0.6)
    assert r9["specificity"] == 0.0
    assert r2["auc"] == pytest.approx(1.0)
    assert _no_nan(rows)


def test_per_patient_metrics_single_class_patient():
    rows = per_patient_metrics([0, 0, 1, 1], [0.2, 0.6, 0.7, 0.1], ["a", "a", "b", "b"])
    a, b = rows
    assert a["auc"] is None
    assert a["sensitivity"] is None
    assert a["mean_prob_positive"] is None
    assert a["specificity"] == pytest.approx(0.5)
    assert b["specificity"] is None
    assert b["mean_prob_negative"] is None
    assert b["sensitivity"] == pytest.approx(0.5)
    assert _no_nan(rows)


def test_youden_threshold():
    # 0.6 separates the classes perfectly, so J = 1 exactly there.
    y = [0, 0, 0, 1, 1, 1]
    p = [0.1, 0.3, 0.5, 0.6, 0.8, 0.95]
    assert youden_threshold(y, p) == pytest.approx(0.6)
    t = youden_threshold(Y, P)
    assert 0.0 <= t <= 1.0
    m = binary_metrics(Y, P, threshold=t)
    # No other observed score gives a larger J.
    youden = [binary_metrics(Y, P, threshold=s) for s in P]
    best = max(r["recall"] + r["specificity"] for r in youden)
    assert m["recall"] + m["specificity"] == pytest.approx(best)


def test_youden_threshold_undefined_and_finite():
    assert youden_threshold([1, 1, 1], [0.2, 0.4, 0.9]) == 0.5
    # An inverted classifier has J <= 0 everywhere; the inf threshold must not leak out.
    t = youden_threshold([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9])
    assert math.isfinite(t)
    assert 0.0 <= t <= 1.0


def test_threshold_for_sensitivity():
    y = [1] * 10 + [0] * 3
    p = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.3, 0.2, 0.1]
    # 7/10 positives at >= 0.65, and 0.7 * 10 is 7.000000000000001 in floats.
    assert threshold_for_sensitivity(y, p, 0.7) == pytest.approx(0.65)
    assert threshold_for_sensitivity(y, p, 0.71) == pytest.approx(0.6)
    assert threshold_for_sensitivity(y, p, 1.0) == pytest.approx(0.5)
    assert threshold_for_sensitivity(y, p, 0.0) == 1.0


def test_threshold_for_sensitivity_is_highest_meeting_target():
    y, p = _random_scores(500, seed=3)
    for target in (0.5, 0.8, 0.95):
        t = threshold_for_sensitivity(y, p, target)
        assert binary_metrics(y, p, threshold=t)["recall"] >= target
        assert binary_metrics(y, p, threshold=np.nextafter(t, 2))["recall"] < target


def test_threshold_for_sensitivity_errors():
    with pytest.raises(ValueError, match="positive"):
        threshold_for_sensitivity([0, 0], [0.1, 0.2], 0.9)
    with pytest.raises(ValueError, match="target"):
        threshold_for_sensitivity([0, 1], [0.1, 0.2], 1.5)


def test_classification_report_text():
    text = classification_report_text([0, 0, 0], [0, 0, 1])
    assert "no_idc" in text
    assert "idc" in text
    text = classification_report_text(Y, P >= 0.5, class_names=("benign", "IDC"))
    assert "benign" in text
    assert "0.667" in text  # precision and recall of IDC


def test_ece_calibrated_vs_miscalibrated():
    rng = np.random.default_rng(0)
    p = rng.random(50_000)
    y = (rng.random(p.size) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.02
    # Overconfident model: pushes probabilities toward 0 and 1.
    over = np.where(p > 0.5, 1.0, 0.0) * 0.98 + 0.01
    assert expected_calibration_error(y, over) > 0.2


def test_ece_hand_computed():
    # Two bins with n_bins=2: [0.2, 0.4] has mean 0.3 and frequency 0.5; [0.9] has 0.9 vs 1.
    y = [0, 1, 1]
    p = [0.2, 0.4, 0.9]
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(2 / 3 * 0.2 + 1 / 3 * 0.1)


def test_reliability_curve():
    curve = reliability_curve([0, 1, 1, 1], [0.0, 0.2, 0.9, 1.0], n_bins=4)
    assert curve["counts"] == [2, 0, 0, 2]  # 1.0 falls in the last bin
    assert curve["bin_centers"] == pytest.approx([0.125, 0.375, 0.625, 0.875])
    assert curve["mean_predicted"][0] == pytest.approx(0.1)
    assert curve["mean_predicted"][1] is None
    assert curve["observed_frequency"] == [0.5, None, None, 1.0]
    assert len(curve["bin_edges"]) == 5
    assert _no_nan(curve)


def test_bootstrap_ci_contains_point_estimate():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(40), 25)
    y = rng.integers(0, 2, groups.size)
    p = np.clip(0.35 * y + 0.65 * rng.random(groups.size), 0, 1)

    def auc(yy, pp):
        return binary_metrics(yy, pp)["auc"]

    low, high = bootstrap_ci(y, p, groups, auc, n_boot=200, seed=0)
    point = auc(y, p)
    assert low < point < high
    assert high - low < 0.2
    assert bootstrap_ci(y, p, groups, auc, n_boot=200, seed=0) == (low, high)  # seeded


def test_bootstrap_resamples_whole_groups():
    # Group g has g + 1 samples, all scored g / 10, so each resample must hold multiples.
    sizes = np.arange(1, 6)
    groups = np.repeat(np.arange(5), sizes)
    p = groups / 10
    y = np.zeros(groups.size, dtype=int)
    seen = []

    def record(yy, pp):
        seen.append(pp.copy())
        values, counts = np.unique(np.round(pp * 10).astype(int), return_counts=True)
        assert all(c % sizes[v] == 0 for v, c in zip(values, counts, strict=True))
        return float(pp.mean())

    bootstrap_ci(y, p, groups, record, n_boot=50, seed=0)
    assert len(seen) == 50
    # Resampled sizes vary, which a patch-level bootstrap (always n samples) would not do.
    assert len({s.size for s in seen}) > 1


def test_bootstrap_skips_undefined():
    groups = np.arange(6)
    y = np.array([0, 0, 0, 0, 0, 1])
    p = np.linspace(0, 1, 6)
    calls = []

    def metric(yy, pp):
        calls.append(1)
        return None if yy.sum() == 0 else float(yy.mean())

    low, high = bootstrap_ci(y, p, groups, metric, n_boot=100, seed=0)
    assert len(calls) == 100
    assert 0 < low <= high <= 1
    assert bootstrap_ci(y, p, groups, lambda *_: None, n_boot=10) == (None, None)


def test_summarize():
    s = summarize([0.5, None, 0.7, float("nan"), 0.9])
    assert s["mean"] == pytest.approx(0.7)
    assert s["std"] == pytest.approx(0.2)  # sample std of 0.5, 0.7, 0.9
    assert s["min"] == 0.5
    assert s["max"] == 0.9
    assert s["n"] == 3
    assert summarize([0.8])["std"] == 0.0
    assert summarize([None]) == {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    assert _no_nan(s)


def test_rank_auc_equals_scikit_learn_with_ties_and_is_none_for_one_class():
    from sklearn.metrics import roc_auc_score

    from idcscope.evaluation.metrics import rank_auc

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 500), np.round(rng.random(500), 1)  # many ties
    assert rank_auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert rank_auc(np.ones(5), np.arange(5)) is None
