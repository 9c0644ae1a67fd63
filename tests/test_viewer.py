"""The slide viewer's API: the slide library and its confinement, Deep Zoom tiles, the
P(IDC) overlay, measurements and inspecting a tile, on real patients rebuilt into
pyramidal TIFFs and scored with the model that ships."""

from __future__ import annotations

import io
import threading
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from idcscope.serve import Settings, create_app
from idcscope.serve.viewer import TILE_SIZE
from tests.conftest import VIEWER_PATIENT, slide_tiles

ZIP = Path(__file__).resolve().parents[1] / "idcscope" / "data" / "demo" / "9124.zip"


@pytest.fixture(scope="module")
def app(shipped, slide_library, tmp_path_factory):
    web = create_app(
        shipped, Settings(slides=str(slide_library), temp_dir=str(tmp_path_factory.mktemp("t")))
    )
    yield web
    web.state.views.close()
    web.state.jobs.close()


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def scored(client, view: dict, timeout: float = 300) -> dict:
    """The view once its scoring has ended."""
    deadline = time.monotonic() + timeout
    while True:
        view = client.get(f"/api/views/{view['id']}").json()
        if view["status"] in ("done", "error") or time.monotonic() > deadline:
            return view
        time.sleep(0.3)


@pytest.fixture(scope="module")
def library_view(client) -> dict:
    r = client.post("/api/views", params={"slide": f"{VIEWER_PATIENT}.tif"})
    assert r.status_code == 200, r.text
    view = scored(client, r.json())
    assert view["status"] == "done", view["error"]
    return view


# ----------------------------------------------------------------------------- library


def dicom_name(slide_library: Path) -> str:
    """The library's name of its DICOM slide: the first of the folder's level files."""
    return min(p.relative_to(slide_library).as_posix() for p in slide_library.glob("dicom/*"))


def test_the_library_lists_its_slides_only(client, slide_library):
    res = client.get("/api/slides").json()
    assert res["folder"] is True
    names = [s["name"] for s in res["slides"]]
    assert len(list(slide_library.glob("dicom/*.dcm"))) == 3  # a file per level ...
    # ... one slide; no link out, no text file
    assert names == [f"{VIEWER_PATIENT}.tif", dicom_name(slide_library), "sub/copy.tif"]
    assert res["slides"][0]["dzi"] == f"/api/slides/{VIEWER_PATIENT}.tif.dzi"


def test_library_slides_are_served_as_deep_zoom(client):
    dzi = client.get(f"/api/slides/{VIEWER_PATIENT}.tif.dzi")
    assert dzi.status_code == 200
    assert f'TileSize="{TILE_SIZE}"' in dzi.text and "<Size Width=" in dzi.text
    tile = client.get("/api/slides/sub/copy.tif_files/12/0_0.jpeg")
    assert tile.status_code == 200
    assert tile.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(tile.content)).size == (TILE_SIZE + 1, TILE_SIZE + 1)
    whole = Image.open(
        io.BytesIO(client.get(f"/api/slides/{VIEWER_PATIENT}.tif_files/0/0_0.jpeg").content)
    )
    assert whole.size == (1, 1)


def test_nothing_outside_the_folder_is_served(shipped, slide_library, tmp_path):
    # http.client sends each path as written: httpx would resolve the dot segments first;
    # an app of its own, as uvicorn closes the app it served when it stops
    import http.client
    from urllib.parse import urlsplit

    from tests.conftest import serving

    paths = [
        "../slides/8951.tif.dzi",
        "..%2Fslides%2F8951.tif.dzi",
        "sub/../8951.tif.dzi",
        "%2Fetc%2Fpasswd.dzi",
        "escape.tif.dzi",  # a link to a slide outside the folder
        "escaped/secret.tif.dzi",  # a link to a folder outside it
        "escape.tif_files/12/0_0.jpeg",
        "notes.txt.dzi",
        "missing.tif.dzi",
        "8951.tif_files/12/0_0.png",
        "8951.tif",
    ]
    app = create_app(shipped, Settings(slides=str(slide_library), temp_dir=str(tmp_path)))
    with serving(app) as served:
        url = urlsplit(served)
        for path in paths:
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
            try:
                conn.request("GET", f"/api/slides/{path}")
                r = conn.getresponse()
                body = r.read().decode()
            finally:
                conn.close()
            assert r.status == 404, path
            assert str(slide_library.parent) not in body, body  # no server path in answers


