"""The slide viewer's speed: Deep Zoom tile latency (cold and warm) and the first view.

A real sample patient is rebuilt at its places (4 µm/px), upsampled to a scan of
``--scan-mpp`` µm/px and written as a pyramidal TIFF in a slide folder, which the app
serves as ``idcscope serve --slides`` does (in-process, Starlette's TestClient: the route,
its worker thread and the encoding are timed, not a network). Reported:

- first view: from opening the slide (``POST /api/views``) to holding its ``.dzi`` and
  every tile of the levels a 1200x620 viewer shows at home zoom, as OpenSeadragon asks
  for them; the scoring runs meanwhile in the background, and its end is reported too;
- the overlay's first band: from opening the slide to the first status that has scored
  tiles (polled every 20 ms once the home tiles are held), and the scoring's end;
- the price of drawing as it scores: the slide's tiles scored in one pass (what ``idcscope
  slide`` does) against band by band with each band's halo (what the viewer does), best of
  ``--repeat`` alternated rounds, and how soon the first band is final;
- JPEG slide tiles and PNG overlay tiles, once the slide is scored: cold (first request
  of each tile: read, resize, encode) and warm (again: from the cache), p50 and p95 over
  ``--tiles`` tiles of the deepest levels, in random order, and the CPU time the process
  spent per tile (what a tile costs, whatever else the machine runs).

Usage: ``python benchmarks/bench_viewer.py [--model M] [--patient 8951] [--scan-mpp 1]
[--repeat 3]``.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import SAMPLE, machine, table

from idcscope.models.bundle import DEFAULT_MODEL, resolve_model
from idcscope.serve import Settings, create_app
from idcscope.serve.viewer import TILE_SIZE
from idcscope.spatial.heatmap import patient_slide

VIEWPORT = (1200, 620)


def scan(patient: str, scan_mpp: float, folder: Path) -> Path:
    """The patient as a pyramidal TIFF at ``scan_mpp`` µm/px (levels 1, 2, 4, 8)."""
    import tifffile

    from idcscope.spatial.wsi import write_tiff_slide

    base = patient_slide(SAMPLE / patient, folder / "base.tif")
    k = round(4.0 / scan_mpp)
    image = tifffile.imread(base)
    base.unlink()
    image = np.repeat(np.repeat(image, k, axis=0), k, axis=1)
    return write_tiff_slide(image, folder / f"{patient}.tif", scan_mpp, levels=4)


def home_tiles(width: int, height: int) -> list[tuple[int, int, int]]:
    """The tiles OpenSeadragon asks for at home zoom: every level up to the one where the
    slide fits the viewer."""
    top = math.ceil(math.log2(max(width, height)))
    fit = max(width / VIEWPORT[0], height / VIEWPORT[1])
    level = top - max(0, math.floor(math.log2(fit)))
    tiles = []
    for lv in range(level + 1):
        w, h = math.ceil(width / 2 ** (top - lv)), math.ceil(height / 2 ** (top - lv))
        tiles += [
            (lv, c, r)
            for c in range(math.ceil(w / TILE_SIZE))
            for r in range(math.ceil(h / TILE_SIZE))
        ]
    return tiles


def timed(client, urls: list[str]) -> tuple[np.ndarray, float]:
    """Milliseconds of each GET, in order, and the CPU milliseconds the process spent per
    GET (every thread: on a shared machine, the cost of a request however it waited);
    every answer must be 200."""
    out, cpu = [], time.process_time()
    for url in urls:
        t = time.perf_counter()
        r = client.get(url)
        out.append(1000 * (time.perf_counter() - t))
        assert r.status_code == 200, (url, r.status_code, r.text[:200])
    return np.array(out), 1000 * (time.process_time() - cpu) / len(urls)


def deep_urls(base: str, width: int, height: int, n: int, seed: int) -> dict[str, list[str]]:
    """``n`` tiles of the three deepest levels, slide and overlay, in a seeded random order."""
    top = math.ceil(math.log2(max(width, height)))
    cells = []
    for lv in range(top - 2, top + 1):
        w, h = math.ceil(width / 2 ** (top - lv)), math.ceil(height / 2 ** (top - lv))
        cells += [
            (lv, c, r)
            for c in range(math.ceil(w / TILE_SIZE))
            for r in range(math.ceil(h / TILE_SIZE))
        ]
    chosen = random.Random(seed).sample(cells, min(n, len(cells)))
    return {
        "slide JPEG": [f"{base}/slide_files/{lv}/{c}_{r}.jpeg" for lv, c, r in chosen],
        "overlay PNG": [f"{base}/overlay_files/{lv}/{c}_{r}.png?layer=prob" for lv, c, r in chosen],
    }


def main() -> None:
    from fastapi.testclient import TestClient

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--patient", default="8951")
    ap.add_argument("--scan-mpp", type=float, default=1.0, help="µm/px of the written scan")
    ap.add_argument("--tiles", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="rounds of one pass against bands")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "slides"
        folder.mkdir()
        slide = scan(args.patient, args.scan_mpp, folder)
        settings = Settings(slides=str(folder), temp_dir=tmp)
        app = create_app(resolve_model(args.model), settings)
        with TestClient(app) as client:
            rows = measure(client, app, slide.name, args.tiles, args.seed)
        app.state.views.close()
        rows += bands_against_one_pass(resolve_model(args.model), slide, args.repeat)
    print(f"\n{args.patient} at {args.scan_mpp:g} µm/px; {args.tiles} tiles per row\n")
    print(table(rows, ["what", "n", "p50 ms", "p95 ms", "CPU ms", "total s"]))


def measure(client, app, name: str, n: int, seed: int) -> list[dict]:
    """Open the slide, time its first view, wait for its scores, time its tiles."""
    rows = []
    t0 = time.perf_counter()
    view = client.post("/api/views", params={"slide": name}).json()
    base = f"/api/views/{view['id']}"
    client.get(f"{base}/slide.dzi")
    home = [
        f"{base}/slide_files/{lv}/{c}_{r}.jpeg"
        for lv, c, r in home_tiles(view["width"], view["height"])
    ]
    ms, _ = timed(client, home)  # the scoring thread's CPU is in the process's too
    first = time.perf_counter() - t0
    rows.append(_row("first view (home tiles, scoring meanwhile)", ms, first))
    first_band = None
    while (status := client.get(base).json())["status"] not in ("done", "error"):
        if first_band is None and status["scored_tiles"]:
            first_band = time.perf_counter() - t0
        time.sleep(0.02)
    if first_band is not None:  # else the slide was scored before the home tiles were held
        rows.append({"what": "overlay's first band drawn, from opening", "total s": first_band})
    done = {"what": "scoring done, from opening", "total s": time.perf_counter() - t0}
    rows.append(done | {"n": status["measurements"]["n_tiles"]})
    for kind, urls in deep_urls(base, view["width"], view["height"], n, seed).items():
        for state in ("cold", "warm"):
            ms, cpu = timed(client, urls)
            rows.append(_row(f"{kind} tile, {state}", ms, ms.sum() / 1000) | {"CPU ms": cpu})
    view = app.state.views.get(view["id"])
    for kind, cache in (("slide JPEG", view.zoomed.cache), ("overlay PNG", view.overlays)):
        print(f"{kind} cache: {len(cache._tiles)} tiles, {cache.bytes / 2**20:.1f} MB")
    return rows


def bands_against_one_pass(model: Path, slide: Path, repeat: int) -> list[dict]:
    """Seconds to score the slide's tiles in one pass and in the viewer's bands (best of
    ``repeat`` alternated rounds), and until the first band is final."""
    from idcscope.inference.predictor import Predictor
    from idcscope.spatial.slide import MIN_TISSUE, score_reach, score_tiles
    from idcscope.spatial.wsi import read_slide

    predictor = Predictor(model)
    prep = predictor.models[0].preprocessing
    patch = int(prep["patch_size"])
    read = read_slide(slide, None, float(prep["mpp"]), patch, MIN_TISSUE)
    best = {"one pass": math.inf, "bands": math.inf, "first band": math.inf}
    n_bands = 0
    for _ in range(repeat):
        t = time.perf_counter()
        score_tiles(predictor, read, slide.stem, patch)
        best["one pass"] = min(best["one pass"], time.perf_counter() - t)
        heard: list[float] = []
        t = time.perf_counter()
        score_tiles(
            predictor,
            read,
            slide.stem,
            patch,
            each=lambda *_, h=heard: h.append(time.perf_counter()),
        )
        best["bands"] = min(best["bands"], time.perf_counter() - t)
        best["first band"] = min(best["first band"], heard[0] - t)
        n_bands = len(heard)
    print(
        f"{len(read.tiles)} tissue tiles on {read.grid.rows} grid rows, {n_bands} bands, "
        f"halo {score_reach(predictor, patch)} rows"
    )
    one = best["one pass"]
    return [
        {"what": "scoring, one pass (idcscope slide)", "n": len(read.tiles), "total s": one},
        {
            "what": f"scoring in bands (viewer), x{best['bands'] / one:.2f}",
            "total s": best["bands"],
        },
        {"what": "first band final (viewer)", "total s": best["first band"]},
    ]


def _row(what: str, ms: np.ndarray, seconds: float) -> dict:
    p50, p95 = (float(np.percentile(ms, q)) for q in (50, 95))
    return {"what": what, "n": len(ms), "p50 ms": p50, "p95 ms": p95, "total s": seconds}


if __name__ == "__main__":
    main()
