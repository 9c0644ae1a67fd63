"""Fixtures: tiny synthetic patch trees made in tmp folders, and the real sample when present."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

REAL_SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "idc-sample"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep decoded-patch caches out of the user's home."""
    monkeypatch.setenv("IDCSCOPE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Six synthetic patients (~60 patches each) in the Kaggle layout, shared read-only."""
    from idcscope.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_dataset(root, n_patients=6, grid=(9, 9), seed=1)
    return root


@pytest.fixture(scope="session")
def trained_run(synthetic_root, tmp_path_factory) -> Path:
    """One tiny training run (4 epochs on the synthetic patients: enough to tell the
    classes apart, AUC about 0.85), shared by the tests."""
    from idcscope.training.config import make_config
    from idcscope.training.train import train

    out = tmp_path_factory.mktemp("run")
    cfg = make_config(
        "default",
        data=str(synthetic_root),
        out=str(out),
        epochs=4,
        batch_size=32,
        threads=2,
        val_fraction=0.2,
        test_fraction=0.2,
    )
    train(cfg)
    return out


def same_blocks(tiles, patches) -> list:
    """The (row, col) cells scored both as a slide tile and as a patch whose 3x3 blocks hold
    the same cells in both sets: there a neighbourhood model sees the same input."""
    tiles, patches = set(tiles), set(patches)
    block = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return [
        (r, c)
        for r, c in tiles & patches
        if all(((r + dy, c + dx) in tiles) == ((r + dy, c + dx) in patches) for dy, dx in block)
    ]


def write_patch(path: Path, size=(50, 50), color=(200, 120, 180), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), np.uint8) + np.array(color, np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


@pytest.fixture
def tiny_tree(tmp_path) -> Path:
    """Two patients, both classes, hand-made file names; one edge patch of 50x7."""
    root = tmp_path / "data"
    for patient in ("101", "102"):
        for label in (0, 1):
            for k in range(3):
                name = f"{patient}_idx5_x{50 * k + 1}_y{50 * label + 1}_class{label}.png"
                write_patch(root / patient / str(label) / name, color=(100 + 80 * label, 90, 150))
    write_patch(root / "102" / "0" / "102_idx5_x151_y1_class0.png", size=(50, 7))
    return root


@pytest.fixture(scope="session")
def real_sample() -> Path:
    if not REAL_SAMPLE.is_dir():
        pytest.skip("real IDC sample not found at ../shared/data/idc-sample")
    return REAL_SAMPLE.resolve()


@pytest.fixture(scope="session")
def real_run(real_sample, tmp_path_factory) -> Path:
    """The default recipe trained on 10 patients of the real sample (5 epochs, seed 0),
    2 validation and 4 test patients held out: a model that tells IDC on real tissue."""
    from idcscope.training.config import make_config
    from idcscope.training.train import train

    out = tmp_path_factory.mktemp("real_run")
    cfg = make_config(
        "default",
        data=str(real_sample),
        out=str(out),
        epochs=5,
        val_fraction=0.15,
        test_fraction=0.25,
        seed=0,
    )
    train(cfg)
    return out


@contextmanager
def serving(app):
    """Serve an ASGI app with uvicorn on a free loopback port in a thread; yield its URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


# ----------------------------------------------------------------------------- viewer, browser

VIEWER_PATIENT = "8951"  # the smallest sample patient; the shipped model trained on it


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (the system's), for the tests that drive the page. One per test
    module: Playwright's sync API keeps an event loop running while it is open, and the
    tests after a browser module (the load test's ``asyncio.run``) need it closed."""
    from playwright import sync_api  # the test extra

    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("no `chromium` on PATH (CI installs Debian's chromium package)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="session")
def shipped() -> Path:
    """The model that ships with idcscope (no training needed)."""
    from idcscope.models.bundle import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def slide_library(real_sample, tmp_path_factory) -> Path:
    """A slide folder: a real patient as a pyramidal TIFF, the same in a subfolder and as
    a DICOM WSI (a folder of one file per level, written by wsidicomizer), a text file,
    and links that lead out of the folder (to a slide and to a folder); the slide
    viewer's tests serve it with ``--slides``."""
    from wsidicomizer import WsiDicomizer  # the test extra

    from idcscope.spatial.heatmap import patient_slide

    root = tmp_path_factory.mktemp("viewer")
    folder = root / "slides"
    (folder / "sub").mkdir(parents=True)
    slide = patient_slide(real_sample / VIEWER_PATIENT, folder / f"{VIEWER_PATIENT}.tif")
    os.link(slide, folder / "sub" / "copy.tif")
    WsiDicomizer.convert(slide, folder / "dicom", tile_size=256, workers=1)
    (folder / "notes.txt").write_text("not a slide")
    outside = root / "outside"
    outside.mkdir()
    os.link(slide, outside / "secret.tif")
    (folder / "escape.tif").symlink_to(outside / "secret.tif")
    (folder / "escaped").symlink_to(outside, target_is_directory=True)
    return folder


def slide_tiles(shipped, slide: Path, out: Path) -> pd.DataFrame:
    """The tile table ``idcscope slide`` writes for ``slide``, run in-process."""
    from typer.testing import CliRunner

    from idcscope.cli import app as cli

    res = CliRunner().invoke(cli, ["slide", str(slide), "--out", str(out), "--model", str(shipped)])
    assert res.exit_code == 0, res.output
    return pd.read_csv(out / f"{slide.stem}_tiles.csv")


@pytest.fixture(scope="session")
def slide_expected(shipped, slide_library, tmp_path_factory) -> pd.DataFrame:
    """What ``idcscope slide`` says of each tile of the library's slide."""
    return slide_tiles(
        shipped, slide_library / f"{VIEWER_PATIENT}.tif", tmp_path_factory.mktemp("s")
    )


@contextmanager
def open_page(browser, url: str):
    """A fresh page on the app at ``url``, closed after; ``page.console_errors`` collects
    what the console reports."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    try:
        pg = context.new_page()
        pg.console_errors = []
        pg.on("console", lambda m: m.type == "error" and pg.console_errors.append(m.text))
        pg.on("pageerror", lambda e: pg.console_errors.append(str(e)))
        pg.goto(url)
        pg.wait_for_selector("#model .pill")
        yield pg
    finally:
        context.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the test module's ``server`` (``(URL, app)``), in ``browser``."""
    with open_page(browser, server[0]) as pg:
        yield pg
