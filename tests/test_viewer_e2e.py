"""The slide viewer in headless Chromium (Playwright): a slide of the library and a
patient's zip open, zooming in fetches deeper tiles that are drawn, the overlay toggles
and its opacity changes the pixels, and a click shows the tile's P(IDC) as ``idcscope
slide`` gives it. Screenshots go to each test's tmp_path, as in test_serve_e2e."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from idcscope.serve import Settings, create_app
from tests.conftest import VIEWER_PATIENT, serving, slide_tiles
from tests.test_viewer import BAND, ZIP, dicom_name, held_after_first_band


@pytest.fixture(scope="module")
def server(shipped, slide_library, tmp_path_factory):
    app = create_app(
        shipped, Settings(slides=str(slide_library), temp_dir=str(tmp_path_factory.mktemp("e2e")))
    )
    with serving(app) as url:
        yield url, app


def wait_scored(page) -> None:
    page.wait_for_selector('#viewer-results[data-status="done"]', timeout=300_000)
    loaded(page, "prob")


def loaded(page, layer: str = "slide") -> None:
    """Wait until the layer's tiles for the current view are all drawn."""
    item = "idcViewer.slide" if layer == "slide" else f"idcViewer.layers.{layer}"
    page.wait_for_function(
        f"() => {item} && {item}.getFullyLoaded() && !idcViewer.adding.{layer}"
        if layer != "slide"
        else f"() => {item} && {item}.getFullyLoaded()",
        timeout=60_000,
    )
    page.wait_for_timeout(300)  # the drawer paints on the next frames


def viewer_pixels(page) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.locator("#osd").screenshot())).convert("RGB"))


def click_tile(page, x: float, y: float) -> float:
    """Click level-0 pixel ``(x, y)`` of the slide; the P(IDC) the page then shows."""
    page.locator("#osd").scroll_into_view_if_needed()
    point = page.evaluate(
        """([x, y]) => {
            const p = idcViewer.slide.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
            return [p.x, p.y];
        }""",
        [float(x), float(y)],
    )
    box = page.locator("#osd").bounding_box()
    with page.expect_response(re.compile(r".*/inspect\?.*")) as answer:
        page.mouse.click(box["x"] + point[0], box["y"] + point[1])
    assert answer.value.status == 200, answer.value.text()
    dd = page.locator("#inspect dl.said dd").first
    dd.wait_for()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#inspect .maps img')].every(i => i.complete && i.naturalWidth)"
    )
    return float(dd.get_attribute("data-prob"))


def open_library_slide(page, name: str = f"{VIEWER_PATIENT}.tif") -> None:
    page.click("#tab-viewer")
    page.wait_for_selector("#panel-viewer .library:not([hidden])")
    page.select_option("#library-slide", name)
    page.click("#library-open")
    loaded(page)


def test_a_library_slide_opens_zooms_and_shows_its_overlay(page, slide_expected, tmp_path):
    tiles = []
    page.on(
        "response",
        lambda r: "/slide_files/" in r.url and tiles.append((r.url, r.status, r.headers)),
    )
    open_library_slide(page)
    page.screenshot(path=str(tmp_path / "viewer_opened.png"), full_page=True)
    wait_scored(page)
    facts = page.locator("#viewer-results dl.measurements").inner_text()
    assert "mm²" in facts and "IDC share of tissue" in facts and "uncertain" in facts
    assert page.locator("#osd .scalebar span").inner_text().endswith(("µm", "mm"))
    bar_before = page.locator("#osd .scalebar").get_attribute("data-um")
    page.screenshot(path=str(tmp_path / "viewer_scored.png"), full_page=True)

    def deepest() -> int:
        return max(int(re.search(r"/slide_files/(\d+)/", u)[1]) for u, _, _ in tiles)

    before = deepest()
    page.evaluate("() => idcViewer.osd.viewport.zoomBy(8)")
    page.wait_for_function("() => idcViewer.slide.getFullyLoaded()", timeout=60_000)
    loaded(page)
    assert deepest() > before  # deeper levels were asked for ...
    deep = [(u, s, h) for u, s, h in tiles if f"/slide_files/{deepest()}/" in u]
    assert all(s == 200 and h["content-type"] == "image/jpeg" for _, s, h in deep)  # ... and came
    assert page.locator("#osd .scalebar").get_attribute("data-um") != bar_before
    page.screenshot(path=str(tmp_path / "viewer_zoomed.png"), full_page=True)
    assert page.console_errors == []


