"""Every entry point on a corpus of bad inputs (see ``badinputs.py``).

Each bad file gets a message that names it and says what is wrong, the run goes on where
that makes sense, and every input is accounted for: processed + skipped = total, in the
entry point's own output (the index, ``skipped.csv``, the ``error`` column, the counts).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from idcscope.cli import app
from idcscope.data.manifest import index_dataset
from idcscope.errors import DataError, IdcscopeError
from idcscope.evaluation.evaluate import evaluate
from idcscope.inference.predict import predict
from idcscope.spatial.heatmap import patient_heatmap
from idcscope.training.config import make_config
from idcscope.training.train import train
from tests.badinputs import (
    BAD_PATIENT,
    KINDS,
    SPECS,
    SYNTHETIC_PATIENTS,
    UNICODE_PATIENT,
    make_corpus,
    make_empty,
    make_label_conflict,
    make_one_class,
    make_unreadable,
)

ENTRIES = ("index", "train", "evaluate", "predict", "heatmap")
FOLDS = {
    "train": [SYNTHETIC_PATIENTS[0], SYNTHETIC_PATIENTS[1], BAD_PATIENT],
    "val": [SYNTHETIC_PATIENTS[2]],
    "test": [SYNTHETIC_PATIENTS[3], UNICODE_PATIENT],
}


def _config(data: Path, out: Path, **kw):
    base = {"epochs": 2, "batch_size": 32, "threads": 1, "cache_dir": str(out / "cache")}
    return make_config("default", data=str(data), out=str(out), **{**base, **kw})


def _skipped_csv(path: Path, prefix: str = "") -> dict[str, str]:
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    return {prefix + p: r for p, r in zip(table["path"], table["reason"], strict=True)}


# ----------------------------------------------------------------------------- the corpus runs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory) -> Path:
    """The train entry point on the corpus, with a split that puts patient 201 in training."""
    out = tmp_path_factory.mktemp("run")
    folds = out / "folds.json"
    folds.write_text(json.dumps(FOLDS, ensure_ascii=False))
    train(_config(corpus.root, out, split=str(folds)))
    return out


@pytest.fixture(scope="module")
def checkpoint(run_dir) -> Path:
    return run_dir / "best.pt"


def _by_index(corpus, run_dir, checkpoint, tmp: Path) -> dict[str, str]:
    ix = index_dataset(corpus.root)
    return {**dict.fromkeys(ix.table["path"], ""), **dict(ix.skipped)}


def _by_train(corpus, run_dir, checkpoint, tmp: Path) -> dict[str, str]:
    skipped = _skipped_csv(run_dir / "skipped.csv")
    return {**{f: "" for f in corpus.files if f not in skipped}, **skipped}


def _by_evaluate(corpus, run_dir, checkpoint, tmp: Path) -> dict[str, str]:
    evaluate(checkpoint, corpus.root, tmp, n_boot=0)
    predicted = pd.read_csv(tmp / "predictions.csv", dtype={"path": str})["path"]
    return {**dict.fromkeys(predicted, ""), **_skipped_csv(tmp / "skipped.csv")}


def _by_predict(corpus, run_dir, checkpoint, tmp: Path) -> dict[str, str]:
    df = predict(checkpoint, [corpus.root], workers=1)
    rel = [Path(p).relative_to(corpus.root).as_posix() for p in df["path"]]
    return dict(zip(rel, df["error"].fillna(""), strict=True))


def _by_heatmap(corpus, run_dir, checkpoint, tmp: Path) -> dict[str, str]:
    patient_heatmap(checkpoint, corpus.root / BAD_PATIENT, tmp)
    placed = pd.read_csv(tmp / f"{BAD_PATIENT}_predictions.csv", dtype={"path": str})["path"]
    return {
        **{f"{BAD_PATIENT}/{p}": "" for p in placed},
        **_skipped_csv(tmp / f"{BAD_PATIENT}_skipped.csv", prefix=f"{BAD_PATIENT}/"),
    }


@pytest.fixture(scope="module")
def outcomes(corpus, run_dir, checkpoint, tmp_path_factory):
    """``outcomes(entry)``: every file the entry point reports, relative to the corpus root,
    mapped to "" when it was processed or to the reason it was skipped (run once per entry)."""
    runners = {
        "index": _by_index,
        "train": _by_train,
        "evaluate": _by_evaluate,
        "predict": _by_predict,
        "heatmap": _by_heatmap,
    }
    done: dict[str, dict[str, str]] = {}

    def get(entry: str) -> dict[str, str]:
        if entry not in done:
            tmp = tmp_path_factory.mktemp(entry)
            done[entry] = runners[entry](corpus, run_dir, checkpoint, tmp)
        return done[entry]

    return get


def _expected_processed(entry: str, spec) -> bool:
    if entry == "index":  # reads headers and names only
        return spec.indexed
    if entry == "predict":  # needs no name
        return spec.decodes
    return spec.indexed and spec.decodes


# ----------------------------------------------------------------------------- per file


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_each_bad_file_is_used_or_skipped_with_its_reason(entry, kind, corpus, outcomes):
    spec, path = corpus.spec(kind), corpus.paths[kind]
    reported = outcomes(entry)
    assert path in reported, f"{entry} does not account for {path}"
    if _expected_processed(entry, spec):
        assert reported[path] == "", f"{entry} skipped a usable {kind}: {reported[path]}"
    else:
        assert reported[path], f"{entry} used {kind} {path}"
        assert re.search(spec.reason, reported[path], re.IGNORECASE), reported[path]


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_input_is_accounted_for(entry, corpus, outcomes):
    scope = corpus.files_of(BAD_PATIENT) if entry == "heatmap" else corpus.files
    reported = outcomes(entry)
    assert sorted(reported) == sorted(scope)  # nothing lost, nothing invented
    good = [f for f in corpus.good_files if f in scope]
    assert all(reported[f] == "" for f in good), "a healthy patch was skipped"


def test_train_counts_add_up(corpus, run_dir):
    from idcscope.models.checkpoint import read_checkpoint

    s = read_checkpoint(run_dir / "best.pt")["data_summary"]
    n_skipped = len(pd.read_csv(run_dir / "skipped.csv"))
    assert s["n_files"] == len(corpus.files)
    assert s["n_patches"] + s["n_skipped"] == s["n_files"]
    assert s["n_skipped"] == n_skipped
    assert s["n_padded"] >= 2  # the 50x1 and 1x50 edge patches, at least


def test_evaluate_counts_add_up(corpus, checkpoint, run_dir, tmp_path):
    m = evaluate(checkpoint, corpus.root, tmp_path, n_boot=0)
    s = m["data_summary"]
    assert m["n"] == s["n_patches"] == len(pd.read_csv(tmp_path / "predictions.csv"))
    assert s["n_patches"] + len(pd.read_csv(tmp_path / "skipped.csv")) == len(corpus.files)


def test_heatmap_counts_add_up(corpus, checkpoint, tmp_path):
    s = patient_heatmap(checkpoint, corpus.root / BAD_PATIENT, tmp_path)
    assert s["n_patches"] + s["n_unreadable"] + s["n_skipped"] == len(corpus.files_of(BAD_PATIENT))
    assert s["n_unreadable"] == sum(sp.indexed and not sp.decodes for sp in SPECS)


def test_predict_rows_name_their_files(corpus, checkpoint, tmp_path):
    df = predict(checkpoint, [corpus.root], tmp_path / "p.csv", workers=1)
    bad = df[df["error"] != ""]
    assert bad["prob_idc"].isna().all() and bad["pred"].isna().all()
    good = df[df["error"] == ""]
    assert good["prob_idc"].between(0, 1).all()
    assert len(pd.read_csv(tmp_path / "p.csv")) == len(df) == len(corpus.files)


def test_non_ascii_patient_gets_its_heatmap(corpus, checkpoint, tmp_path):
    s = patient_heatmap(checkpoint, corpus.root, tmp_path, patient=UNICODE_PATIENT)
    assert s["patient"] == UNICODE_PATIENT
    assert s["n_patches"] == len(corpus.files_of(UNICODE_PATIENT)) == 8
    assert Path(s["files"]["heatmap"]).name == f"{UNICODE_PATIENT}_heatmap.png"
    assert Path(s["files"]["heatmap"]).is_file()


def test_folder_links_are_not_followed(corpus):
    ix = index_dataset(corpus.root)
    assert not ix.table["path"].str.contains("loop_to_parent").any()
    assert ix.table["path"].is_unique


# ----------------------------------------------------------------------------- whole datasets


def _run(entry: str, root: Path, checkpoint: Path, out: Path):
    patient = sorted(p for p in root.iterdir() if p.is_dir())[0]
    if entry == "index":
        return index_dataset(root)
    if entry == "train":
        return train(_config(root, out / "run", epochs=1, val_fraction=0.25, test_fraction=0.25))
    if entry == "evaluate":
        return evaluate(checkpoint, root, out / "eval", n_boot=0)
    if entry == "predict":
        return predict(checkpoint, [root], out / "p.csv", workers=1)
    return patient_heatmap(checkpoint, patient, out / "heatmap")


@pytest.mark.parametrize("entry", ENTRIES)
def test_label_conflict_stops_every_labelled_entry_naming_the_file(entry, checkpoint, tmp_path):
    bad = make_label_conflict(tmp_path / "data")
    if entry == "predict":  # predicting needs no label: the file is a patch like the others
        df = _run(entry, tmp_path / "data", checkpoint, tmp_path)
        assert len(df) == 13 and (df["error"] == "").all()
        return
    with pytest.raises(DataError, match=re.escape(bad.name) + r".*says class 1.*'0'"):
        _run(entry, tmp_path / "data", checkpoint, tmp_path)


@pytest.mark.parametrize("entry", ENTRIES)
def test_one_class_dataset(entry, checkpoint, tmp_path):
    root = make_one_class(tmp_path / "data")
    if entry == "train":
        with pytest.raises(IdcscopeError, match="only one class"):
            _run(entry, root, checkpoint, tmp_path)
        return
    result = _run(entry, root, checkpoint, tmp_path)
    if entry == "index":
        assert len(result.table) == 20 and set(result.table["label"]) == {0}
    elif entry == "evaluate":  # specificity is defined, AUC and sensitivity are not
        assert result["n"] == 20 and result["auc"] is None
        assert 0 <= result["specificity"] <= 1
    elif entry == "predict":
        assert len(result) == 20 and (result["error"] == "").all()
    else:
        assert result["n_patches"] == 4 and result["sensitivity"] is None


@pytest.mark.parametrize("entry", ENTRIES)
def test_empty_folders_are_a_clear_error(entry, checkpoint, tmp_path):
    root = make_empty(tmp_path / "data")
    with pytest.raises(DataError, match=r"no patches found|no image files") as e:
        _run(entry, root, checkpoint, tmp_path)
    assert str(tmp_path / "data") in str(e.value)


@pytest.mark.parametrize("entry", ENTRIES)
def test_nothing_readable(entry, checkpoint, tmp_path):
    root = make_unreadable(tmp_path / "data")
    if entry == "index":  # headers are fine: the indexer keeps all 8
        assert len(_run(entry, root, checkpoint, tmp_path).table) == 8
        return
    if entry == "predict":
        df = _run(entry, root, checkpoint, tmp_path)
        assert len(df) == 8 and df["error"].str.contains("broken data stream").all()
        return
    with pytest.raises(IdcscopeError, match=r"none of the (8 files|2 patches) could be read"):
        _run(entry, root, checkpoint, tmp_path)
    if entry in ("train", "evaluate"):
        folder = tmp_path / ("run" if entry == "train" else "eval")
        assert len(pd.read_csv(folder / "skipped.csv")) == 8


# ----------------------------------------------------------------------------- the CLI


def test_cli_index_reports_counts(corpus, caplog):
    res = CliRunner().invoke(app, ["index", str(corpus.root)])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    n_indexed = len(corpus.good_files) + sum(s.indexed for s in SPECS)
    assert summary["n_patches"] == n_indexed
    assert summary["n_patches"] + summary["n_skipped"] == len(corpus.files)
    assert "skipped 201/0/" in caplog.text  # the first skipped files, by name


def test_cli_index_refuses_label_conflict(tmp_path, caplog):
    bad = make_label_conflict(tmp_path / "data")
    res = CliRunner().invoke(app, ["index", str(tmp_path / "data")])
    assert res.exit_code == 1
    assert bad.name in caplog.text and "says class 1" in caplog.text


def test_cli_predict_writes_a_row_per_file(corpus, checkpoint, tmp_path):
    out = tmp_path / "preds.csv"
    res = CliRunner().invoke(
        app, ["predict", str(corpus.root), "--out", str(out), "--model", str(checkpoint)]
    )
    assert res.exit_code == 3, res.output  # some files could not be read
    df = pd.read_csv(out, keep_default_na=False)
    assert len(df) == len(corpus.files)
    n_errors = int((df["error"] != "").sum())
    assert n_errors == sum(not s.decodes for s in SPECS)


def test_cli_predict_refuses_an_empty_folder(checkpoint, tmp_path, caplog):
    (tmp_path / "nothing").mkdir()
    res = CliRunner().invoke(
        app,
        [
            "predict",
            str(tmp_path / "nothing"),
            "--out",
            str(tmp_path / "p"),
            "--model",
            str(checkpoint),
        ],
    )
    assert res.exit_code == 1
    assert "nothing: no image files" in caplog.text


@pytest.mark.parametrize("command", ["evaluate", "heatmap"])
def test_cli_stops_on_label_conflict(command, checkpoint, tmp_path, caplog):
    bad = make_label_conflict(tmp_path / "data")
    target = tmp_path / "data" if command == "evaluate" else bad.parents[1]
    args = [command, str(target), "--out", str(tmp_path / "out"), "--model", str(checkpoint)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1
    assert bad.name in caplog.text


# ----------------------------------------------------------------------------- whole slides


@pytest.fixture(scope="module")
def slide_image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.full((1200, 1200, 3), 240, np.uint8)
    img[200:1000, 200:1000] = rng.integers(60, 200, (800, 800, 3), dtype=np.uint8)
    return img


def _slide(checkpoint, path, out, **kw):
    from idcscope.spatial.slide import slide_inference

    return slide_inference(str(checkpoint), path, out, **kw)


def test_slide_that_is_no_slide(checkpoint, tmp_path):
    path = tmp_path / "scan.svs"
    path.write_text("not a slide\n")
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*not a slide"):
        _slide(checkpoint, path, tmp_path / "out")


def test_slide_without_resolution_asks_for_it(checkpoint, slide_image, tmp_path):
    import tifffile

    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, slide_image)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*--slide-mpp"):
        _slide(checkpoint, path, tmp_path / "out")
    assert _slide(checkpoint, path, tmp_path / "out", slide_mpp=1.0)["n_tiles"] > 0


def test_slide_truncated_in_its_last_tiles(checkpoint, slide_image, tmp_path):
    from idcscope.spatial.wsi import write_tiff_slide

    data = write_tiff_slide(slide_image, tmp_path / "full.tif", mpp=1.0).read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(data[: len(data) - 500])
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*(?i:short read|truncat)"):
        _slide(checkpoint, path, tmp_path / "out")


def test_slide_truncated_in_half(checkpoint, slide_image, tmp_path):
    from idcscope.spatial.wsi import write_tiff_slide

    data = write_tiff_slide(slide_image, tmp_path / "full.tif", mpp=1.0).read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=re.escape(str(path))):
        _slide(checkpoint, path, tmp_path / "out", slide_mpp=1.0)


# ----------------------------------------------------------------------------- web upload


def test_web_upload_of_the_corpus_reports_every_file(corpus, checkpoint, tmp_path):
    """Every file of the bad patient, uploaded at once: a row each, predicted or explained."""
    from fastapi.testclient import TestClient

    from idcscope.serve import Settings, create_app

    sent = {s.kind: corpus.root / corpus.paths[s.kind] for s in SPECS if s.data is not None}
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream")) for p in sent.values()]
    app = create_app(checkpoint, Settings(temp_dir=str(tmp_path)))
    with TestClient(app) as client:
        r = client.post("/api/patches", files=files)
        assert r.status_code == 200, r.text
        health = client.get("/api/health")
    res = r.json()
    rows = {row["file"]: row for row in res["rows"]}
    assert res["n_files"] == len(rows) == len(sent)  # nothing lost, nothing invented
    for kind, path in sent.items():
        row = rows[path.name]
        if corpus.spec(kind).decodes:
            assert not row["error"] and 0 <= row["prob_idc"] <= 1, (kind, row)
        else:
            assert row["error"] and row["prob_idc"] is None, (kind, row)
            assert str(tmp_path) not in row["error"]  # no server paths in messages
    assert res["n_predicted"] == sum(corpus.spec(k).decodes for k in sent)
    assert health.json()["status"] == "ok"
