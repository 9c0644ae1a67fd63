import json

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
    """One 3-fold CV through the CLI, shared by the tests below."""
    out = tmp_path_factory.mktemp("cv")
    args = ["cv", str(synthetic_root), "--out", str(out), "--folds", "3", "--epochs", "1"]
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
    assert m["n_models"] == 2 and len(m["temperature"]) == 2
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
