"""The real server on a free port, and the page driven in headless Chromium with Playwright."""

from __future__ import annotations

import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from idcscope.serve import Settings, create_app
from tests.conftest import open_page, serving
from tests.test_serve import files, full_block, image_bytes, patient_slide, with_contexts


@pytest.fixture(scope="module")
def server(trained_run, tmp_path_factory):
    """``(base URL, app)`` of uvicorn serving the tiny trained model in a thread."""
    app = create_app(
        trained_run / "best.pt", Settings(temp_dir=str(tmp_path_factory.mktemp("e2e")))
    )
    with serving(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def contexts_server(trained_run, tmp_path_factory):
    """``(base URL, app)`` of the tiny model with hand-set scoring contexts
    (``tests.test_serve.hand_set_contexts``: 0-4 neighbours never decided)."""
    model = with_contexts(trained_run / "best.pt", tmp_path_factory.mktemp("e2e_contexts"))
    app = create_app(model, Settings(temp_dir=str(tmp_path_factory.mktemp("e2e_c"))))
    with serving(app) as url:
        yield url, app


@pytest.fixture
def contexts_page(browser, contexts_server):
    with open_page(browser, contexts_server[0]) as pg:
        yield pg


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
        call = row.locator("td.call .word").inner_text()
        assert call == ("IDC" if expected["pred"] else "no IDC")  # no contexts: all decided
        assert "AUC n/a" in row.locator("td.context").inner_text()
        assert row.locator("td.label").inner_text() == ("IDC" if expected["label"] else "no IDC")
    failed = page.locator('#patch-results tr[data-file="broken_class1.png"]')
    assert "not a readable image" in failed.inner_text()
    counts = page.locator("#patch-results .counts").inner_text()
    assert "2 of 3 files predicted" in counts
    assert "0 uncertain" in counts
    # a model without contexts says so, and shows no table of them
    assert page.locator("#model-contexts .none").get_attribute("hidden") is None
    assert page.locator("#model-contexts table").get_attribute("hidden") is not None
    csv_url = page.locator("#patch-results a.csv").get_attribute("href")
    assert httpx.get(url + csv_url).text.startswith("file,patient,x,y,label,neighbours,prob_idc")
    page.screenshot(path=str(tmp_path / "patches.png"), full_page=True)
    assert page.console_errors == []


def upload_patient(page, folder, archive) -> None:
    """Send a patient's folder as a zip from the page's patient tab, and wait for it."""
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*.png")):
            zf.write(p, p.relative_to(folder.parent).as_posix())
    page.click("#tab-patient")
    page.set_input_files("#patient-input", str(archive))
    page.wait_for_selector("#patient-results:not([hidden])")


def test_patient_zip_shows_its_heatmap(page, patient, tmp_path):
    upload_patient(page, patient, tmp_path / "patient.zip")
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
    path = patient_slide(patient, tmp_path)
    page.click("#tab-slide")
    page.set_input_files("#slide-input", str(path))
    page.wait_for_selector("#slide-results:not([hidden])")
    images_loaded(page, "#slide-overlay")
    assert "synthetic.tif" in page.locator("#slide-results dl.facts").inner_text()
    page.screenshot(path=str(tmp_path / "slide.png"), full_page=True)
    assert page.console_errors == []


def test_the_page_shows_calls_contexts_and_what_the_model_saw(
    contexts_page, patient, tmp_path, monkeypatch
):
    from idcscope.inference import predictor

    def flat_is_glass(params, images, workers=None):  # a stand-in for a fitted input check
        flat = images.std(axis=(1, 2)).max(axis=1) < 1
        return np.where(flat, "glass", "ok").astype(object)

    monkeypatch.setattr(predictor, "check_patches", flat_is_glass)  # the server's thread too
    page = contexts_page
    block = full_block(patient)
    plain = tmp_path / "plain.png"
    plain.write_bytes(image_bytes())
    with page.expect_response("**/api/patches") as answer:
        page.set_input_files("#patch-input", [*map(str, block), str(plain)])
    res = answer.value.json()
    page.wait_for_selector("#patch-results:not([hidden])")
    images_loaded(page, "#patch-results tbody img")
    counts = page.locator("#patch-results .counts").inner_text()
    assert "5 uncertain" in counts
    assert f"{res['calls']['idc']} IDC" in counts
    assert "uncertain" in page.locator("#patch-results .legend").inner_text()
    heads = page.locator("#patch-results th.map").all_inner_texts()
    assert heads == ["What the model saw", "Neighbourhood evidence", "Patch evidence"]

    def row(name: str):
        return page.locator(f'#patch-results tr[data-file="{name}"]')

    centre, corner, lone = row(block[0].name), row(block[4].name), row("plain.png")
    assert centre.locator("td.call .word").inner_text() in ("IDC", "no IDC")
    assert "8 of 8 neighbours" in centre.locator("td.context").inner_text()
    assert "5-8 neighbours: AUC 0.930" in centre.locator("td.context").inner_text()
    assert centre.locator("td.img img").count() == 3
    assert "logit" in centre.locator("td.img").nth(1).inner_text()
    assert corner.locator("td.call .word").inner_text() == "uncertain"
    assert "1-4 neighbours: AUC n/a" in corner.locator("td.context").inner_text()
    assert lone.locator("td.call .word").inner_text() == "uncertain"
    assert "input check: glass" in lone.locator("td.call").inner_text()
    assert "alone: AUC 0.610" in lone.locator("td.context").inner_text()

    page.click("#model-contexts summary")
    contexts = page.locator("#model-contexts tbody tr")
    assert contexts.count() == 3
    assert contexts.nth(0).inner_text().split("\t") == [
        "alone",
        "0",
        "0.000 to 1.000",
        "0.610",
        "0.0%",
    ]
    assert "n/a" in contexts.nth(1).locator("td.auc").inner_text()
    assert "IDC from" in contexts.nth(2).inner_text()
    page.screenshot(path=str(tmp_path / "calls.png"), full_page=True)
    assert page.console_errors == []


def test_the_page_warns_of_a_patient_the_model_saw(
    contexts_page, contexts_server, synthetic_root, tmp_path
):
    page, app = contexts_page, contexts_server[1]
    seen = app.state.analyst.meta.splits["train"][0]
    folder = synthetic_root / seen
    upload_patient(page, folder, tmp_path / "seen.zip")
    images_loaded(page, "#patient-heatmap")
    warning = page.locator("#patient-results .warnings")
    assert warning.is_visible()
    assert f"patient {seen} was used to train or validate the model" in warning.inner_text()
    facts = page.locator("#patient-results dl.facts").inner_text()
    assert "uncertain" in facts and "Input check" in facts
    page.screenshot(path=str(tmp_path / "seen.png"), full_page=True)

    # a slide named for that patient warns too, and counts its uncertain tiles
    path = patient_slide(folder, tmp_path)
    slide = path.rename(path.with_name(f"{seen}.tif"))
    page.click("#tab-slide")
    page.set_input_files("#slide-input", str(slide))
    page.wait_for_selector("#slide-results:not([hidden])")
    images_loaded(page, "#slide-overlay")
    assert page.locator("#slide-results .warnings").is_visible()
    facts = page.locator("#slide-results dl.facts").inner_text()
    assert "uncertain" in facts
    page.screenshot(path=str(tmp_path / "seen_slide.png"), full_page=True)
    assert page.console_errors == []
