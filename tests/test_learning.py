"""Learning on real tissue: train on some patients of the real sample, test on the others."""

import json

import pytest

from idcscope.evaluation.evaluate import evaluate


@pytest.mark.slow
def test_default_recipe_generalises_to_unseen_patients(real_sample, real_run, tmp_path):
    splits = json.loads((real_run / "splits.json").read_text())
    assert len(splits["test"]) >= 3 and not set(splits["test"]) & set(splits["train"])
    m = evaluate(real_run / "best.pt", real_sample, tmp_path / "eval", split="test", n_boot=0)
    print(json.dumps({k: m[k] for k in ("auc", "balanced_accuracy", "f1", "n", "n_patients")}))
    assert m["n_patients"] == len(splits["test"])
    assert m["auc"] >= 0.85
    assert m["balanced_accuracy"] > 0.75