def test_the_overlay_toggles_and_its_opacity_changes_the_pixels(page, tmp_path):
    open_library_slide(page)
    wait_scored(page)
    page.locator("#overlay-opacity").fill("1")
    page.wait_for_timeout(500)
    opaque = viewer_pixels(page)
    page.locator("#overlay-opacity").fill("0.2")
    page.wait_for_timeout(500)
    faint = viewer_pixels(page)
    page.uncheck("#show-overlay")
    page.uncheck("#show-outlines")
    page.wait_for_timeout(500)
    bare = viewer_pixels(page)
    page.check("#show-overlay")
    page.wait_for_timeout(500)
    back = viewer_pixels(page)
    Image.fromarray(opaque).save(tmp_path / "overlay_opaque.png")
    Image.fromarray(faint).save(tmp_path / "overlay_faint.png")
    Image.fromarray(bare).save(tmp_path / "overlay_off.png")

    def differ(a, b) -> float:
        return float(np.abs(a.astype(int) - b.astype(int)).mean())

    assert differ(opaque, faint) > 2  # opacity changes the pixels
    assert differ(faint, bare) > 0.5  # toggled off: the bare slide
    assert differ(back, faint) < differ(opaque, faint)  # and on again at 0.2
    # the threshold hides the tiles below it
    page.locator("#overlay-threshold").fill("0.99")
    page.wait_for_timeout(400)
    loaded(page, "prob")
    assert page.locator("#threshold-value").inner_text() == "0.99"
    assert differ(viewer_pixels(page), back) > 0.5
    page.screenshot(path=str(tmp_path / "overlay_threshold.png"), full_page=True)
    assert page.console_errors == []


def test_a_click_shows_the_tile_as_idcscope_slide_scores_it(page, slide_expected, tmp_path):
    open_library_slide(page)
    wait_scored(page)
    for _, row in (
        slide_expected.sort_values("prob_idc").iloc[[len(slide_expected) // 4, -1]].iterrows()
    ):
        shown = click_tile(page, row["x"] + 25, row["y"] + 25)
        assert shown == pytest.approx(row["prob_idc"], abs=1e-4)
        said = page.locator("#inspect dl.said").inner_text()
        assert {"idc": "IDC", "no_idc": "no IDC", "uncertain": "uncertain"}[row["call"]] in said
        assert page.locator("#inspect .maps img").count() == 3
        assert page.locator("#inspect table.around td.centre").inner_text() != "–"
    page.screenshot(path=str(tmp_path / "viewer_inspect.png"), full_page=True)
    assert page.console_errors == []


def test_a_dicom_slide_opens_in_the_viewer(page, shipped, slide_library, tmp_path):
    name = dicom_name(slide_library)
    open_library_slide(page, name)
    wait_scored(page)
    assert name in page.locator("#viewer-results dl.measurements").inner_text()
    table = slide_tiles(shipped, slide_library / name, tmp_path / "out")
    row = table.sort_values("prob_idc").iloc[len(table) // 2]
    shown = click_tile(page, row["x"] + 25, row["y"] + 25)
    assert shown == pytest.approx(row["prob_idc"], abs=1e-4)
    page.screenshot(path=str(tmp_path / "viewer_dicom.png"), full_page=True)
    # its long name (a UID) wraps inside the page
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 1200
    assert page.console_errors == []


def test_a_patient_zip_opens_in_the_viewer(page, shipped, real_sample, tmp_path):
    from idcscope.spatial.heatmap import patient_slide

    page.click("#tab-viewer")
    page.set_input_files("#viewer-patient-input", str(ZIP))
    loaded(page)
    wait_scored(page)
    assert "9124.tif" in page.locator("#viewer-results dl.measurements").inner_text()
    slide = patient_slide(real_sample / "9124", tmp_path / "9124.tif")
    table = slide_tiles(shipped, slide, tmp_path / "out")
    row = table.sort_values("prob_idc").iloc[-1]
    assert click_tile(page, row["x"] + 25, row["y"] + 25) == pytest.approx(
        row["prob_idc"], abs=1e-4
    )
    page.screenshot(path=str(tmp_path / "viewer_patient.png"), full_page=True)
    assert page.console_errors == []


def test_the_page_draws_each_band_before_the_slide_is_scored(
    page, slide_expected, monkeypatch, tmp_path
):
    with held_after_first_band(monkeypatch) as first:
        open_library_slide(page)
        assert first.wait(120)
        page.wait_for_function("() => idcViewer.view.scored_tiles > 0", timeout=30_000)
        loaded(page, "prob")
        status = page.locator("#viewer-results .viewer-status").inner_text()
        assert f"of its {len(slide_expected)} tissue tiles drawn" in status
        assert not page.locator("#viewer-results .links").is_visible()  # no files yet
        on = viewer_pixels(page)
        page.uncheck("#show-overlay")
        page.wait_for_timeout(500)
        off = viewer_pixels(page)
        page.check("#show-overlay")
        page.screenshot(path=str(tmp_path / "viewer_first_band.png"), full_page=True)
        # The first band's tiles are coloured, the rows below it not yet.
        top = int(slide_expected["row"].min())
        edge = page.evaluate(
            "(y) => idcViewer.slide.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, y)).y",
            float((top + BAND) * 50),
        )
        coloured = np.abs(on.astype(int) - off.astype(int)).sum(axis=2) > 30
        assert coloured[: int(edge) - 2].any() and not coloured[int(edge) + 2 :].any()
        row = slide_expected[slide_expected["row"] < top + BAND].iloc[0]
        shown = click_tile(page, row["x"] + 25, row["y"] + 25)  # clickable already
        assert shown == pytest.approx(row["prob_idc"], abs=1e-4)
    wait_scored(page)
    assert page.locator("#viewer-results .links").is_visible()
    assert page.console_errors == []
