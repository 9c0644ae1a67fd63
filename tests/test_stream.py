"""Streaming: buckets of whole patients, rows written as they are scored, any order of work."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idcscope.inference import Predictor
from idcscope.inference.predict import predict
from idcscope.inference.stream import make_buckets


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=30),
    size=st.integers(1, 100),
    seed=st.integers(0, 1000),
)
def test_buckets_hold_whole_patients_in_order(sizes, size, seed):
    groups = np.repeat([f"p{i}" for i in range(len(sizes))], sizes)
    groups = np.random.default_rng(seed).permutation(groups)  # a patient's rows need not touch
    buckets = make_buckets(groups, size)
    rows = np.concatenate([b.rows for b in buckets])
    assert sorted(rows.tolist()) == list(range(len(groups)))  # every row, once
    assert [b.index for b in buckets] == list(range(len(buckets)))
    for b in buckets[:-1]:
        assert len(b.rows) >= size
    seen: set[str] = set()
    for b in buckets:
        mine = set(groups[b.rows])
        assert not mine & seen  # a patient never spans two buckets
        seen |= mine
        assert (np.diff(b.rows[groups[b.rows] == groups[b.rows][0]]) > 0).all()
    # Patients come in the order they first appear.
    first = list(dict.fromkeys(groups[rows]))
    assert first == list(dict.fromkeys(groups))


@pytest.fixture(scope="module")
def model(trained_run):
    return trained_run / "best.pt"


def test_rows_are_written_as_they_are_scored(model, synthetic_root, tmp_path, monkeypatch):
    """A run killed after its first bucket keeps that bucket's rows, whole and readable."""
    real_score = Predictor.score

    def score_one_bucket(self, *args, **kwargs):
        it = real_score(self, *args, **kwargs)
        yield next(it)
        raise KeyboardInterrupt  # as if killed while the next bucket was in flight

    monkeypatch.setattr(Predictor, "score", score_one_bucket)
    monkeypatch.setattr("idcscope.inference.stream.BUCKET", 100)  # several buckets here
    out = tmp_path / "p.csv"
    with pytest.raises(KeyboardInterrupt):
        predict(model, [synthetic_root], out, engine="torch")
    kept = pd.read_csv(out)
    columns = [
        "path",
        "patient",
        "x",
        "y",
        "neighbours",
        "prob_idc",
        "pred",
        "call",
        "input_check",
        "error",
        "margin",
    ]
    assert list(kept.columns) == columns
    assert len(kept) > 0 and kept["prob_idc"].between(0, 1).all()
    monkeypatch.undo()
    whole = predict(model, [synthetic_root], tmp_path / "all.csv", engine="torch")
    assert len(kept) < len(whole)
    pd.testing.assert_frame_equal(kept, pd.read_csv(tmp_path / "all.csv").iloc[: len(kept)])


def test_small_and_large_buckets_score_alike(model, synthetic_root):
    """How the work is cut (bucket and batch sizes) never changes a patch's P(IDC)."""
    from idcscope.data.dataset import load_patch_data

    data = load_patch_data(synthetic_root)
    rows = data.rows()
    coords = (data.table["x"].to_numpy(), data.table["y"].to_numpy())
    predictor = Predictor(model, "torch")
    expected = predictor.predict_proba(data.images, rows, data.patients, coords)
    for batch in (1, 7):
        small = Predictor(model, "torch", batch_size=batch)
        np.testing.assert_allclose(
            small.predict_proba(data.images, rows, data.patients, coords), expected, atol=1e-5
        )
    # One bucket per patient, or one for all: the same scores.
    from idcscope.inference.stream import ArraySource

    groups = data.patients[rows]
    place = tuple(c[rows] for c in coords)
    for size in (1, 10**9):
        prob = np.empty(len(rows))
        source = ArraySource(np.asarray(data.images)[rows])
        for s in predictor.score(groups, place, source, make_buckets(groups, size)):
            prob[s.rows] = s.prob
        np.testing.assert_allclose(prob, expected, atol=1e-5)
