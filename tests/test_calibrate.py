"""`idcscope calibrate`: a made model calibrated and called by context from a CV's OOF."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from idcscope.cli import app
from idcscope.data.manifest import index_datasets
from idcscope.inference import Predictor
from idcscope.inference.export import save_bundle
from idcscope.models.bundle import read_config, verified_files
from idcscope.models.checkpoint import read_meta
from idcscope.training.oof import calibrate_model


def _oof(path, n: int = 3000, seed: int = 0):
    """OOF predictions as `cv` writes them: three modes, patients in three folds; with
    fewer neighbours the margins say less."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    neighbours = rng.choice([np.nan, 0, 2, 5, 8], n)
    sharp = np.where(np.isnan(neighbours), 1.0, 1 + np.nan_to_num(neighbours) / 4)
    margin = sharp * (2 * y - 1) + rng.normal(0, 1.5, n)
    patient = rng.integers(0, 30, n)
    pd.DataFrame({
        "path": [f"data/{p}/x.png" for p in patient], "patient": patient.astype(str),
        "label": y, "neighbours": neighbours, "margin": margin, "fold": patient % 3,
        "scored": np.where(np.isnan(neighbours), "lone", "context"),
    }).to_csv(path, index=False)  # fmt: skip
    return path


def test_calibrate_writes_contexts_the_predictor_calls_with(trained_run, synthetic_root, tmp_path):
    model = shutil.copy(trained_run / "best.pt", tmp_path / "model.pt")
    oof = _oof(tmp_path / "oof_predictions.csv")
    result = CliRunner().invoke(app, ["calibrate", str(model), str(oof), "--alpha", "0.1"])
    assert result.exit_code == 0, result.output
    assert "7-8 neighbours" in result.output  # the measured table
    meta = read_meta(model)
    assert [c["name"] for c in meta.contexts] == ["alone", "1-3 neighbours", "4-6 neighbours",
                                                  "7-8 neighbours"]  # fmt: skip
    assert all(c["alpha"] == 0.1 for c in meta.contexts)
    assert meta.contexts[-1]["measured"]["n_patients"] == 30
    assert "every context" in meta.threshold_method
    # the sharper context decides more of its patches
    assert meta.contexts[-1]["measured"]["coverage"] > meta.contexts[0]["measured"]["coverage"]
    index = index_datasets(synthetic_root, read_sizes=False)
    scored = Predictor(model).score_files(index.table, index.root)
    d = meta.decisions(scored.neighbours)
    expected = np.where(scored.prob >= d.idc_from, 1, np.where(scored.prob < d.no_idc_below, 0, -1))
    np.testing.assert_array_equal(scored.call, expected)


def test_a_model_calls_at_each_alpha_it_was_fitted_at(trained_run, synthetic_root, tmp_path):
    """Bands are fitted at every alpha of ``contexts.ALPHAS``, so a user picks one when
    scoring (``--alpha``) without the out-of-fold predictions: a larger alpha decides more,
    the model's own is what no alpha gives, and one it was not fitted at is refused with
    the file and the alphas there are."""
    from idcscope.training.contexts import ALPHAS

    model = shutil.copy(trained_run / "best.pt", tmp_path / "model.pt")
    calibrate_model(model, _oof(tmp_path / "oof.csv", n=6000))
    meta = read_meta(model)
    assert meta.alphas == list(ALPHAS)
    neighbours = np.array([np.nan, 0, 2, 5, 8] * 20, np.float64)
    own = meta.decisions(neighbours)
    np.testing.assert_array_equal(meta.decisions(neighbours, 0.05), own)
    widths = [np.mean(np.subtract(*meta.decisions(neighbours, a)[3:1:-1])) for a in ALPHAS]
    assert widths == sorted(widths, reverse=True) and widths[0] > widths[-1]  # fewer uncertain
    measured = meta.oof_metrics["by_alpha"]
    decided = [measured[f"{a:g}"]["context/data"]["coverage"] for a in ALPHAS]
    assert decided == sorted(decided) and decided[-1] > decided[0]

    index = index_datasets(synthetic_root, read_sizes=False)
    out = tmp_path / "p.csv"
    calls = {}
    for alpha in ("0.01", "0.2"):
        res = CliRunner().invoke(app, ["predict", str(synthetic_root), "--out", str(out),
                                       "--model", str(model), "--alpha", alpha])  # fmt: skip
        assert res.exit_code == 0, res.output
        calls[alpha] = pd.read_csv(out)["call"]
    assert (calls["0.2"] != "uncertain").sum() > (calls["0.01"] != "uncertain").sum()
    assert len(calls["0.2"]) == len(index.table)
    res = CliRunner().invoke(app, ["predict", str(synthetic_root), "--out", str(out),
                                   "--model", str(model), "--alpha", "0.03"])  # fmt: skip
    assert res.exit_code == 1
    assert str(model) in res.output and "0.01, 0.02, 0.05, 0.1, 0.2, not 0.03" in res.output


