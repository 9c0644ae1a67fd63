"""The web app's API: patches, a patient's zip, slides, downloads, and every upload refused."""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from idcscope.errors import DataError
from idcscope.serve import Settings, create_app
from idcscope.serve.uploads import UploadError, check_member_name, safe_name

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SETTINGS = Settings(
    max_upload_mb=1, max_patch_files=8, max_zip_members=200, max_unzipped_mb=2, keep_jobs=4
)


def image_bytes(color=(200, 120, 180), fmt="PNG", size=(50, 50)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def files(*named: tuple[str, bytes]) -> list:
    return [("files", (name, data, "application/octet-stream")) for name, data in named]


def patient_members(folder: Path, top: str = "") -> dict[str, bytes]:
    """A Kaggle patient folder as zip members (under ``top`` when given)."""
    return {
        top + p.relative_to(folder.parent).as_posix(): p.read_bytes() for p in folder.rglob("*.png")
    }


@pytest.fixture(scope="module")
def checkpoint(trained_run) -> Path:
    return trained_run / "best.pt"


@pytest.fixture(scope="module")
def patients(synthetic_root) -> list[Path]:
    return sorted(p for p in synthetic_root.iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def app(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return create_app(checkpoint, Settings(**{**SETTINGS.__dict__, "temp_dir": str(root)}))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def get_ok(client, url: str):
    r = client.get(url)
    assert r.status_code == 200, (url, r.text)
    return r


# ----------------------------------------------------------------------------- page, health


def test_health_describes_model_and_limits(client, app):
    r = get_ok(client, "/api/health").json()
    assert r["status"] == "ok"
    assert r["busy"] is False
    assert r["model"]["threshold"] == pytest.approx(app.state.analyst.predictor.threshold, abs=1e-4)
    assert r["model"]["contexts"] == []  # a model without measured contexts
    assert "temperature" not in r["model"]
    assert r["limits"]["max_upload_mb"] == 1
    assert ".png" in r["limits"]["patch_suffixes"]
    app.state.analyst.lock.acquire()
    try:  # health answers, and says so, while an analysis holds the model
        assert get_ok(client, "/api/health").json()["busy"] is True
    finally:
        app.state.analyst.lock.release()


def test_page_and_its_assets_are_served(client):
    page = get_ok(client, "/")
    assert "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text
    assert "Research use only" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("app.js", "style.css", "index.html"):
        assert get_ok(client, f"/static/{asset}").content
    assert "http" not in get_ok(client, "/static/app.js").text.replace("XMLHttpRequest", "")


# ----------------------------------------------------------------------------- patches


def test_patches_are_predicted_and_explained(client, app, patients):
    real = [sorted((patients[0] / c).glob("*.png"))[0] for c in "01"]
    sent = [(p.name, p.read_bytes()) for p in real] + [("plain.jpg", image_bytes(fmt="JPEG"))]
    r = client.post("/api/patches", files=files(*sent))
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["n_files"] == res["n_predicted"] == 3
    assert res["explanation"] == "block"  # the fixture is a neighbourhood model
    assert sum(res["calls"].values()) == 3
    rows = {row["file"]: row for row in res["rows"]}
    assert [rows[p.name]["label"] for p in real] == [0, 1]
    assert rows["plain.jpg"]["label"] is None
    predictor = app.state.analyst.predictor
    for name, data in sent:
        row = rows[name]
        assert row["error"] == ""
        assert 0 <= row["prob_idc"] <= 1
        assert row["pred"] == int(row["prob_idc"] >= res["threshold"])
        # the same P(IDC) as the model's own inference (bf16 there, fp32 here)
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[None]
        assert row["prob_idc"] == pytest.approx(predictor.predict_proba(image)[0], abs=0.02)
        # a model without contexts decides every patch at its threshold, and has no AUC
        assert row["call"] == ("idc" if row["pred"] else "no_idc")
        assert row["input_check"] == "ok"
        assert row["context"] is None and row["context_auc"] is None
        # scored with those of its 8 neighbours uploaded with it; alone without a place
        assert row["neighbours"] is None if name == "plain.jpg" else 0 <= row["neighbours"] <= 8
        # the block the model saw and the evidence over it, the patch in its centre
        assert set(row["images"]) == {"block", "neighbourhood", "patch_planes"}
        for url in row["images"].values():
            png = get_ok(client, url)
            assert png.content.startswith(PNG_MAGIC)
            block = np.asarray(Image.open(io.BytesIO(png.content)).convert("RGB"))
            assert block.shape == (300, 300, 3)
            # the patch outlined, two pixels wide: seen at half size too
            assert (block[[100, 101, 198, 199], 100:200] == 0).all()
            assert (block[100:200, [100, 101, 198, 199]] == 0).all()
        assert set(row["evidence"]) == {"patch", "neighbourhood"}


def test_corrupt_file_is_reported_and_the_others_predicted(client):
    good, bad = ("good_class1.png", image_bytes()), ("broken.png", b"\x89PNG\r\n\x1a\nnot really")
    r = client.post("/api/patches", files=files(good, bad, ("notes.txt", b"hello")))
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["n_files"] == 3
    assert res["n_predicted"] == 1
    rows = {row["file"]: row for row in res["rows"]}
    assert rows["good_class1.png"]["prob_idc"] is not None
    assert "not a readable image" in rows["broken.png"]["error"]
    assert "/" not in rows["broken.png"]["error"]  # no server path in the message
    assert ".txt not accepted" in rows["notes.txt"]["error"]
    assert rows["notes.txt"]["prob_idc"] is None
    res = client.post("/api/patches", files=files(bad)).json()  # nothing left to predict
    assert res["n_predicted"] == 0
    assert res["rows"][0]["error"]


# Names the page and ``predict`` must read alike: Kaggle names, a label without a place, a
# patient id with underscores, numbers too long to be a place, near misses and no label.
ODD_NAMES = (
    "8863_idx5_x51_y1251_class0.png",
    "x_class1.png",
    "p_q_idx5_x1_y2_class1.png",
    "a_idx5_x1234567890_y1_class1.png",
    "scan 7 é_class0.png",
    "x_class1_copy.png",
    "x_class2.png",
    "plain.png",
)


def test_the_page_reads_names_as_predict_does(client, app, monkeypatch, tmp_path):
    from idcscope.data.manifest import index_files

    explainer, seen = app.state.analyst.explainer, []
    explain = explainer.explain
    monkeypatch.setattr(explainer, "explain", lambda table: seen.append(table) or explain(table))
    res = client.post("/api/patches", files=files(*[(n, image_bytes()) for n in ODD_NAMES]))
    assert res.status_code == 200, res.text
    page = seen[0].assign(file=[row["file"] for row in res.json()["rows"]])
    page["shown"] = [-1 if row["label"] is None else row["label"] for row in res.json()["rows"]]
    folder = tmp_path / "patches"  # not a class folder: the names alone tell
    folder.mkdir()
    for name in ODD_NAMES:
        (folder / name).write_bytes(image_bytes())
    table = index_files([folder]).table
    table["file"] = table["path"].map(lambda p: Path(p).name)
    fields = ["file", "patient", "x", "y", "label"]
    assert page[fields].sort_values("file").values.tolist() == (
        table[fields].sort_values("file").values.tolist()
    )
    assert (page["shown"] == page["label"]).all()  # the label the page shows is the one read
    labels = dict(zip(table["file"], table["label"], strict=True))
    assert labels["x_class1.png"] == 1 and labels["x_class1_copy.png"] == -1
    assert labels["a_idx5_x1234567890_y1_class1.png"] == 1


def test_patch_csv_downloads(client):
    sent = files(("a_class0.png", image_bytes()), ("b.png", image_bytes((90, 40, 160))))
    res = client.post("/api/patches", files=sent).json()
    r = get_ok(client, res["files"]["csv"])
    assert r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert [t["file"] for t in table] == ["a_class0.png", "b.png"]
    assert list(table[0]) == [
        "file", "patient", "x", "y", "label", "neighbours", "prob_idc", "pred", "call", "input_check", "error", "margin"
    ]  # fmt: skip
    assert table[0]["label"] == "0"
    assert table[1]["label"] == ""
    for t, row in zip(table, res["rows"], strict=True):
        assert float(t["prob_idc"]) == pytest.approx(row["prob_idc"])


# ----------------------------------------------------------------------------- refusals


def test_wrong_extension_is_refused(client):
    r = client.post("/api/patches", files=files(("scan.exe", b"MZ"), ("notes.txt", b"x")))
    assert r.status_code == 415
    body = r.json()
    assert "accepted" in body["error"]
    assert [f["file"] for f in body["files"]] == ["scan.exe", "notes.txt"]
    r = client.post("/api/patient", files=files(("patient.tar", b"x")))
    assert r.status_code == 415
    r = client.post("/api/slide", files=files(("slide.mrxs", b"x")))
    assert r.status_code == 415
    assert ".mrxs" in r.json()["error"] or ".mrxs" in r.json()["files"][0]["error"]


def test_oversize_upload_is_refused_with_413(client, app):
    big = files(("big.png", b"\0" * (1024 * 1024 + 10)))
    r = client.post("/api/patches", files=big)
    assert r.status_code == 413
    assert "limit is 1 MB" in r.json()["error"]
    # without a Content-Length header the server counts the bytes as they come
    boundary = "xyz"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'

    def chunked():
        yield head.encode()
        for _ in range(20):
            yield b"\0" * 100_000

    r = client.post(
        "/api/patches",
        content=chunked(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413
    jobs = app.state.jobs
    assert all(job.done for job in jobs._jobs.values())  # refused jobs are gone


def test_too_many_files_and_bad_forms_are_refused(client):
    many = files(*[(f"p{i}.png", image_bytes()) for i in range(SETTINGS.max_patch_files + 1)])
    assert client.post("/api/patches", files=many).status_code == 413
    r = client.post("/api/patches", content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "multipart" in r.json()["error"]
    r = client.post("/api/patches", data={"note": "no file"})
    assert r.status_code == 400
    r = client.post("/api/patient", files=files(("a.zip", b"PK"), ("b.zip", b"PK")))
    assert r.status_code == 413
    r = client.post("/api/slide?mpp=-1", files=files(("s.svs", b"x")))
    assert r.status_code == 422
    assert "mpp" in r.json()["error"]


# ----------------------------------------------------------------------------- patient zips


def test_patient_zip_gives_heatmap_summary_and_csv(client, patients):
    patient = patients[0]
    members = patient_members(patient, top="IDC_regular_ps50_idx5/")
    members["__MACOSX/._x.png"] = b"junk"
    members["README.txt"] = b"about this patient"
    r = client.post("/api/patient", files=files(("patient.zip", zip_bytes(members))))
    assert r.status_code == 200, r.text
    res = r.json()
    s = res["summary"]
    n = len(list(patient.rglob("*.png")))
    assert s["patient"] == patient.name
    assert s["n_patches"] == n
    assert 0 <= s["idc_fraction_pred"] <= 1
    assert 0 <= s["idc_fraction_true"] <= 1
    assert "dice" in s
    assert "iou" in s
    assert [f["file"] for f in res["skipped"]] == ["README.txt"]
    png = get_ok(client, res["files"]["heatmap"])
    assert png.content.startswith(PNG_MAGIC)
    assert "inline" in png.headers["content-disposition"]
    assert get_ok(client, res["files"]["probability"]).content.startswith(PNG_MAGIC)
    table = list(csv.DictReader(io.StringIO(get_ok(client, res["files"]["csv"]).text)))
    assert len(table) == n
    assert {"path", "x", "y", "label", "prob_idc", "pred"} <= set(table[0])
    assert get_ok(client, res["files"]["json"]).json()["patient"] == patient.name


def test_flat_patient_zip_reports_unreadable_patches(client, patients):
    patient = patients[1]
    members = {p.name: p.read_bytes() for p in patient.rglob("*.png")}
    broken = f"{patient.name}_idx5_x9999_y9999_class0.png"
    members[broken] = b"\x89PNG\r\n\x1a\ntruncated"
    res = client.post("/api/patient", files=files(("flat.zip", zip_bytes(members)))).json()
    assert res["summary"]["n_patches"] == len(members) - 1
    assert res["skipped"] == [{"file": broken, "error": "not a readable image"}]


def test_zip_slip_is_refused(client, app):
    root = app.state.jobs.root
    for evil in ("../evil.png", "a/../../evil.png", "/tmp/evil.png", "C:\\evil.png"):
        data = zip_bytes({"9000_idx5_x1_y1_class0.png": image_bytes(), evil: image_bytes()})
        r = client.post("/api/patient", files=files(("evil.zip", data)))
        assert r.status_code == 400, evil
        assert evil in r.json()["error"]
    assert not list(root.parent.rglob("evil.png"))


def test_zip_bombs_and_bad_zips_are_refused(client, patients):
    members = {f"9000_idx5_x{i}_y1_class0.png": b"" for i in range(SETTINGS.max_zip_members + 1)}
    r = client.post("/api/patient", files=files(("many.zip", zip_bytes(members))))
    assert r.status_code == 413
    assert "members" in r.json()["error"]
    bomb = zip_bytes({"9000_idx5_x1_y1_class0.png": b"\0" * (3 * 1024 * 1024)})
    assert len(bomb) < 100_000
    r = client.post("/api/patient", files=files(("bomb.zip", bomb)))
    assert r.status_code == 413
    assert "unpacks to" in r.json()["error"]
    r = client.post("/api/patient", files=files(("fake.zip", b"not a zip at all")))
    assert r.status_code == 400
    assert "zip" in r.json()["error"]
    two = patient_members(patients[0]) | patient_members(patients[1])
    r = client.post("/api/patient", files=files(("two.zip", zip_bytes(two))))
    assert r.status_code == 422
    assert "2 patients" in r.json()["error"]
    r = client.post("/api/patient", files=files(("none.zip", zip_bytes({"a.png": b"x"}))))
    assert r.status_code == 422
    assert r.json()["files"] == [
        {"file": "a.png", "error": "name is not <patient>_idx5_x<X>_y<Y>_class<C>.png"}
    ]


# ----------------------------------------------------------------------------- downloads, jobs


def test_unknown_jobs_and_files_give_404(client):
    res = client.post("/api/patches", files=files(("a.png", image_bytes()))).json()
    job = res["job"]
    for url in (
        "/api/jobs/nope/files/predictions.csv",
        f"/api/jobs/{job}/files/nope.csv",
        f"/api/jobs/{job}/files/..%2F..%2Fetc%2Fpasswd",
        f"/api/jobs/{job}/files/%2e%2e",
        f"/api/jobs/..%2F{job}/files/predictions.csv",
        f"/api/jobs/{job}/files/a.png",  # the upload itself is never served
    ):
        r = client.get(url)
        assert r.status_code == 404, url
        assert "error" in r.json()
    assert get_ok(client, f"/api/jobs/{job}/files/predictions.csv")


def test_old_jobs_are_removed(client, app):
    first = client.post("/api/patches", files=files(("a.png", image_bytes()))).json()
    folder = app.state.jobs._jobs[first["job"]].folder
    assert folder.is_dir()
    for _ in range(SETTINGS.keep_jobs):
        client.post("/api/patches", files=files(("a.png", image_bytes())))
    assert client.get(first["files"]["csv"]).status_code == 404
    assert not folder.exists()
    assert len(app.state.jobs._jobs) == SETTINGS.keep_jobs


# ----------------------------------------------------------------------------- slides


def test_slide_endpoint_wiring(client, monkeypatch):
    """The endpoint against slide_inference's contract, with a stand-in that writes the files."""
    from idcscope.spatial import slide

    seen = {}

    def fake(predictor, slide_path, out_dir, *, slide_mpp=None, **kw):
        path = Path(slide_path)
        seen.update(path=path, data=path.read_bytes(), mpp=slide_mpp, predictor=predictor)
        out = Path(out_dir)
        out.mkdir(parents=True)
        paths = {
            "overlay": out / "s_overlay.png",
            "geojson": out / "s_idc.geojson",
            "tiles_csv": out / "s_tiles.csv",
        }
        paths["overlay"].write_bytes(image_bytes())
        paths["geojson"].write_text('{"type": "FeatureCollection", "features": []}')
        paths["tiles_csv"].write_text("row,col,prob_idc\n0,0,0.9\n")
        return {
            "slide": str(slide_path),
            "n_tiles": 1,
            "idc_fraction": 1.0,
            "tiles_per_s": 10.0,
            "files": {k: str(v) for k, v in paths.items()},
        }

    monkeypatch.setattr(slide, "slide_inference", fake)
    r = client.post("/api/slide?mpp=0.25", files=files(("my slide.svs", b"II*\0")))
    assert r.status_code == 200, r.text
    res = r.json()
    assert seen["mpp"] == 0.25
    assert seen["data"] == b"II*\0"
    assert not seen["path"].exists()  # the upload is deleted once analysed
    assert seen["path"].name == "my_slide.svs"
    assert res["summary"] == {
        "slide": "my slide.svs",
        "n_tiles": 1,
        "idc_fraction": 1.0,
        "tiles_per_s": 10.0,
    }
    assert set(res["files"]) == {"overlay", "geojson", "tiles_csv"}
    assert get_ok(client, res["files"]["overlay"]).content.startswith(PNG_MAGIC)
    assert get_ok(client, res["files"]["geojson"]).json()["features"] == []
    assert "0.9" in get_ok(client, res["files"]["tiles_csv"]).text

    def failing(*a, **kw):
        raise DataError("my_slide.svs: the slide does not record its resolution; pass mpp")

    monkeypatch.setattr(slide, "slide_inference", failing)
    r = client.post("/api/slide", files=files(("my slide.svs", b"II*\0")))
    assert r.status_code == 422
    assert "resolution" in r.json()["error"]


def patient_slide(patient: Path, folder: Path) -> Path:
    """A patient's patches put back together as a pyramidal TIFF at 4 µm/px."""
    from idcscope.spatial.heatmap import patient_slide

    return patient_slide(patient, folder / "synthetic.tif", mpp=4.0)


def test_real_slide(client, patients, tmp_path):
    path = patient_slide(patients[0], tmp_path)
    r = client.post("/api/slide", files=files(("synthetic.tif", path.read_bytes())))
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["summary"]["n_tiles"] > 0
    assert get_ok(client, res["files"]["overlay"]).content.startswith(PNG_MAGIC)


# ----------------------------------------------------------------------------- calls, contexts


def hand_set_contexts(threshold: float, temperature: float, bias: float) -> list[dict]:
    """Scoring contexts of a model, as training measures them: a patch with 0-4 of its
    neighbours is never decided (a band from 0 to 1), one with 5-8 always is."""
    never = {"temperature": 1.0, "logit_bias": 0.0, "band": [0.0, 1.0]}
    return [
        {"name": "alone", "neighbours": [0, 0], **never, "n": 120, "measured": {
            "auc": 0.61, "ece": 0.08, "coverage": 0.0, "sensitivity_decided": None,
            "specificity_decided": None, "n_patients": 4}},
        # numbers not measured: the page says n/a
        {"name": "1-4 neighbours", "neighbours": [1, 4], **never, "measured": {}},
        {"name": "5-8 neighbours", "neighbours": [5, 8], "temperature": temperature,
         "logit_bias": bias, "band": [threshold, threshold], "n": 900, "measured": {
            "auc": 0.93, "ece": 0.02, "coverage": 1.0, "sensitivity_decided": 0.9,
            "specificity_decided": 0.88, "n_patients": 4}},
    ]  # fmt: skip


def with_contexts(checkpoint: Path, folder: Path) -> Path:
    """A copy of ``checkpoint`` in ``folder`` with hand-set scoring contexts
    (``hand_set_contexts``)."""
    import shutil

    from idcscope.models.checkpoint import read_meta, update_checkpoint

    path = Path(shutil.copy(checkpoint, folder / "contexts.pt"))
    meta = read_meta(path)
    return update_checkpoint(path, contexts=hand_set_contexts(meta.threshold, *meta.calibrated()))


@pytest.fixture(scope="module")
def contexts_checkpoint(checkpoint, tmp_path_factory) -> Path:
    return with_contexts(checkpoint, tmp_path_factory.mktemp("contexts"))


@pytest.fixture(scope="module")
def contexts_client(contexts_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_contexts")
    settings = {**SETTINGS.__dict__, "temp_dir": str(root), "max_patch_files": 20}
    with TestClient(create_app(contexts_checkpoint, Settings(**settings))) as c:
        yield c


def full_block(patient: Path) -> list[Path]:
    """The 9 patches of a 3x3 block of ``patient`` that has all of them, centre first."""
    import re

    places = {}
    for p in patient.rglob("*.png"):
        x, y = map(int, re.search(r"_x(\d+)_y(\d+)_", p.name).groups())
        places[x, y] = p
    around = [(dx, dy) for dy in (0, -50, 50) for dx in (0, -50, 50)]
    for x, y in sorted(places):
        if all((x + dx, y + dy) in places for dx, dy in around):
            return [places[x + dx, y + dy] for dx, dy in around]
    raise AssertionError(f"{patient.name} has no full 3x3 block")


def test_health_describes_the_contexts(contexts_client, contexts_checkpoint):
    model = get_ok(contexts_client, "/api/health").json()["model"]
    alone, few, many = model["contexts"]
    assert alone == {
        "name": "alone", "neighbours": [0, 0], "band": [0.0, 1.0], "auc": 0.61, "coverage": 0.0
    }  # fmt: skip
    assert few["auc"] is None and few["coverage"] is None  # not measured: n/a on the page
    assert many["band"][0] == many["band"][1] == pytest.approx(model["threshold"], abs=1e-4)
    assert (many["auc"], many["coverage"]) == (0.93, 1.0)


def test_uncertain_patches_are_called_counted_and_put_in_context(contexts_client, patients):
    block = full_block(patients[0])
    sent = [(p.name, p.read_bytes()) for p in block] + [("plain.png", image_bytes())]
    r = contexts_client.post("/api/patches", files=files(*sent))
    assert r.status_code == 200, r.text
    res = r.json()
    rows = {row["file"]: row for row in res["rows"]}
    centre, corners = rows[block[0].name], [rows[p.name] for p in (block[4], block[5])]
    assert centre["neighbours"] == 8
    assert centre["call"] == ("idc" if centre["pred"] else "no_idc")
    assert (centre["context"], centre["context_auc"]) == ("5-8 neighbours", 0.93)
    for corner in corners:  # 3 of its 8 neighbours uploaded: never decided
        assert corner["neighbours"] == 3
        assert corner["call"] == "uncertain"
        assert (corner["context"], corner["context_auc"]) == ("1-4 neighbours", None)
    plain = rows["plain.png"]
    assert plain["neighbours"] is None
    assert plain["call"] == "uncertain"
    assert (plain["context"], plain["context_auc"]) == ("alone", 0.61)
    # the four corners and the lone patch; the edges have 5 neighbours, the centre 8
    assert res["calls"]["uncertain"] == 5
    assert res["calls"]["idc"] + res["calls"]["no_idc"] == 5
    table = list(csv.DictReader(io.StringIO(get_ok(contexts_client, res["files"]["csv"]).text)))
    assert {t["file"]: t["call"] for t in table} == {f: row["call"] for f, row in rows.items()}


def test_the_input_check_reason_is_shown(contexts_client, patients, monkeypatch):
    from idcscope.inference import predictor

    def flat_is_glass(params, images, workers=None):  # a stand-in for a fitted check
        flat = images.std(axis=(1, 2)).max(axis=1) < 1
        return np.where(flat, "glass", "ok").astype(object)

    monkeypatch.setattr(predictor, "check_patches", flat_is_glass)
    block = full_block(patients[0])
    sent = [(p.name, p.read_bytes()) for p in block] + [("plain.png", image_bytes())]
    res = contexts_client.post("/api/patches", files=files(*sent)).json()
    rows = {row["file"]: row for row in res["rows"]}
    assert rows["plain.png"]["input_check"] == "glass"
    assert rows[block[0].name]["input_check"] == "ok"
    assert rows[block[0].name]["call"] != "uncertain"
    # flagged, a patch is uncertain whatever its context
    monkeypatch.setattr(predictor, "check_patches", lambda p, images, workers=None: np.full(
        len(images), "stain", dtype=object
    ))  # fmt: skip
    res = contexts_client.post("/api/patches", files=files(*sent)).json()
    assert res["calls"] == {"idc": 0, "no_idc": 0, "uncertain": 10}
    centre = next(row for row in res["rows"] if row["file"] == block[0].name)
    assert (centre["call"], centre["input_check"]) == ("uncertain", "stain")


def test_patient_zip_counts_its_uncertain_patches(contexts_client, patients):
    patient = patients[0]
    zipped = zip_bytes(patient_members(patient))
    res = contexts_client.post("/api/patient", files=files(("p.zip", zipped))).json()
    s = res["summary"]
    assert s["calls"]["uncertain"] > 0
    assert s["calls"]["idc"] + s["calls"]["no_idc"] > 0
    assert sum(s["calls"].values()) == s["n_patches"]
    assert s["input_check"] == {"ok": s["n_patches"]}
    table = list(csv.DictReader(io.StringIO(get_ok(contexts_client, res["files"]["csv"]).text)))
    uncertain = [t for t in table if t["call"] == "uncertain"]
    assert len(uncertain) == s["calls"]["uncertain"]
    assert all(int(t["neighbours"]) <= 4 for t in uncertain)  # the contexts never decided
    # the heatmaps hatch them (tests/test_heatmap.py checks the drawing)
    assert get_ok(contexts_client, res["files"]["heatmap"]).content.startswith(PNG_MAGIC)


def test_slide_marks_its_uncertain_tiles(contexts_client, patients, tmp_path, monkeypatch):
    from idcscope.spatial import heatmap, slide

    drawn = {}
    real = slide.slide_inference

    def keep_first_overlay(*args, **kwargs):  # the overlay as spatial.slide draws it
        summary = real(*args, **kwargs)
        drawn["overlay"] = Path(summary["files"]["overlay"]).read_bytes()
        return summary

    monkeypatch.setattr(slide, "slide_inference", keep_first_overlay)
    hatched = []
    plot = heatmap.plot_patient_heatmap

    def plot_and_keep(*args, **kwargs):
        hatched.append(kwargs.get("uncertain"))
        return plot(*args, **kwargs)

    monkeypatch.setattr(heatmap, "plot_patient_heatmap", plot_and_keep)
    sent = files(("synthetic.tif", patient_slide(patients[0], tmp_path).read_bytes()))
    res = contexts_client.post("/api/slide", files=sent).json()
    s = res["summary"]
    tiles = list(
        csv.DictReader(io.StringIO(get_ok(contexts_client, res["files"]["tiles_csv"]).text))
    )
    assert s["calls"]["uncertain"] == sum(t["call"] == "uncertain" for t in tiles) > 0
    assert sum(s["calls"].values()) == s["n_tiles"] == len(tiles)
    assert s["input_check"] == {"ok": len(tiles)}
    overlay = get_ok(contexts_client, res["files"]["overlay"]).content
    assert overlay.startswith(PNG_MAGIC)
    assert overlay == drawn["overlay"]  # drawn once, where the slide is read
    assert hatched[0].sum() == s["calls"]["uncertain"]  # with its uncertain tiles hatched
    assert res["warnings"] == []


# ----------------------------------------------------------------------------- seen patients


def seen_and_unseen(app, patients) -> tuple[Path, Path]:
    """A patient the fixture model trained on, and one it was tested on (never seen)."""
    splits = app.state.analyst.meta.splits
    by_id = {p.name: p for p in patients}
    return by_id[splits["train"][0]], by_id[splits["test"][0]]


def test_a_patient_the_model_saw_is_warned_of(client, app, patients):
    seen, unseen = seen_and_unseen(app, patients)
    warning = (
        f"patient {seen.name} was used to train or validate the model; its numbers are optimistic"
    )
    for patient, warnings in ((seen, [warning]), (unseen, [])):
        zipped = zip_bytes(patient_members(patient))
        res = client.post("/api/patient", files=files(("p.zip", zipped))).json()
        assert res["warnings"] == warnings, patient.name
    one = [next(p.rglob("*.png")) for p in (seen, unseen)]
    res = client.post("/api/patches", files=files(*[(p.name, p.read_bytes()) for p in one]))
    assert res.json()["warnings"] == [warning]
    res = client.post("/api/patches", files=files((one[1].name, one[1].read_bytes())))
    assert res.json()["warnings"] == []


def test_a_slide_named_for_a_patient_the_model_saw_is_warned_of(client, app, patients, monkeypatch):
    from idcscope.spatial import slide

    def fake(predictor, slide_path, out_dir, **kw):
        return {"n_tiles": 0, "files": {}}

    monkeypatch.setattr(slide, "slide_inference", fake)
    seen, unseen = seen_and_unseen(app, patients)
    res = client.post("/api/slide?mpp=0.25", files=files((f"{seen.name}.svs", b"II*\0"))).json()
    assert res["warnings"] == [
        f"patient {seen.name} was used to train or validate the model; its numbers are optimistic"
    ]
    res = client.post("/api/slide?mpp=0.25", files=files((f"{unseen.name}.svs", b"II*\0")))
    assert res.json()["warnings"] == []


# ----------------------------------------------------------------------------- helpers, CLI


@pytest.mark.parametrize(
    ("raw", "safe"),
    [
        ("a.png", "a.png"),
        ("../../etc/passwd", "passwd"),
        ("C:\\Users\\x\\scan 1.svs", "scan_1.svs"),
        (".hidden.png", "hidden.png"),
        ("..", "upload"),
        ("é/ü.png", "_.png"),
        ("x" * 300 + ".png", "x" * 116 + ".png"),
    ],
)
def test_safe_name(raw, safe):
    assert safe_name(raw) == safe


@pytest.mark.parametrize(
    "name", ["../a.png", "a/../../b", "/etc/passwd", "\\x", "D:/x", "a\\..\\b"]
)
def test_check_member_name_refuses_escapes(name):
    with pytest.raises(UploadError) as e:
        check_member_name(name)
    assert e.value.status == 400
    check_member_name("patient/0/a..b.png")  # dots inside a name are fine


def test_cli_serve_builds_the_app(checkpoint, monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from idcscope.cli import app as cli

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda web, **kw: served.update(web=web, **kw))
    res = CliRunner().invoke(cli, ["serve", "--model", str(checkpoint), "--port", "8123"])
    assert res.exit_code == 0, res.output
    assert served["port"] == 8123
    assert served["host"] == "127.0.0.1"
    served["web"].state.jobs.close()
    res = CliRunner().invoke(cli, ["serve", "--model", "missing.pt"])
    assert res.exit_code == 1
    res = CliRunner().invoke(cli, ["serve"])  # no model given: the one that ships
    assert res.exit_code == 0, res.output
    assert "idc-default" in str(served["web"].state.analyst.describe())
    served["web"].state.jobs.close()
    res = CliRunner().invoke(cli, ["serve", "--alpha", "0.1"])  # calls with that band
    assert res.exit_code == 0, res.output
    analyst = served["web"].state.analyst
    shown = analyst.describe()["contexts"]
    assert [c["band"] for c in shown] == [
        [round(b, 4) for b in band] for band in analyst.meta.bands(0.1)
    ]  # the page shows the band it calls with, and no coverage measured at another
    assert all(c["coverage"] is None and c["auc"] is not None for c in shown)
    served["web"].state.jobs.close()
