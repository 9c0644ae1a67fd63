import json
from pathlib import Path

import pytest
from PIL import Image

from idcscope.data.manifest import image_size, index_dataset, index_files, parse_patch_name
from idcscope.errors import DataError
from tests.conftest import write_patch


def test_parse_patch_name():
    assert parse_patch_name("8863_idx5_x51_y1251_class0.png") == {
        "patient": "8863",
        "x": 51,
        "y": 1251,
        "label": 0,
    }
    assert parse_patch_name("some/dir/10254_idx5_x1001_y1001_class1.png")["label"] == 1
    assert parse_patch_name("8863_idx5_x51_y1251_class2.png") is None
    assert parse_patch_name("random.png") is None


def test_index_kaggle_layout(tiny_tree):
    ix = index_dataset(tiny_tree)
    t = ix.table
    assert ix.layout == "kaggle"
    assert len(t) == 13
    assert list(t.columns) == ["path", "patient", "x", "y", "label", "width", "height"]
    assert set(t["patient"]) == {"101", "102"}
    assert t["path"].tolist() == sorted(t["path"].tolist())  # deterministic order
    edge = t[t["height"] < 50]
    assert len(edge) == 1 and edge.iloc[0]["width"] == 50 and edge.iloc[0]["height"] == 7


def test_index_accepts_kaggle_top_folder(tiny_tree, tmp_path):
    top = tmp_path / "kaggle"
    top.mkdir()
    tiny_tree.rename(top / "IDC_regular_ps50_idx5")
    ix = index_dataset(top)
    assert ix.root.name == "IDC_regular_ps50_idx5" and len(ix.table) == 13


def test_label_disagreement_names_the_file(tiny_tree):
    bad = write_patch(tiny_tree / "101" / "0" / "101_idx5_x1_y999_class1.png")
    with pytest.raises(DataError, match=bad.name):
        index_dataset(tiny_tree)


def test_corrupt_and_misnamed_files_are_skipped(tiny_tree):
    (tiny_tree / "101" / "0" / "101_idx5_x9_y9_class0.png").write_bytes(b"")
    (tiny_tree / "101" / "1" / "101_idx5_x9_y9_class1.png").write_bytes(b"not an image at all")
    write_patch(tiny_tree / "101" / "1" / "no_coordinates.png")
    ix = index_dataset(tiny_tree)
    reasons = dict(ix.skipped)
    assert len(ix.table) == 13 and len(ix.skipped) == 3
    assert "empty" in reasons["101/0/101_idx5_x9_y9_class0.png"]
    assert "101/1/no_coordinates.png" in reasons