@pytest.mark.parametrize("name", ["../outside/secret.tif", "/etc/passwd", "escape.tif", "a\\b.tif"])
def test_views_of_names_outside_the_folder_are_refused(client, name):
    assert client.post("/api/views", params={"slide": name}).status_code == 404


@pytest.mark.parametrize(
    "tile",
    ["13/0_0.jpeg", "12/11_0.jpeg", "12/0_8.jpeg", "99/0_0.jpeg", "12/-1_0.jpeg", "x/0_0.jpeg"],
)
def test_tiles_out_of_range_are_404(client, library_view, tile):
    # 2650 x 1900 px: 13 levels, 11 x 8 tiles of 254 px at the last
    assert client.get(f"/api/slides/{VIEWER_PATIENT}.tif_files/{tile}").status_code == 404
    base = f"/api/views/{library_view['id']}"
    assert client.get(f"{base}/slide_files/{tile}").status_code == 404
    assert client.get(f"{base}/overlay_files/{tile.replace('jpeg', 'png')}").status_code == 404


def test_unknown_views_are_404(client):
    assert client.get("/api/views/nope").status_code == 404
    assert client.get("/api/views/nope/slide_files/0/0_0.jpeg").status_code == 404


def test_no_library_without_slides_folder(shipped, tmp_path):
    from idcscope.errors import IdcscopeError

    web = create_app(shipped, Settings(temp_dir=str(tmp_path)))
    try:
        with TestClient(web) as c:
            assert c.get("/api/slides").json() == {"folder": False, "slides": []}
            assert c.get("/api/slides/x.tif.dzi").status_code == 404
            assert c.get("/api/health").json()["library"] is False
    finally:
        web.state.jobs.close()
    with pytest.raises(IdcscopeError, match="does not exist"):
        create_app(shipped, Settings(slides=str(tmp_path / "missing")))


def test_serve_takes_a_slide_folder_and_stays_on_loopback(shipped, slide_library, monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from idcscope.cli import app as cli

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda web, **kw: served.update(web=web, **kw))
    res = CliRunner().invoke(cli, ["serve", "--slides", str(slide_library)])
    assert res.exit_code == 0, res.output
    web = served["web"]
    try:
        assert served["host"] == "127.0.0.1"
        assert web.state.library.folder == slide_library.resolve()
    finally:
        web.state.jobs.close()
    assert (
        CliRunner().invoke(cli, ["serve", "--slides", str(slide_library / "missing")]).exit_code
        == 2
    )


# ----------------------------------------------------------------------------- views


def test_a_view_measures_what_idcscope_slide_finds(library_view, slide_expected):
    m = library_view["measurements"]
    assert m["n_tiles"] == len(slide_expected)
    tile_mm2 = (50 * 4.0 / 1000) ** 2  # 50-px tiles at 4 µm/px
    assert m["tissue_mm2"] == pytest.approx(len(slide_expected) * tile_mm2, abs=1e-3)
    idc = int((slide_expected["prob_idc"] >= m["threshold"]).sum())
    assert m["idc_mm2"] == pytest.approx(idc * tile_mm2, abs=1e-3)
    assert m["idc_share"] == pytest.approx(idc / len(slide_expected))
    assert (
        m["calls"]
        == slide_expected["call"]
        .value_counts()
        .reindex(["idc", "no_idc", "uncertain"], fill_value=0)
        .to_dict()
    )
    assert library_view["mpp"] == 4.0 and library_view["grid_tile"] == 50.0
    assert library_view["tissue_tiles"] == len(slide_expected)
    assert "train or validate" in " ".join(library_view["warnings"])  # the model saw 8951


def test_inspecting_a_tile_gives_what_idcscope_slide_gives(client, library_view, slide_expected):
    base = f"/api/views/{library_view['id']}"
    for _, row in (
        slide_expected.sort_values("prob_idc").iloc[[0, len(slide_expected) // 2, -1]].iterrows()
    ):
        r = client.get(f"{base}/inspect", params={"x": row["x"] + 25, "y": row["y"] + 25})
        assert r.status_code == 200, r.text
        tile = r.json()
        assert (tile["row"], tile["col"]) == (row["row"], row["col"])
        assert tile["prob_idc"] == pytest.approx(row["prob_idc"], abs=1e-4)
        assert tile["call"] == row["call"]
        assert tile["neighbours"] == row["neighbours"]
        assert tile["around"][1][1] == pytest.approx(row["prob_idc"], abs=1e-4)
        assert tile["explanation"] == "block"  # the shipped model sees the neighbourhood
        for url in tile["images"].values():
            assert client.get(url).content.startswith(b"\x89PNG")
    glass = client.get(f"{base}/inspect", params={"x": 1, "y": 1})
    assert glass.status_code == 404
    assert "no tissue tile" in glass.json()["error"]


def overlay(client, view: dict, tile: str, **params) -> np.ndarray:
    r = client.get(f"/api/views/{view['id']}/overlay_files/{tile}", params=params)
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)))


