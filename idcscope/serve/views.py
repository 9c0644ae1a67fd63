"""The slides open in the page's viewer: each a view with its own job, scored in the
background while the slide is already shown.

A view is opened on a slide of the library, an uploaded slide or a patient's zip (rebuilt
into a pyramidal TIFF, ``spatial.heatmap.patient_slide``). Its scoring runs in a thread,
under ``Analyst.lock`` like every analysis: first the slide is read at the model's
resolution (the tissue mask is then shown), then its tissue tiles are scored by
``spatial.slide.slide_inference``, what ``idcscope slide`` runs, on the tiles just read.
The tiles are scored in bands of grid rows, top to bottom, each band with the rows its
scores depend on (``spatial.slide.score_tiles``): every tile gets what one pass over the
slide gives it, and the overlay shows each band as soon as it is final. The page polls the
view's status; each band bumps the view's version, which the overlay's tile URLs carry.

Clicking a tile explains it with the server's one Predictor (``Explainer.explain_scored``
on the very tiles scored, those whose pixels its input and its neighbours' hold): nothing
is scored a second way. A tile is inspected once its band is scored, without waiting for
the rest of the slide (the Explainer has its own lock).
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import IdcscopeError
from ..inference.tables import CALLS, Verdicts
from .analysis import Analyst, _explanation, _renamed
from .jobs import Job, JobStore
from .viewer import TileCache, TileLayers, TileNotFound, ZoomedSlide

logger = logging.getLogger(__name__)


class NotReady(IdcscopeError):
    """What a view cannot answer before its tiles are scored (answered with 409)."""


@dataclass
class View:
    """One slide open in the viewer, and what its scoring has found so far."""

    id: str
    name: str  # as the client knows it
    zoomed: ZoomedSlide
    job: Job
    mpp: float | None = None  # given by the client; None: the slide's own
    owned: bool = False  # the slide is this view's (an upload), closed with it
    status: str = "queued"  # queued, reading, scoring, done, error
    error: str = ""
    scan: object = None  # ``wsi.Scan``, once read
    layers: TileLayers | None = None
    verdicts: Verdicts | None = None  # of ``scan.tiles``, filled in band by band
    scored: int = 0  # tissue tiles scored so far
    table: pd.DataFrame | None = None  # the tile table ``slide_inference`` wrote
    summary: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    version: int = 0  # bumped whenever the overlay changes: its tiles' URLs change with it
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    overlays: TileCache = field(default_factory=lambda: TileCache(16 * 1024 * 1024))


class ViewStore:
    """The open views, newest last, at most ``keep`` (the oldest closed first).

    Each view has a job of the server's ``JobStore`` for its files (an uploaded slide, a
    rebuilt patient, the tile table, GeoJSON and maps), never marked finished: it is
    removed with the view, so the slide under a view is never deleted while it is shown.
    """

    def __init__(self, analyst: Analyst, jobs: JobStore, keep: int = 20):
        self.analyst, self.jobs, self.keep = analyst, jobs, max(1, keep)
        self._views: OrderedDict[str, View] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, zoomed: ZoomedSlide, job: Job, mpp: float | None, owned: bool) -> View:
        """A view of ``zoomed``, its scoring started in the background."""
        view = View(secrets.token_urlsafe(16), zoomed.name, zoomed, job, mpp, owned)
        with self._lock:
            self._views[view.id] = view
            while len(self._views) > self.keep:
                self._close(self._views.popitem(last=False)[1])
        threading.Thread(target=self._score, args=(view,), daemon=True).start()
        return view

    def get(self, view_id: str) -> View:
        view = self._views.get(view_id)
        if view is None:
            raise TileNotFound(f"no view {view_id!r} (views are kept a while)")
        return view

    def close(self) -> None:
        with self._lock:
            for view in self._views.values():
                self._close(view)
            self._views.clear()

    def _close(self, view: View) -> None:
        """Close ``view``'s own slide and remove its job (its slide file, results, maps):
        a view's job lives as long as the view, not among the finished analyses."""
        if view.owned:
            view.zoomed.close()
        self.jobs.discard(view.job)

    def _score(self, view: View) -> None:
        """Read and score the view's slide; every failure ends in its status."""
        try:
            self._read_and_score(view)
            view.status = "done"
        except IdcscopeError as e:
            view.status, view.error = "error", str(_renamed(e, view.zoomed.path, view.name))
        except Exception as e:  # the page must hear of it; the log has the traceback
            logger.exception("scoring %s failed", view.name)
            view.status, view.error = "error", f"internal error ({type(e).__name__})"
        finally:
            view.seconds = round(time.monotonic() - view.started, 3)
            shutil.rmtree(view.job.scratch, ignore_errors=True)  # the upload's leftovers

    def _read_and_score(self, view: View) -> None:
        from ..spatial.slide import MIN_TISSUE, slide_inference
        from ..spatial.wsi import read_slide

        analyst, path = self.analyst, view.zoomed.path
        prep = analyst.meta.preprocessing
        mpp, patch = float(prep["mpp"]), int(prep["patch_size"])
        with analyst.lock:
            view.status = "reading"
            scan = read_slide(path, view.mpp, mpp, patch, MIN_TISSUE)
            prob, call = np.full(scan.fraction.shape, np.nan), np.full(scan.fraction.shape, np.nan)
            tissue = scan.fraction >= MIN_TISSUE
            view.scan, view.layers = (
                scan,
                TileLayers(prob.copy(), call.copy(), tissue, scan.grid.tile),
            )
            view.verdicts = Verdicts.empty(len(scan.tiles))
            view.version += 1
            view.status = "scoring"

            def drawn(index: np.ndarray, verdicts: Verdicts) -> None:
                """A band's tiles are final: the overlay shows them (a new version)."""
                view.verdicts.put(index, verdicts)
                prob[scan.rows[index], scan.cols[index]] = verdicts.prob
                call[scan.rows[index], scan.cols[index]] = verdicts.call
                view.layers = TileLayers(prob.copy(), call.copy(), tissue, scan.grid.tile)
                view.scored += len(index)
                view.version += 1

            out = view.job.folder / "out"
            summary = slide_inference(
                analyst.predictor, path, out, slide_mpp=view.mpp, scan=scan, each=drawn
            )
        files = summary.pop("files")
        table = pd.read_csv(files["tiles_csv"], keep_default_na=False, na_values=[""])
        summary["slide"] = view.name
        view.table, view.summary = table, summary
        view.files = {k: view.job.publish(p) for k, p in files.items() if Path(p).is_file()}
        view.warnings = analyst.seen([Path(view.name).stem]) + summary.get("warnings", [])