def test_plain_layout_warns_and_groups_by_file(tmp_path, caplog):
    for label, name in ((0, "benign"), (1, "idc")):
        for k in range(3):
            write_patch(tmp_path / name / f"img{k}.png", color=(50 * label, 0, 0))
    ix = index_dataset(tmp_path)
    assert ix.layout == "plain"
    assert ix.table["patient"].nunique() == 6
    assert sorted(ix.table["label"].tolist()) == [0, 0, 0, 1, 1, 1]
    assert "every image is its own group" in caplog.text


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "123" / "0").mkdir(parents=True)
    with pytest.raises(DataError, match="no patches found"):
        index_dataset(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        index_dataset(tmp_path / "missing")


def test_index_files_mixes_files_and_folders(tiny_tree):
    one = next((tiny_tree / "101" / "1").glob("*.png"))
    ix = index_files([one, tiny_tree / "102"])
    assert len(ix.table) == 1 + 7
    assert ix.table.iloc[0]["label"] == 1


def test_name_gives_the_label_and_the_class_folder_the_rest(tmp_path):
    for rel in ("1/plain.png", "0/x_class1.png", "misc/x_class0.png", "misc/plain.png"):
        write_patch(tmp_path / "loose" / rel)
    table = index_files([tmp_path / "loose"]).table
    where = table["path"].map(lambda p: Path(p).relative_to(tmp_path / "loose").as_posix())
    labels = dict(zip(where, table["label"], strict=True))
    # Scoring needs no label: where name and folder disagree, the name's stands.
    assert labels == {
        "0/x_class1.png": 1,
        "1/plain.png": 1,
        "misc/plain.png": -1,
        "misc/x_class0.png": 0,
    }
    # Where labels are used, they must agree, in either layout.
    write_patch(tmp_path / "plain" / "idc" / "x_class0.png")
    with pytest.raises(DataError, match=r"x_class0.png: file name says class 0 .*'idc'"):
        index_dataset(tmp_path / "plain")


def test_skipped_table_round_trips_awkward_paths(tmp_path):
    import pandas as pd

    from idcscope.data.manifest import write_skipped

    skipped = [("101/0/a, b.png", 'says "empty"'), ("10é/1/c.png", "line one\nline two")]
    path = write_skipped(tmp_path / "skipped.csv", skipped)
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(table.columns) == ["path", "reason"]
    assert list(table.itertuples(index=False, name=None)) == skipped
    assert write_skipped(path, []).read_text() == "path,reason\n"  # replaced whole
    assert [p.name for p in tmp_path.iterdir()] == ["skipped.csv"]  # no temporary file left


def test_image_size_reads_png_header(tmp_path):
    p = write_patch(tmp_path / "a.png", size=(37, 50))
    assert image_size(p) == (37, 50)
    q = tmp_path / "b.jpg"
    from PIL import Image

    Image.new("RGB", (20, 30)).save(q)
    assert image_size(q) == (20, 30)
    Path(tmp_path / "c.png").write_bytes(p.read_bytes()[:12])
    with pytest.raises(DataError, match="truncated"):
        image_size(tmp_path / "c.png")


def test_real_sample_index(real_sample):
    ix = index_dataset(real_sample)
    assert len(ix.table) == 14637 and ix.n_patients == 14
    assert int(ix.table["label"].sum()) == 3447
    assert ((ix.table["width"] < 50) | (ix.table["height"] < 50)).sum() > 0


# ----------------------------------------------------------------------------- several folders


def _two_folders(synthetic_root, tmp_path):
    """The synthetic patients split over two folders; the first patient in both, each
    folder holding some of its files, and one file in both."""
    import shutil

    patients = sorted(p for p in synthetic_root.iterdir() if p.is_dir())
    a, b = tmp_path / "kaggle", tmp_path / "extra" / "more"
    for i, p in enumerate(patients):
        shutil.copytree(p, (a if i % 2 == 0 else b) / p.name)
    shared = patients[0]
    files = sorted(shared.rglob("*.png"))
    for f in files[: len(files) // 2 + 1]:  # one past the half: that file is in both
        target = b / f.relative_to(synthetic_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, target)
        if f != files[len(files) // 2]:
            (a / f.relative_to(synthetic_root)).unlink()
    return a, b, shared.name


def test_several_folders_are_one_dataset_merged_by_patient(synthetic_root, tmp_path):
    from idcscope.data.dataset import load_patch_data
    from idcscope.data.manifest import index_datasets

    a, b, shared = _two_folders(synthetic_root, tmp_path)
    whole = index_dataset(synthetic_root).table
    merged = index_datasets([a, b])
    assert merged.root == tmp_path
    assert len(merged.table) == len(whole)  # the file in both folders is counted once
    assert sorted(merged.table["path"].str.rsplit("/", n=1).str[-1]) == sorted(
        whole["path"].str.rsplit("/", n=1).str[-1]
    )
    assert merged.table["path"].str.startswith(("kaggle/", "extra/more/")).all()
    assert merged.n_patients == whole["patient"].nunique()
    rows = merged.table[merged.table["patient"] == shared]
    assert (
        rows["path"].str.startswith("kaggle/").any() and rows["path"].str.startswith("extra/").any()
    )
    data = load_patch_data([a, b])
    assert data.ok.all() and len(data.table) == len(whole)


def test_a_patch_in_two_folders_with_other_pixels_is_an_error(synthetic_root, tmp_path):
    from idcscope.data.manifest import index_datasets

    a, b, _ = _two_folders(synthetic_root, tmp_path)
    both = [p for p in b.rglob("*.png") if (a / p.relative_to(b)).exists()]
    assert len(both) == 1
    Image.new("RGB", (50, 50), (200, 40, 120)).save(both[0])
    with pytest.raises(DataError, match=r"same patch as .*other pixels"):
        index_datasets([a, b])


def test_train_and_evaluate_take_several_folders(synthetic_root, tmp_path):
    from typer.testing import CliRunner

    from idcscope.cli import app

    a, b, _ = _two_folders(synthetic_root, tmp_path)
    run = tmp_path / "run"
    res = CliRunner().invoke(
        app, ["train", str(a), str(b), "--out", str(run), "--epochs", "1", "--threads", "2"]
    )
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(
        app,
        [
            "evaluate",
            str(a),
            str(b),
            "--out",
            str(tmp_path / "ev"),
            "--model",
            str(run / "best.pt"),
        ],
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n"] == len(index_dataset(synthetic_root).table)