def test_the_overlay_draws_the_scored_grid(client, library_view, slide_expected):
    # Level 12 is the slide's level 0: tile (tc, tr) starts at slide pixel (254 tc - 1, 254 tr - 1)
    middle = slide_expected.iloc[len(slide_expected) // 2]
    tc, tr = int(middle["x"] // TILE_SIZE), int(middle["y"] // TILE_SIZE)
    ox, oy = TILE_SIZE * tc - (tc > 0), TILE_SIZE * tr - (tr > 0)
    tile = f"12/{tc}_{tr}.png"
    rgba = overlay(client, library_view, tile, v=library_view["version"])
    assert rgba.shape[2] == 4
    cx, cy = slide_expected["x"] + 25 - ox, slide_expected["y"] + 25 - oy
    inside = (cx >= 0) & (cy >= 0) & (cx < rgba.shape[1]) & (cy < rgba.shape[0])
    assert inside.sum() > 5
    for (_, row), x, y in zip(
        slide_expected[inside].iterrows(), cx[inside], cy[inside], strict=True
    ):
        if row["call"] == "uncertain":
            assert tuple(rgba[y, x, :3]) in ((128, 128, 128), (255, 255, 255))
        else:
            assert rgba[y, x, 3] == 255
    scored = set(zip(slide_expected["row"], slide_expected["col"], strict=True))
    h, w = rgba.shape[:2]
    glass = [
        (r * 50 + 25 - oy, c * 50 + 25 - ox)
        for r in range(oy // 50, (oy + h) // 50 + 1)
        for c in range(ox // 50, (ox + w) // 50 + 1)
        if (r, c) not in scored
    ]
    glass = [(y, x) for y, x in glass if 0 <= y < h and 0 <= x < w]
    assert glass and all(rgba[y, x, 3] == 0 for y, x in glass)  # nothing scored: transparent
    # above every P(IDC), only the uncertain tiles are left; the tissue layer is the mask
    high = overlay(client, library_view, tile, threshold=1.0)
    assert not (high[..., 3] == 255).any()
    assert (high[..., 3] > 0).any() == (slide_expected[inside]["call"] == "uncertain").any()
    tissue = overlay(client, library_view, tile, layer="tissue")
    assert (tissue[cy[inside], cx[inside], 3] > 0).all()
    bar = Image.open(io.BytesIO(client.get("/api/colorbar.png").content))
    assert bar.size == (256, 12)


def test_inspect_waits_for_the_scores(client, app):
    lock = app.state.analyst.lock
    with lock:  # another analysis runs: the view is shown but not yet scored
        view = client.post("/api/views", params={"slide": "sub/copy.tif"}).json()
        assert view["status"] in ("queued", "reading")
        assert client.get(f"/api/views/{view['id']}/slide_files/12/0_0.jpeg").status_code == 200
        r = client.get(f"/api/views/{view['id']}/inspect", params={"x": 300, "y": 500})
        assert r.status_code == 409
    assert scored(client, view)["status"] == "done"


def test_a_patient_zip_is_viewed_as_its_rebuilt_slide(client, shipped, real_sample, tmp_path):
    from idcscope.spatial.heatmap import patient_slide

    r = client.post("/api/views/patient", files=[("files", ("9124.zip", ZIP.read_bytes()))])
    assert r.status_code == 200, r.text
    view = scored(client, r.json())
    assert view["status"] == "done", view["error"]
    assert view["name"] == "9124.tif"
    assert client.get(view["dzi"]).status_code == 200
    slide = patient_slide(real_sample / "9124", tmp_path / "9124.tif")
    tiles = slide_tiles(shipped, slide, tmp_path / "out")
    assert view["measurements"]["n_tiles"] == len(tiles)
    row = tiles.iloc[len(tiles) // 3]
    tile = client.get(
        f"/api/views/{view['id']}/inspect", params={"x": row["x"] + 10, "y": row["y"] + 40}
    ).json()
    assert tile["prob_idc"] == pytest.approx(row["prob_idc"], abs=1e-4)
    assert view["warnings"] == []  # 9124 was never seen by the shipped model


def test_an_uploaded_slide_is_viewed(client, slide_library):
    data = (slide_library / f"{VIEWER_PATIENT}.tif").read_bytes()
    r = client.post("/api/views/slide", files=[("files", ("upload.tif", data))])
    assert r.status_code == 200, r.text
    view = scored(client, r.json())
    assert view["status"] == "done", view["error"]
    assert view["name"] == "upload.tif"
    assert client.get(f"/api/views/{view['id']}/slide_files/12/0_0.jpeg").status_code == 200


def test_a_dicom_slide_is_viewed_as_idcscope_slide_scores_it(client, shipped, slide_library):
    """The patient's TIFF written as a DICOM WSI (JPEG tiles again: pixels within a few
    levels): OpenSlide reads it, the viewer shows and scores it as ``idcscope slide``
    does, and its tiles say what the TIFF's say, up to that re-encoding."""
    name = dicom_name(slide_library)
    view = scored(client, client.post("/api/views", params={"slide": name}).json())
    assert view["status"] == "done", view["error"]
    tiff = scored(client, client.post("/api/views", params={"slide": "sub/copy.tif"}).json())
    assert (view["width"], view["height"], view["mpp"]) == (tiff["width"], tiff["height"], 4.0)
    tile = client.get(f"/api/views/{view['id']}/slide_files/12/1_1.jpeg")
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
    expected = slide_tiles(shipped, slide_library / name, slide_library.parent / "dicom-out")
    m, theirs = view["measurements"], tiff["measurements"]
    assert m["n_tiles"] == len(expected)
    assert abs(m["n_tiles"] - theirs["n_tiles"]) <= 0.02 * theirs["n_tiles"]
    assert m["idc_share"] == pytest.approx(theirs["idc_share"], abs=0.03)
    row = expected.sort_values("prob_idc").iloc[-1]
    r = client.get(
        f"/api/views/{view['id']}/inspect", params={"x": row["x"] + 25, "y": row["y"] + 25}
    )
    assert r.json()["prob_idc"] == pytest.approx(row["prob_idc"], abs=1e-4)


def test_bad_uploads_to_the_viewer_are_refused(client):
    r = client.post("/api/views/patient", files=[("files", ("p.zip", b"not a zip"))])
    assert r.status_code == 400
    with zipfile.ZipFile(buf := io.BytesIO(), "w") as zf:
        zf.writestr("../evil.png", b"x")
    r = client.post("/api/views/patient", files=[("files", ("p.zip", buf.getvalue()))])
    assert r.status_code == 400
    r = client.post("/api/views/slide", files=[("files", ("x.tif", b"not a slide"))])
    assert r.status_code == 422
    assert "x.tif" in r.json()["error"]


def test_views_beyond_keep_are_closed_with_their_files(shipped, slide_library, tmp_path):
    web = create_app(
        shipped, Settings(slides=str(slide_library), temp_dir=str(tmp_path), keep_jobs=1)
    )
    try:
        with TestClient(web) as c:
            data = (slide_library / f"{VIEWER_PATIENT}.tif").read_bytes()
            first = c.post("/api/views/slide", files=[("files", ("a.tif", data))]).json()
            first = scored(c, first)
            folder = web.state.jobs.root
            assert len(list(folder.glob("view-*/slide/a.tif"))) == 1
            second = scored(c, c.post("/api/views", params={"slide": "sub/copy.tif"}).json())
            assert second["status"] == "done"
            assert c.get(f"/api/views/{first['id']}").status_code == 404
            assert c.get(f"/api/views/{first['id']}/slide_files/12/0_0.jpeg").status_code == 404
            assert list(folder.glob("view-*/slide/a.tif")) == []  # its upload is gone too
            assert c.get(f"/api/views/{second['id']}/slide_files/12/0_0.jpeg").status_code == 200
    finally:
        web.state.views.close()
        web.state.jobs.close()


def test_openseadragon_is_served_from_the_package(client):
    for path in ("openseadragon.min.js", "LICENSE.txt", "images/zoomin_rest.png"):
        assert client.get(f"/static/openseadragon/{path}").status_code == 200, path
    page = client.get("/")
    assert "/static/openseadragon/openseadragon.min.js" in page.text
    # the page's CSP allows one inline stylesheet, OpenSeadragon's, by its hash
    assert "style-src 'self' 'sha256-" in page.headers["content-security-policy"]


# ----------------------------------------------------------------------------- bands


def test_a_slide_scored_in_bands_gets_what_one_pass_gives(shipped, slide_library, monkeypatch):
    from idcscope.inference.predictor import Predictor
    from idcscope.spatial import slide
    from idcscope.spatial.wsi import read_slide

    predictor = Predictor(shipped)
    scan = read_slide(slide_library / f"{VIEWER_PATIENT}.tif", None, 4.0, 50, slide.MIN_TISSUE)
    assert slide.score_reach(predictor, 50) == 6  # the 3x3 input, then 5 cells of smoothing
    whole = slide.score_tiles(predictor, scan, VIEWER_PATIENT, 50)
    heard = []
    banded = slide.score_tiles(
        predictor, scan, VIEWER_PATIENT, 50, each=lambda *band: heard.append(band), height=2
    )
    assert len(heard) >= 10
    index = np.concatenate([i for i, _ in heard])
    assert sorted(index) == list(range(len(scan.tiles)))  # every tile heard of once
    for i, verdicts in heard:  # as heard, final
        np.testing.assert_array_equal(verdicts.prob, banded.prob[i])
    np.testing.assert_allclose(banded.prob, whole.prob, rtol=0, atol=1e-6)
    np.testing.assert_allclose(banded.margin, whole.margin, rtol=0, atol=1e-5)
    for mine, theirs in zip(banded[2:], whole[2:], strict=True):  # context, call, check
        np.testing.assert_array_equal(mine, theirs)
    # Without the halo, bands this thin lose the context their scores need.
    monkeypatch.setattr(slide, "score_reach", lambda *_: 0)
    bare = slide.score_tiles(predictor, scan, VIEWER_PATIENT, 50, each=lambda *_: None, height=2)
    assert np.abs(bare.prob - whole.prob).max() > 0.01


BAND = 8  # grid rows per band while a test holds the scoring after the first


@contextmanager
def held_after_first_band(monkeypatch):
    """The server's slide scoring in bands of ``BAND`` rows, held after the first band is
    drawn until the block ends; yields the event set then."""
    from idcscope.spatial import slide

    first, go_on, real = threading.Event(), threading.Event(), slide.score_tiles

    def held(predictor, scan, name, patch, each=None, height=None):
        def band(index, verdicts):
            each(index, verdicts)
            if not first.is_set():
                first.set()
                go_on.wait(120)

        return real(predictor, scan, name, patch, band, height=BAND)

    monkeypatch.setattr(slide, "score_tiles", held)
    try:
        yield first
    finally:
        go_on.set()


def test_the_overlay_fills_in_band_by_band(client, slide_expected, monkeypatch):
    """Scoring held after its first band: those tiles are drawn and inspected, as final,
    while the rest of the slide is transparent and not yet inspectable."""
    with held_after_first_band(monkeypatch) as first:
        view = client.post("/api/views", params={"slide": "sub/copy.tif"}).json()
        assert first.wait(120)
        view = client.get(f"/api/views/{view['id']}").json()
        assert view["status"] == "scoring" and view["version"] == 2  # the mask, one band
        assert 0 < view["scored_tiles"] < view["tissue_tiles"] == len(slide_expected)
        top = int(slide_expected["row"].min())
        done = slide_expected[slide_expected["row"] < top + BAND]
        later = slide_expected[slide_expected["row"] >= top + BAND]
        assert view["scored_tiles"] == len(done)
        base = f"/api/views/{view['id']}"
        for rows, status in ((done, 200), (later, 409)):
            row = rows.iloc[len(rows) // 2]
            r = client.get(f"{base}/inspect", params={"x": row["x"] + 5, "y": row["y"] + 5})
            assert r.status_code == status, r.text
            if status == 200:
                assert r.json()["prob_idc"] == pytest.approx(row["prob_idc"], abs=1e-4)
                assert r.json()["call"] == row["call"]
        # At level 10 (a quarter of the slide's size) a grid row is 12.5 px high and tile
        # 0_0 holds 20 rows: the first band is drawn, nothing below it.
        drawn = overlay(client, view, "10/0_0.png", v=view["version"])[..., 3] > 0
        edge = int((top + BAND) * 12.5)
        assert edge < drawn.shape[0] - 50
        assert drawn[:edge].any() and not drawn[edge + 1 :].any()
    view = scored(client, view)
    assert view["status"] == "done" and view["scored_tiles"] == len(slide_expected)
