import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from idcscope.cli import app
from idcscope.data.manifest import index_dataset
from idcscope.training.cv import fold_splits


def test_fold_splits_never_cross_patients(synthetic_root):
    table = index_dataset(synthetic_root).table
    splits = fold_splits(table, 3, seed=0)
    tests = [set(s["test"]) for s in splits]
    assert set().union(*tests) == set(table["patient"])  # every patient tested once
    assert sum(map(len, tests)) == table["patient"].nunique()
    for s in splits:
        assert not set(s["train"]) & set(s["test"])
        assert not set(s["val"]) & set(s["test"])
        assert not set(s["train"]) & set(s["val"])
        assert s["val"]


@pytest.fixture(scope="module")
def cv_run(synthetic_root, tmp_path_factory):
    """One 3-fold CV through the CLI, then the final model, shared by the tests below."""
    out = tmp_path_factory.mktemp("cv")
    args = [
        "cv",
        str(synthetic_root),
        "--out",
        str(out),
        "--folds",
        "3",
        "--epochs",
        "1",
        "--final",
    ]
    return out, CliRunner().invoke(app, [*args, "--threads", "2"])


def test_cv_command_end_to_end(cv_run):
    out, result = cv_run
    assert result.exit_code == 0, result.output
    cv = json.loads((out / "cv.json").read_text())
    assert len(cv["per_fold"]) == 3
    assert cv["pooled"]["n_patients"] == 6
    assert 0 <= cv["pooled"]["auc"] <= 1
    lo, hi = cv["ci95"]["auc"]
    assert lo <= cv["pooled"]["auc"] <= hi
    assert "| default |" in (out / "cv.md").read_text()


def test_cv_scores_whole_patients_and_lone_patches_with_both_calibrations(cv_run):
    out, result = cv_run
    assert result.exit_code == 0, result.output
    cv = json.loads((out / "cv.json").read_text())
    modes = ("context", "thinned", "lone")
    assert set(cv["cohorts"]) == {f"{m}/{c}" for m in modes for c in ("fold", "oof")}
    for rows in cv["cohorts"].values():
        assert rows["all"]["n_patients"] == 6 and 0 <= rows["all"]["ece"] <= 1
    # with neighbours and alone, the same patients and patches were scored
    assert cv["cohorts"]["lone/oof"]["all"]["n"] == cv["cohorts"]["context/oof"]["all"]["n"]
    per_patient = pd.read_csv(out / "per_patient.csv")
    assert set(per_patient["scored"]) == set(modes)
    assert (per_patient["scored"] != "thinned").sum() == 12  # some thinned patients keep none
    assert "each patch alone" in (out / "cv.md").read_text()
    # calibrated and called by context, cross-fitted: every mode, every context seen
    assert {"context/all", "thinned/all", "lone/all"} <= set(cv["contexts"]["by_mode"])
    assert "alone" in cv["contexts"]["by_context"]
    oof = pd.read_csv(out / "oof_predictions.csv")
    assert set(oof["scored"]) == set(modes) and oof["neighbours"].isna().any()


def test_final_model_trains_on_every_patient_with_oof_decisions(cv_run):
    from idcscope.models.checkpoint import read_checkpoint

    out, result = cv_run
    assert result.exit_code == 0, result.output
    final = read_checkpoint(out / "final" / "best.pt")
    assert len(final["splits"]["train"]) == 6 and not final["splits"]["val"]
    assert "out-of-fold" in final["threshold_method"]
    folds = [read_checkpoint(out / f"fold{i}" / "best.pt")["context"]["sigma"] for i in range(3)]
    assert final["context"]["sigma"] == pytest.approx(np.median(folds))
    cv = json.loads((out / "cv.json").read_text())
    assert cv["final"]["temperature"] == pytest.approx(final["temperature"])
    # patches scored alone have their own calibration, fitted on the lone OOF scores
    lone = final["lone_calibration"]
    assert lone["temperature"] == pytest.approx(cv["final"]["lone_calibration"]["temperature"])
    assert set(lone) == {"temperature", "logit_bias", "calibration"}


