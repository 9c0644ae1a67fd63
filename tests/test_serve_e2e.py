"""The real server on a free port, and the page driven in headless Chromium with Playwright."""

from __future__ import annotations

import shutil
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from idcscope.serve import Settings, create_app
from tests.conftest import serving
from tests.test_serve import files, image_bytes


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    """``(base URL, app)`` of uvicorn serving the tiny trained model in a thread."""
    app = create_app(
        trained_run / "best.pt", Settings(temp_dir=str(tmp_path_factory.mktemp("e2e")))
    )
    with serving(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api  # the test extra

    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("no `chromium` on PATH (CI installs Debian's chromium package)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the app; ``page.console_errors`` collects what the console reports."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = context.new_page()
    pg.console_errors = []
    pg.on("console", lambda m: m.type == "error" and pg.console_errors.append(m.text))
    pg.on("pageerror", lambda e: pg.console_errors.append(str(e)))
    pg.goto(server[0])
    pg.wait_for_selector("#model .pill")
    yield pg
    context.close()


@pytest.fixture(scope="module")
def patient(synthetic_root) -> Path:
    return sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]


def images_loaded(page, selector: str) -> None:
    page.wait_for_function(
        """sel => {
            const imgs = [...document.querySelectorAll(sel)];
            return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
        }""",
        arg=selector,
    )


def test_health_answers_while_an_analysis_waits(server):
    url, app = server
    lock = app.state.analyst.lock
    lock.acquire()
    result = {}
    try:

        def post():
            sent = files(("a.png", image_bytes()))
            result["r"] = httpx.post(f"{url}/api/patches", files=sent, timeout=60)

        thread = threading.Thread(target=post)
        thread.start()
        time.sleep(0.5)  # the upload is in and waits for the model
        health = httpx.get(f"{url}/api/health", timeout=5).json()  # answers, not queued
        assert health["busy"] is True
        assert "r" not in result
    finally:
        lock.release()
    thread.join(60)
    assert result["r"].status_code == 200


def test_patches_in_the_page_match_the_api(page, server, patient, tmp_path):
    url, _ = server
    paths = [sorted((patient / c).glob("*.png"))[0] for c in "01"]
    broken = tmp_path / "broken_class1.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    with page.expect_response("**/api/patches") as answer:
        page.set_input_files("#patch-input", [*map(str, paths), str(broken)])
    shown = answer.value.json()
    page.wait_for_selector("#patch-results:not([hidden])")
    images_loaded(page, "#patch-results tbody img")

    direct = httpx.post(
        f"{url}/api/patches", files=files(*[(p.name, p.read_bytes()) for p in paths])
    ).json()
    for p, expected in zip(paths, direct["rows"], strict=True):
        row = page.locator(f'#patch-results tr[data-file="{p.name}"]')
        value = float(row.locator("td.prob .value").inner_text())
        assert value == pytest.approx(expected["prob_idc"], abs=5e-4)
        assert next(r for r in shown["rows"] if r["file"] == p.name)["prob_idc"] == pytest.approx(
            expected["prob_idc"], abs=1e-6
        )
        assert row.locator("td.pred").inner_text() == ("IDC" if expected["pred"] else "no IDC")
        assert row.locator("td.label").inner_text() == ("IDC" if expected["label"] else "no IDC")
    failed = page.locator('#patch-results tr[data-file="broken_class1.png"]')
    assert "not a readable image" in failed.inner_text()
    assert "2 of 3 files predicted" in page.locator("#patch-results .counts").inner_text()
    csv_url = page.locator("#patch-results a.csv").get_attribute("href")
    assert httpx.get(url + csv_url).text.startswith("file,patient,x,y,label,neighbours,prob_idc")
    page.screenshot(path=str(tmp_path / "patches.png"), full_page=True)
    assert page.console_errors == []


def test_patient_zip_shows_its_heatmap(page, patient, tmp_path):
    archive = tmp_path / "patient.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(patient.rglob("*.png")):
            zf.write(p, p.relative_to(patient.parent).as_posix())
    page.click("#tab-patient")
    page.set_input_files("#patient-input", str(archive))
    page.wait_for_selector("#patient-results:not([hidden])")
    images_loaded(page, "#patient-heatmap")
    images_loaded(page, "#patient-probability")
    facts = page.locator("#patient-results dl.facts").inner_text()
    assert patient.name in facts
    assert "Dice" in facts
    assert page.locator("#patient-results a.csv").get_attribute("href").endswith(".csv")
    page.screenshot(path=str(tmp_path / "patient.png"), full_page=True)
    assert page.console_errors == []


def test_refused_upload_is_explained_in_the_page(page, tmp_path):
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"not a zip at all")
    page.click("#tab-patient")
    page.set_input_files("#patient-input", str(fake))
    error = page.locator("#panel-patient .error")
    error.wait_for(state="visible")
    assert "not a readable zip archive" in error.inner_text()
    assert "null" not in error.inner_text()
    page.screenshot(path=str(tmp_path / "refused.png"))
    # Chromium logs the 400 itself as "Failed to load resource"; nothing else may appear.
    assert [e for e in page.console_errors if "Failed to load resource" not in e] == []


def test_slide_in_the_page(page, server, patient, tmp_path):
    health = httpx.get(server[0] + "/api/health").json()
    assert health["slides"]  # openslide is a dependency: the page offers slides
    from idcscope.data.decode import decode_files
    from idcscope.spatial import wsi
    from idcscope.spatial.heatmap import patient_mosaic

    pngs = sorted(patient.rglob("*.png"))
    xy = [p.name.split("_")[2:4] for p in pngs]
    decoded = decode_files([str(p) for p in pngs], workers=1)
    mosaic, _ = patient_mosaic(
        decoded.images, [int(x[1:]) for x, _ in xy], [int(y[1:]) for _, y in xy]
    )
    path = wsi.write_tiff_slide(mosaic, tmp_path / "synthetic.tif", mpp=4.0)
    page.click("#tab-slide")
    page.set_input_files("#slide-input", str(path))
    page.wait_for_selector("#slide-results:not([hidden])")
    images_loaded(page, "#slide-overlay")
    assert "synthetic.tif" in page.locator("#slide-results dl.facts").inner_text()
    page.screenshot(path=str(tmp_path / "slide.png"), full_page=True)
    assert page.console_errors == []
