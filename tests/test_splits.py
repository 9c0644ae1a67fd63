import json

import numpy as np
import pandas as pd
import pytest

from idcscope.data import splits as S
from idcscope.errors import DataError


def _table(n_patients=20, per=30, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        frac = rng.uniform(0, 0.8)
        rows += [{"patient": f"p{i:02d}", "label": int(rng.random() < frac)} for _ in range(per)]
    return pd.DataFrame(rows)


def test_patient_split_is_disjoint_complete_and_seeded():
    t = _table()
    a = S.patient_split(t, 0.15, 0.15, seed=3)
    assert a == S.patient_split(t, 0.15, 0.15, seed=3)
    assert a != S.patient_split(t, 0.15, 0.15, seed=4)
    S.check_disjoint(a)
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(t["patient"].unique())
    assert len(a["test"]) == 3 and len(a["val"]) == 3


def test_assignment_keeps_patients_whole():
    t = _table()
    which = S.assign(t, S.patient_split(t, seed=0))
    for _, group in pd.Series(which).groupby(t["patient"]):
        assert group.nunique() == 1


def test_stratification_spans_positive_fractions():
    t = _table(n_patients=30)
    frac = t.groupby("patient")["label"].mean()
    s = S.patient_split(t, 0.0, 0.2, seed=0)
    test_fracs = frac[s["test"]].sort_values()
    # one test patient per sextile of positive fraction: both ends are represented
    assert test_fracs.iloc[0] < frac.quantile(0.3) and test_fracs.iloc[-1] > frac.quantile(0.7)


def test_too_few_patients():
    with pytest.raises(DataError, match="only 2 patients"):
        S.patient_split(_table(n_patients=2), 0.5, 0.5)


def test_folds_partition_patients():
    t = _table(n_patients=14)
    folds = S.patient_folds(t, 5, seed=0)
    flat = [p for f in folds for p in f]
    assert sorted(flat) == sorted(t["patient"].unique()) and len(set(flat)) == len(flat)
    assert max(map(len, folds)) - min(map(len, folds)) <= 1


def test_split_file_roundtrip_and_val_carved_from_train(tmp_path):
    t = _table()
    patients = sorted(t["patient"].unique())
    path = tmp_path / "folds.json"
    path.write_text(json.dumps({"train": patients[:15], "test": patients[15:]}))
    s = S.load_splits(path, t, seed=0)
    assert s["test"] == patients[15:] and s["val"] and set(s["val"]) <= set(patients[:15])
    S.check_disjoint(s)
    S.save_splits(s, tmp_path / "again.json")
    assert S.load_splits(tmp_path / "again.json") == s


def test_overlapping_split_file_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train": ["a", "b"], "val": ["c"], "test": ["b"]}))
    with pytest.raises(DataError, match="both train and test: b"):
        S.load_splits(path)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(DataError, match=r"junk\.json"):
        S.load_splits(tmp_path / "junk.json")


def test_random_split_mixes_patients():
    t = _table()
    which = S.assign(t, S.random_split(t, 0.15, 0.15, seed=0))
    per_patient = pd.Series(which).groupby(t["patient"]).nunique()
    assert (per_patient > 1).any()  # that is exactly the leak it documents
    assert abs((which == "test").mean() - 0.15) < 0.05