def test_calibrate_rewrites_a_folders_card_which_still_verifies(trained_run, tmp_path):
    folder = save_bundle(trained_run / "best.pt", tmp_path / "model", "# m\n")
    oof = _oof(tmp_path / "oof.csv")
    card = tmp_path / "card.md"
    card.write_text("# m\n\n<!-- headline -->\n\n## Numbers\n\n<!-- numbers -->\n")
    result = CliRunner().invoke(app, ["calibrate", str(folder), str(oof), "--card", str(card)])
    assert result.exit_code == 0, result.output
    text = (folder / "README.md").read_text()
    assert "<!--" not in text and "Out of fold, calibrated and called by scoring context" in text
    assert "| each patch alone: all |" in text
    assert "| 0.1 | " in text  # what each alpha the model can call at does out of fold
    verified_files(folder)  # the card's new sha256 is listed
    assert read_config(folder)["contexts"][0]["name"] == "alone"


def test_calibrate_writes_how_far_other_seeds_move_the_numbers(trained_run, tmp_path):
    from tests.test_selection import _cv_folder

    folder = save_bundle(trained_run / "best.pt", tmp_path / "model", "# m\n")
    runs = [_cv_folder(tmp_path / f"seed{i}", seed=i, train_seed=i) for i in range(3)]
    card = tmp_path / "card.md"
    card.write_text("# m\n\n<!-- headline -->\n\n## Numbers\n\n<!-- numbers -->\n")
    args = ["calibrate", str(folder), str(runs[0] / "oof_predictions.csv"), "--card", str(card)]
    result = CliRunner().invoke(app, [*args, "--spread", str(runs[1]), "--spread", str(runs[2])])
    assert result.exit_code == 0, result.output
    spread = read_config(folder)["oof_metrics"]["seed_spread"]
    assert [seed for _, seed in spread["seeds"]] == [0, 1, 2]
    lo, hi = spread["cohorts"]["context/data"]["auc"]
    text = (folder / "README.md").read_text()
    assert (
        f"Over training seeds 0, 1, 2 of the recipe on the same folds, with neighbours: data, AUC {lo:.3f}-{hi:.3f}"
        in text
    )
    assert "Lowest and highest over training seeds 0, 1, 2" in text
    assert "| each patch alone: data |" in text
    verified_files(folder)
    # the run whose OOF calibrates is counted once: naming it again is one draw twice
    again = CliRunner().invoke(app, [*args, "--spread", str(runs[0])])
    assert again.exit_code == 1 and "one draw" in again.output


def test_calibrate_names_what_is_wrong(trained_run, tmp_path):
    bad = tmp_path / "oof.csv"
    bad.write_text("path,label\nx,1\n")
    model = shutil.copy(trained_run / "best.pt", tmp_path / "model.pt")
    result = CliRunner().invoke(app, ["calibrate", str(model), str(bad)])
    assert result.exit_code == 1
    assert "not out-of-fold predictions" in result.output
    oof = _oof(tmp_path / "o.csv")
    with pytest.raises(ValueError, match="only a model folder"):
        calibrate_model(model, oof, card="# m")
