"""The slides open in the page's viewer: each a view with its own job, scored in the
background while the slide is already shown.

A view is opened on a slide of the library, an uploaded slide or a patient's zip (rebuilt
into a pyramidal TIFF, ``spatial.heatmap.patient_slide``). Its scoring runs in a thread,
under ``Analyst.lock`` like every analysis: first the slide is read at the model's
resolution (the tissue mask is then shown), then its tissue tiles are scored by
``spatial.slide.slide_inference``, what ``idcscope slide`` runs, on the tiles just read.
The page polls the view's status; the P(IDC) overlay appears when the slide's tiles are
scored (a slide is one patient for stain and context: its tiles are scored together).

Clicking a tile explains it with the server's one Predictor (``Explainer.explain_scored``
on the very tiles scored): nothing is scored a second way.
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

CODES = {word: code for code, word in CALLS.items()}  # "uncertain" -> -1


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
            empty = np.full(scan.fraction.shape, np.nan)
            tissue = scan.fraction >= MIN_TISSUE
            view.scan, view.layers = scan, TileLayers(empty, empty, tissue, scan.grid.tile)
            view.version += 1
            view.status = "scoring"
            out = view.job.folder / "out"
            summary = slide_inference(analyst.predictor, path, out, slide_mpp=view.mpp, scan=scan)
        files = summary.pop("files")
        table = pd.read_csv(files["tiles_csv"], keep_default_na=False, na_values=[""])
        prob, call = np.full(tissue.shape, np.nan), np.full(tissue.shape, np.nan)
        prob[table["row"], table["col"]] = table["prob_idc"]
        call[table["row"], table["col"]] = table["call"].map(CODES)
        summary["slide"] = view.name
        view.table, view.summary = table, summary
        view.files = {k: view.job.publish(p) for k, p in files.items() if Path(p).is_file()}
        view.warnings = analyst.seen([Path(view.name).stem]) + summary.get("warnings", [])
        view.layers = TileLayers(prob, call, tissue, scan.grid.tile)
        view.version += 1


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
    P(IDC) of its 8 neighbours, and the maps of where the model looked.

    Raises:
        NotReady: the view's tiles are not scored yet.
        TileNotFound: no tissue tile was scored there.
    """
    from ..spatial.slide import tile_places

    if view.status != "done" or view.table is None:
        raise NotReady(f"{view.name}: its tiles are not scored yet ({view.status})")
    scan, table = view.scan, view.table
    row, col = int(y // scan.grid.tile), int(x // scan.grid.tile)
    found = np.flatnonzero((scan.rows == row) & (scan.cols == col))
    if not len(found):
        raise TileNotFound(f"{view.name}: no tissue tile was scored at ({x:.0f}, {y:.0f})")
    k = int(found[0])
    said = table.iloc[k]
    neighbours = None if pd.isna(said["neighbours"]) else int(said["neighbours"])
    verdicts = Verdicts(
        np.array([said["prob_idc"]]),
        np.array([said["margin"]]),
        np.array([np.nan if neighbours is None else neighbours], float),
        np.array([CODES[said["call"]]], float),
        np.array([said["input_check"]], object),
    )
    patch = int(analyst.meta.preprocessing["patch_size"])
    groups, where = tile_places(scan, Path(view.zoomed.path).stem, patch)
    with analyst.lock:
        ex = analyst.explainer.explain_scored(verdicts, scan.tiles, groups, where, rows=[k])
        images = _explanation(view.job, 0, ex, f"tile_r{row}_c{col}")
    return {
        "row": row,
        "col": col,
        "x": int(said["x"]),
        "y": int(said["y"]),
        "size": float(said["size"]),
        "tissue": float(said["tissue"]),
        "prob_idc": float(said["prob_idc"]),
        "pred": int(said["pred"]),
        "call": said["call"],
        "input_check": said["input_check"],
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