def describe(view: View, base: str) -> dict:
    """What the page shows of a view: where its tiles are, how its scoring goes, and the
    measurements once scored (``base``: the view's URL)."""
    w, h = view.zoomed.dimensions
    scan = view.scan
    return {
        "id": view.id,
        "name": view.name,
        "status": view.status,
        "error": view.error,
        "dzi": f"{base}/slide.dzi",
        "overlay": f"{base}/overlay_files",
        "width": w,
        "height": h,
        "mpp": view.mpp or view.zoomed.mpp(),
        "grid_tile": None if scan is None else scan.grid.tile,
        "tissue_tiles": None if scan is None else len(scan.tiles),  # known once read
        "scored_tiles": view.scored,
        "version": view.version,
        "seconds": view.seconds or round(time.monotonic() - view.started, 3),
        "measurements": measurements(view.summary) if view.summary else None,
        "summary": view.summary or None,
        "warnings": view.warnings,
        "files": view.files,
    }


def measurements(summary: dict) -> dict:
    """IDC area in mm² and as a share of the tissue scored, from the tile grid and the
    slide's µm per pixel (``slide_inference``'s summary), and the calls' counts."""
    return {
        "tissue_mm2": summary["tissue_mm2"],
        "idc_mm2": summary["idc_mm2"],
        "idc_share": summary["idc_fraction"],
        "n_tiles": summary["n_tiles"],
        "n_idc_tiles": summary["n_idc_tiles"],
        "calls": summary.get("calls"),
        "threshold": summary["threshold"],
    }


def inspect(analyst: Analyst, view: View, x: float, y: float) -> dict:
    """The tile under level-0 pixel ``(x, y)``: what the model said of it as scored, the
    P(IDC) of its 8 neighbours, and the maps of where the model looked. A tile is
    inspected as soon as its band is scored, while the rest of the slide still is.

    Raises:
        NotReady: that tile is not scored yet.
        TileNotFound: no tissue tile lies there.
    """
    from ..spatial.slide import input_reach, tile_places

    scan, verdicts = view.scan, view.verdicts
    if scan is None or verdicts is None:
        raise NotReady(f"{view.name}: its tiles are not scored yet ({view.status})")
    tile = scan.grid.tile
    row, col = int(y // tile), int(x // tile)
    found = np.flatnonzero((scan.rows == row) & (scan.cols == col))
    if not len(found):
        raise TileNotFound(f"{view.name}: no tissue tile was scored at ({x:.0f}, {y:.0f})")
    k = int(found[0])
    said = verdicts.take([k])
    if np.isnan(said.prob[0]):
        raise NotReady(f"{view.name}: the tile at row {row}, column {col} is not scored yet")
    # What the maps read: the tiles whose pixels are in the model input of the tile and of
    # its neighbours (the block it saw), not the whole slide, unless stain makes it so.
    reach = input_reach(analyst.predictor)
    near = np.arange(len(scan.tiles))
    if reach is not None:
        near = np.flatnonzero(
            (np.abs(scan.rows - row) <= 2 * reach) & (np.abs(scan.cols - col) <= 2 * reach)
        )
    patch = int(analyst.meta.preprocessing["patch_size"])
    groups, (xs, ys) = tile_places(scan, Path(view.zoomed.path).stem, patch)
    at = np.searchsorted(near, k)
    with analyst.explaining:
        ex = analyst.explainer.explain_scored(
            said, scan.tiles[near], groups[near], (xs[near], ys[near]), rows=[at]
        )
        images = _explanation(view.job, 0, ex, f"tile_r{row}_c{col}")
    neighbours = None if np.isnan(said.neighbours[0]) else int(said.neighbours[0])
    prob = float(said.prob[0])
    return {
        "row": row,
        "col": col,
        "x": round(col * tile),
        "y": round(row * tile),
        "size": round(tile, 3),
        "tissue": round(float(scan.fraction[row, col]), 3),
        "prob_idc": prob,
        "pred": int(prob >= analyst.predictor.threshold),
        "call": CALLS[int(said.call[0])],
        "input_check": str(said.check[0]),
        "neighbours": neighbours,
        **analyst.context_of(neighbours),
        "around": _around(view.layers.prob, row, col),
        "explanation": "cam" if ex.blocks is None else "block",
        **images,
    }


def _around(prob: np.ndarray, row: int, col: int) -> list[list[float | None]]:
    """P(IDC) of the 3x3 tiles centred on ``(row, col)``, None where none was scored."""
    out = []
    for r in range(row - 1, row + 2):
        line = []
        for c in range(col - 1, col + 2):
            inside = 0 <= r < prob.shape[0] and 0 <= c < prob.shape[1]
            value = prob[r, c] if inside else np.nan
            line.append(None if np.isnan(value) else round(float(value), 6))
        out.append(line)
    return out