def test_cross_fitting_calibrates_each_fold_on_the_others_only():
    from idcscope.inference.calibration import probabilities
    from idcscope.training.config import TrainConfig
    from idcscope.training.oof import cross_fitted, fit_decision

    rng = np.random.default_rng(0)
    margin = np.concatenate([rng.normal(0, 3, 400), rng.normal(0, 1, 400)])
    y = (rng.random(800) < 1 / (1 + np.exp(-margin / 2 + 1))).astype(int)
    pred = pd.DataFrame({"label": y, "fold": [0] * 400 + [1] * 400, "prob_idc": 0.0, "pred": 0})
    cfg = TrainConfig()
    out = cross_fitted(pred, margin, cfg)
    fit = fit_decision(margin[400:], y[400:], cfg)  # fold 0 is calibrated by fold 1 alone
    expected = probabilities(margin[:400], fit["temperature"], fit["logit_bias"])
    np.testing.assert_allclose(out["prob_idc"].to_numpy()[:400], expected)
    assert (out["pred"].to_numpy()[:400] == (expected >= fit["threshold"])).all()
    # lone scores of the same folds: their own calibration, the other scoring's threshold
    lone = cross_fitted(pred, margin / 3, cfg, threshold_from=(pred, margin))
    lone_fit = fit_decision(margin[400:] / 3, y[400:], cfg)
    expected = probabilities(margin[:400] / 3, lone_fit["temperature"], lone_fit["logit_bias"])
    np.testing.assert_allclose(lone["prob_idc"].to_numpy()[:400], expected)
    assert (lone["pred"].to_numpy()[:400] == (expected >= fit["threshold"])).all()


def test_ensemble_of_fold_models(cv_run, synthetic_root, tmp_path):
    out, _ = cv_run
    members = [str(out / f"fold{i}" / "best.pt") for i in range(2)]
    result = CliRunner().invoke(
        app,
        ["ensemble", str(synthetic_root), "--out", str(tmp_path / "ens")]
        + [arg for m in members for arg in ("--model", m)],
    )
    assert result.exit_code == 0, result.output
    m = json.loads((tmp_path / "ens" / "metrics.json").read_text())
    assert m["n_models"] == 2
    assert m["calls"]["n_decided"] + m["calls"]["n_uncertain"] == m["n"]
    # every patient was in some member's training or validation set: the report says so
    assert any("used to train or validate" in w for w in m["warnings"])


def test_a_killed_cv_resumes_at_its_unfinished_fold(cv_run, monkeypatch):
    """Finished folds are read back; only a fold without fold.json trains again."""
    import idcscope.training.cv as cv_module
    from idcscope.training.config import config_from_dict

    out, result = cv_run
    assert result.exit_code == 0, result.output
    first = json.loads((out / "cv.json").read_text())
    (out / "fold1" / "fold.json").unlink()  # as if killed during fold 1
    trained = []
    real_train = cv_module.train
    monkeypatch.setattr(cv_module, "train", lambda cfg: trained.append(cfg.out) or real_train(cfg))
    cfg = config_from_dict(first["config"])
    again = cv_module.cross_validate(cfg, folds=3)
    assert trained == [str(out / "fold1")]
    assert [f["test_patients"] for f in again["per_fold"]] == [
        f["test_patients"] for f in first["per_fold"]
    ]
    assert again["per_fold"][0] == first["per_fold"][0]


def test_selection_bias_is_the_mean_margin_of_each_folds_best_over_the_chosen():
    from idcscope.training.cv import selection_bias

    scores = np.array([[0.90, 0.92], [0.95, 0.91], [0.93, 0.93]])  # recipe 0 has the best mean
    assert selection_bias(scores) == pytest.approx((0.02 + 0 + 0) / 3)
    assert selection_bias(scores[:, :1]) == 0.0  # one recipe: nothing was chosen


