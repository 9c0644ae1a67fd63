"""Recipes compared paired by patient over repeated runs (``training.selection``)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from idcscope.errors import IdcscopeError
from idcscope.training import selection
from tests.test_calibrate import _oof


def _run(n_patients: int, sharpness: float, seed: int, per_patient: int = 60) -> pd.DataFrame:
    """Decided predictions of one run: patients with 30% IDC, P(IDC) separating the
    classes at ``sharpness`` plus noise drawn by ``seed`` (the training's luck)."""
    rng = np.random.default_rng(seed)
    patient = np.repeat([f"p{i}" for i in range(n_patients)], per_patient)
    y = (np.random.default_rng(1).random(len(patient)) < 0.3).astype(int)  # one truth
    margin = sharpness * (2 * y - 1) + rng.normal(0, 1.5, len(y))
    prob = 1 / (1 + np.exp(-margin))
    call = np.where(prob > 0.9, 1, np.where(prob < 0.1, 0, -1))
    return pd.DataFrame({
        "patient": patient, "label": y, "prob_idc": prob, "pred": (prob >= 0.5).astype(int),
        "call": call, "cohort": "context/data",
    })  # fmt: skip


def _row(table: pd.DataFrame, metric: str) -> pd.Series:
    return table[table["metric"] == metric].iloc[0]


def test_a_run_against_itself_differs_by_nothing():
    run = _run(20, 1.5, 0)
    table = selection.compare([run], [run.copy()], n_boot=50)
    assert set(table["metric"]) == set(selection.METRICS)
    assert np.allclose(table["delta"], 0) and np.allclose(table["se_patients"], 0)
    assert set(table["verdict"]) == {"within noise"}


def test_a_clearly_sharper_recipe_is_better_and_a_duller_one_worse():
    base = [_run(40, 1.0, s) for s in (0, 1)]
    sharper = [_run(40, 2.5, s) for s in (2, 3)]
    table = selection.compare(base, sharper, n_boot=100)
    auc = _row(table, "auc")
    assert auc["verdict"] == "better" and auc["ci_low"] > 0 and auc["delta"] > 0.05
    assert auc["runs"] == "2 vs 2" and auc["seed_df"] == 2 and auc["patients"] == 40
    assert _row(selection.compare(sharper, base, n_boot=100), "auc")["verdict"] == "worse"


def test_the_spread_between_runs_widens_the_interval():
    # the same gap in means, once from one run each, once from runs that disagree a lot
    base, cand = _run(40, 1.5, 0), _run(40, 1.7, 1)
    alone = _row(selection.compare([base], [cand], n_boot=100), "auc")
    lucky = [_run(40, s, 10 + i) for i, s in enumerate((0.8, 2.2))]  # one recipe, two runs
    noisy = _row(selection.compare([base], [cand], noise=[lucky], n_boot=100), "auc")
    assert noisy["delta"] == pytest.approx(alone["delta"])
    assert alone["sd_seed"] == 0 and noisy["sd_seed"] > 0.02 and noisy["seed_df"] == 1
    assert noisy["ci_high"] - noisy["ci_low"] > 2 * (alone["ci_high"] - alone["ci_low"])


def _seeded(sharpness: float, seeds=(0, 1, 2), tag: bool = True) -> list[pd.DataFrame]:
    runs = [_run(40, sharpness, s) for s in seeds]
    for s, run in zip(seeds, runs, strict=True):
        run.attrs["seeds"] = (0, s) if tag else None  # (fold seed, training seed), as load_run
    return runs


def test_runs_of_the_same_seeds_are_paired_and_resolve_a_gain_the_seeds_luck_hides():
    # each seed's luck is shared by both recipes: the candidate is a little better under
    # every seed, by less than the seeds differ from each other
    paired = _row(selection.compare(_seeded(1.5), _seeded(1.6)[::-1], n_boot=100), "auc")
    loose = _row(selection.compare(_seeded(1.5, tag=False), _seeded(1.6, tag=False)), "auc")
    assert paired["delta"] == pytest.approx(loose["delta"]) and paired["delta"] > 0
    assert paired["runs"] == "3 vs 3, paired" and paired["seed_df"] == 2
    assert paired["verdict"] == "better" and loose["verdict"] == "within noise"
    assert loose["sd_seed"] > 3 * paired["sd_seed"]
    # other seeds, or one seed twice, are not paired
    assert (
        "paired"
        not in _row(selection.compare(_seeded(1.5), _seeded(1.6, (3, 4, 5))), "auc")["runs"]
    )
    assert (
        "paired"
        not in _row(selection.compare(_seeded(1.5, (0, 0)), _seeded(1.6, (0, 0))), "auc")["runs"]
    )


def test_a_few_seeds_widen_the_interval_as_a_t_quantile_does():
    assert selection._t95(0.01, 0.0, 0) == pytest.approx(1.959964)
    assert selection._t95(0.01, 0.01, 2) == pytest.approx(4.303, abs=1e-3)  # all from seeds
    assert 1.96 < selection._t95(0.02, 0.01, 2) < 2.05  # mostly the patients' noise: df 32


def test_a_patient_bootstrap_draw_takes_each_drawn_patient_whole():
    run = _run(5, 1.5, 0, per_patient=7).iloc[::-1]  # rows not in patient order
    patients = np.array(sorted(set(run["patient"])))
    draw = np.array([3, 3, 0, 4])
    naive = pd.concat([run[run["patient"] == patients[i]] for i in draw])
    assert selection._Draws(run, patients).values(draw) == pytest.approx(
        selection.cohort_values(naive), nan_ok=True
    )


def test_runs_of_other_patients_are_not_compared():
    with pytest.raises(IdcscopeError, match="other patients"):
        selection.compare([_run(20, 1.5, 0)], [_run(21, 1.5, 0)], n_boot=10)


def _cv_folder(path, seed: int, train_seed: int = 2):
    """A finished cv folder: OOF predictions drawn by ``seed``, run under ``train_seed``."""
    path.mkdir()
    _oof(path / "oof_predictions.csv", seed=seed)
    cv = {"config": {"threshold": "youden", "seed": train_seed}, "fold_seed": 7}
    (path / "cv.json").write_text(json.dumps(cv))
    return path


def test_cv_folders_load_decided_and_ensemble_on_their_common_rows(tmp_path):
    a, b = _cv_folder(tmp_path / "a", 0), _cv_folder(tmp_path / "b", 0)
    run = selection.load_run(a)
    assert {"prob_idc", "pred", "call", "cohort"} <= set(run.columns)
    assert set(run["cohort"]) == {"context/data", "lone/data"}
    assert run.attrs["seeds"] == (7, 2)  # what runs of two recipes are paired by
    both = selection.load_ensemble([a, b])  # the same margins twice: the same decisions
    np.testing.assert_allclose(both.sort_values(["path", "scored", "margin"])["prob_idc"],
                               run.sort_values(["path", "scored", "margin"])["prob_idc"])  # fmt: skip
    with pytest.raises(IdcscopeError, match="not a finished"):
        selection.load_run(tmp_path)


def test_per_patient_auc_is_each_recipes_mean_over_its_runs():
    base = [_run(6, 1.0, s) for s in (0, 1)]
    cand = [_run(6, 2.5, 2)]
    table = selection.per_patient(base, cand, "context/data")
    assert len(table) == 6 and (table["patches"] == 60).all()
    one = base[0][base[0]["patient"] == "p3"]
    two = base[1][base[1]["patient"] == "p3"]
    mean = np.mean([selection.cohort_values(f)["auc"] for f in (one, two)])
    assert table.loc["p3", "baseline"] == pytest.approx(mean)
    assert (table["delta"] > 0).mean() > 0.5  # the sharper recipe wins in most patients
    assert table["delta"].is_monotonic_increasing


def test_a_seed_spread_is_each_cohorts_lowest_and_highest_over_the_seeds_runs(tmp_path):
    runs = [_cv_folder(tmp_path / f"s{i}", seed=10 + i, train_seed=i) for i in range(3)]
    spread = selection.seed_spread(runs)
    assert spread["seeds"] == [[7, 0], [7, 1], [7, 2]]
    assert set(spread["cohorts"]) == {"context/data", "lone/data"}
    values = [
        selection.cohort_values(r[r["cohort"] == "lone/data"])
        for r in map(selection.load_run, runs)
    ]
    for metric in selection.METRICS:
        lo, hi = spread["cohorts"]["lone/data"][metric]
        assert (lo, hi) == (min(v[metric] for v in values), max(v[metric] for v in values))
    assert lo < hi  # three draws are not one
    json.dumps(spread, allow_nan=False)  # plain JSON: it goes into a model's config
    twice = [_cv_folder(tmp_path / "again", seed=20, train_seed=1), runs[1]]
    with pytest.raises(IdcscopeError, match="one draw"):
        selection.seed_spread(twice)