def test_a_split_files_test_patients_are_locked_away_from_every_fold(synthetic_root, tmp_path):
    from idcscope.training.config import TrainConfig
    from idcscope.training.cv import locked_patients

    lock = tmp_path / "lock.json"
    lock.write_text(json.dumps({"test": ["90003"]}))
    cfg = TrainConfig(data=str(synthetic_root), split=str(lock))
    assert locked_patients(cfg) == {"90003"} and locked_patients(TrainConfig()) == set()


def test_cv_draws_its_folds_from_the_fold_seed(synthetic_root, tmp_path, monkeypatch):
    """Another training seed on the same folds: the runs' fold models can be ensembled."""
    seen = {}

    def fake(cfg, **kwargs):
        seen.update(kwargs, seed=cfg.seed)
        (tmp_path / "cv.md").write_text("| default |\n")
        return {"pooled": {"n_patients": 6, "auc": 0.5}}

    monkeypatch.setattr("idcscope.training.cv.cross_validate", fake)
    args = ["cv", str(synthetic_root), "--out", str(tmp_path), "--seed", "1", "--fold-seed", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen["seed"] == 1 and seen["fold_seed"] == 0


FOLD_CALIBRATIONS = [(1.0, 0.0), (1.2, -0.5), (0.8, 0.5)]  # each fold model's (T, bias)


@pytest.fixture
def confident_folds(tmp_path):
    """Three folds' test predictions as evaluate writes them (P(IDC) after the fold model's
    calibration to 6 decimals, the margin in full), with and without context, from models
    so confident that most margins exceed 15, where P(IDC) rounds to 0 or 1; their labels
    follow T = 10. Returns the CV folder, the margins of both modes and the labels."""
    from scipy.special import expit

    rng = np.random.default_rng(0)
    n = 400
    margin = {"context": rng.normal(0, 30, 3 * n)}
    margin["lone"] = 0.7 * margin["context"] + rng.normal(0, 5, 3 * n)
    y = (rng.random(3 * n) < expit(margin["context"] / 10 - 1)).astype(int)
    for fold, (t, b) in enumerate(FOLD_CALIBRATIONS):
        mine = slice(fold * n, (fold + 1) * n)
        for mode, where in (("context", "eval"), ("lone", "eval_lone")):
            prob = expit(margin[mode][mine] / t + b)
            (tmp_path / f"fold{fold}" / where).mkdir(parents=True)
            pd.DataFrame({
                "path": [f"{fold}/{i}.png" for i in range(n)], "patient": str(fold), "x": 0,
                "y": 0, "label": y[mine], "neighbours": 8 if mode == "context" else None,
                "prob_idc": prob.round(6), "pred": (prob >= 0.5) * 1, "margin": margin[mode][mine],
            }).to_csv(tmp_path / f"fold{fold}" / where / "predictions.csv", index=False)  # fmt: skip
    return tmp_path, margin, y


def _pooled(cfg, out) -> dict:
    from idcscope.training.cv import _fold_predictions

    return {
        mode: pd.concat(
            [
                _fold_predictions(cfg, out / f"fold{f}", False, mode).assign(fold=f)
                for f in range(3)
            ],
            ignore_index=True,
        )
        for mode in ("context", "lone")
    }


def test_oof_calibration_is_fitted_on_the_margins_not_the_rounded_probabilities(
    confident_folds, monkeypatch
):
    """The final model's temperature, bias, threshold and lone calibration, and the
    cross-fitted cohorts, are those fitted on the exact margins. Margins rebuilt from P(IDC)
    as written (the old path) lose every margin beyond about 15 and fit another model."""
    import torch
    from scipy.special import logit

    import idcscope.training.train as train_module
    from idcscope.models.checkpoint import save_checkpoint
    from idcscope.training import oof
    from idcscope.training.config import TrainConfig
    from idcscope.training.contexts import fit_decisions
    from idcscope.training.cv import cohort_results, pooled_metrics
    from idcscope.training.oof import cross_fitted, fit_decision, train_final

    out, margin, y = confident_folds
    assert (np.abs(margin["context"]) > 15).mean() > 0.5
    cfg = TrainConfig(out=str(out))
    pooled = _pooled(cfg, out)
    np.testing.assert_array_equal(pooled["context"]["margin"], margin["context"])  # in full
    exact = fit_decision(margin["context"], y, cfg)
    exact_lone = fit_decision(margin["lone"], y, cfg)

    def fake_train(cfg, resume=False):  # the weights do not matter here
        for name in ("best.pt", "last.pt"):
            save_checkpoint(Path(cfg.out) / name, torch.nn.Linear(1, 1), epoch=0)

    monkeypatch.setattr(train_module, "train", fake_train)
    monkeypatch.setattr(oof, "_input_check", lambda cfg, patients: {"fitted": patients})
    folds = {f: {"sigma": 0.0, "epoch": 0} for f in range(3)}
    every = pd.concat([f.assign(scored=m) for m, f in pooled.items()], ignore_index=True)
    final = train_final(cfg, every, folds)
    for key in ("temperature", "logit_bias"):
        assert final[key] == exact[key]
    # the threshold is chosen on every mode, each calibrated by its context's own fit
    by_context = fit_decisions(every, (cfg.threshold, cfg.target_sensitivity))
    assert final["threshold"] == by_context["threshold"]
    fitted = [{k: v for k, v in c.items() if k != "measured"} for c in final["contexts"]]
    assert fitted == by_context["contexts"]
    alone = fit_decision(margin["lone"], y, cfg)  # lone patches are the "alone" context
    assert final["contexts"][0]["temperature"] == pytest.approx(alone["temperature"], rel=1e-6)
    assert final["lone_calibration"]["temperature"] == exact_lone["temperature"]
    assert final["lone_calibration"]["logit_bias"] == exact_lone["logit_bias"]

    cohorts = cohort_results(cfg, pooled, n_boot=0)
    context = (pooled["context"], margin["context"])
    expected = {
        "context": cross_fitted(pooled["context"], margin["context"], cfg),
        "lone": cross_fitted(pooled["lone"], margin["lone"], cfg, threshold_from=context),
    }
    for mode, frame in expected.items():
        assert cohorts[f"{mode}/oof"]["all"] == pooled_metrics(frame, 0, cfg.seed)

    folds_of = pooled["context"]["fold"].to_numpy()
    t, b = (np.array(c)[folds_of] for c in zip(*FOLD_CALIBRATIONS, strict=True))
    p = pooled["context"]["prob_idc"].to_numpy().clip(5e-7, 1 - 5e-7)
    rebuilt = (logit(p) - b) * t
    assert np.abs(rebuilt).max() < 20 < 80 < np.abs(margin["context"]).max()  # clipped
    old = fit_decision(rebuilt, y, cfg)
    assert old["temperature"] < 0.75 * exact["temperature"]  # a model far too confident


def test_oof_predictions_written_before_margins_are_scored_again(
    confident_folds, monkeypatch, caplog
):
    """A CV resumed from a version that wrote no margins scores those folds' test patients
    again (the fold models are there) rather than fit on rounded probabilities."""
    from idcscope.training.config import TrainConfig
    from idcscope.training.cv import _fold_predictions

    out, _, _ = confident_folds
    csv = out / "fold1" / "eval_lone" / "predictions.csv"
    written = pd.read_csv(csv)
    written.drop(columns="margin").to_csv(csv, index=False)
    calls = []

    def fake_evaluate(checkpoint, data, where, **kwargs):
        calls.append((Path(where), kwargs["context"]))
        written.to_csv(Path(where) / "predictions.csv", index=False)

    monkeypatch.setattr("idcscope.training.cv.evaluate", fake_evaluate)
    cfg = TrainConfig(out=str(out))
    assert "margin" in _fold_predictions(cfg, out / "fold1", False, "lone")
    assert calls == [(csv.parent, False)]
    assert "scoring its patients again" in caplog.text
    _fold_predictions(cfg, out / "fold1", False, "context")  # with margins: read as it is
    assert len(calls) == 1
