"""The viewer's routes: the slide library, views and their Deep Zoom tiles.

- ``GET /api/slides``: the library's slides, each with its Deep Zoom URL; ``GET
  /api/slides/NAME.dzi`` and ``/api/slides/NAME_files/{level}/{col}_{row}.jpeg`` serve them
  (openslide-python's deepzoom server's routes).
- ``POST /api/views?slide=NAME``, ``POST /api/views/slide`` (an uploaded slide) and
  ``POST /api/views/patient`` (a patient's zip) open a view and start its scoring; they
  answer at once with what ``GET /api/views/{id}`` answers: its status, tiles and, once
  scored, its measurements.
- ``/api/views/{id}/slide.dzi``, ``.../slide_files/...jpeg``, ``.../overlay_files/...png``
  (``layer``: ``prob`` or ``tissue``; ``threshold``) and ``.../inspect?x=&y=`` (level-0
  pixels).

A tile or level out of range, an unknown view or slide is 404; tiles are answered in the
worker threads, never under the analyses' lock.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from ..spatial.wsi import MPP_RANGE
from .uploads import MB, SLIDE_SUFFIXES, ZIP_SUFFIXES, receive_files
from .viewer import LAYERS, TileNotFound, ZoomedSlide, colour_bar, overlay_rgba, png_bytes
from .views import ViewStore, describe, inspect

routes = APIRouter()

_TILE = re.compile(r"(\d{1,3})/(\d{1,7})_(\d{1,7})\.(jpeg|png)")
_CACHED = {"cache-control": "private, max-age=3600"}
_MPP = Query(None, ge=MPP_RANGE[0], le=MPP_RANGE[1], description="µm per pixel, if not in the file")


def _address(path: str, suffix: str) -> tuple[int, int, int]:
    """``(level, col, row)`` of ``{level}/{col}_{row}.{suffix}``; TileNotFound otherwise."""
    m = _TILE.fullmatch(path)
    if m is None or m[4] != suffix:
        raise TileNotFound(f"no tile {path!r}")
    return int(m[1]), int(m[2]), int(m[3])


def _image(data: bytes, kind: str) -> Response:
    return Response(data, media_type=f"image/{kind}", headers=_CACHED)


def _dzi(zoomed: ZoomedSlide) -> Response:
    return Response(zoomed.dzi(), media_type="application/xml")


# ----------------------------------------------------------------------------- the library


@routes.get("/api/slides")
def slides(request: Request) -> dict:
    """The slides of the server's slide folder (``--slides``), with their Deep Zoom URLs."""
    library = request.app.state.library
    names = library.names()
    return {
        "folder": library.folder is not None,
        "slides": [{"name": n, "dzi": f"/api/slides/{n}.dzi"} for n in names],
    }


@routes.get("/api/slides/{path:path}")
def library_tiles(request: Request, path: str) -> Response:
    """``NAME.dzi`` or ``NAME_files/{level}/{col}_{row}.jpeg`` of a library slide."""
    library = request.app.state.library
    if path.endswith(".dzi"):
        return _dzi(library.open(path[: -len(".dzi")]))
    name, sep, tile = path.rpartition("_files/")
    if not sep:
        raise TileNotFound(f"no slide file {path!r}")
    return _image(library.open(name).tile(*_address(tile, "jpeg")), "jpeg")


@routes.get("/api/colorbar.png")
def colorbar() -> Response:
    """The overlay's colour map, P(IDC) 0 to 1 from left to right."""
    return _image(colour_bar(), "png")


# ----------------------------------------------------------------------------- views


def _base(view_id: str) -> str:
    return f"/api/views/{view_id}"


@routes.post("/api/views")
async def open_library_slide(
    request: Request, slide: str = Query(..., max_length=1000), mpp: float | None = _MPP
) -> dict:
    """A view of the library's slide ``slide``, its scoring started."""
    state = request.app.state
    zoomed = await run_in_threadpool(state.library.open, slide)
    view = state.views.open(zoomed, state.jobs.create("view"), mpp, owned=False)
    return describe(view, _base(view.id))


async def _open_upload(request: Request, where: str, suffixes, open_file, mpp=None) -> dict:
    """A view of what one uploaded file opens into (``open_file(job, upload)``, a
    ``ZoomedSlide``, in a worker thread), its scoring started; ``where``: the upload's
    folder in the job. A refused upload leaves nothing behind."""
    state = request.app.state
    job = state.jobs.create("view")
    try:
        folder = job.folder / where
        folder.mkdir(parents=True)
        max_bytes = int(state.settings.max_upload_mb * MB)
        (upload,) = await receive_files(request, folder, suffixes, max_bytes, 1)
        zoomed = await run_in_threadpool(open_file, job, upload)
    except BaseException:
        state.jobs.discard(job)
        raise
    view = state.views.open(zoomed, job, mpp, owned=True)
    return describe(view, _base(view.id))


@routes.post("/api/views/slide")
async def open_uploaded_slide(request: Request, mpp: float | None = _MPP) -> dict:
    """A view of an uploaded slide (field ``files``), its scoring started. The slide is
    kept in the job's folder (not its scratch) for as long as the view shows it."""

    def open_file(job, upload) -> ZoomedSlide:
        return ZoomedSlide(upload.path, upload.name)

    return await _open_upload(request, "slide", SLIDE_SUFFIXES, open_file, mpp)


@routes.post("/api/views/patient")
async def open_patient(request: Request) -> dict:
    """A view of a patient's zip rebuilt into a pyramidal TIFF, its scoring started."""
    settings = request.app.state.settings
    limits = settings.max_zip_members, int(settings.max_unzipped_mb * MB)
    pixels = int(settings.max_megapixels * 1e6)

    def open_file(job, upload) -> ZoomedSlide:
        return request.app.state.analyst.patient_slide(job, upload.path, *limits, pixels)

    return await _open_upload(request, "scratch/upload", ZIP_SUFFIXES, open_file)


@routes.get("/api/views/{view_id}")
def view_status(request: Request, view_id: str) -> dict:
    """How the view's scoring goes, and its measurements once scored."""
    return describe(request.app.state.views.get(view_id), _base(view_id))


@routes.get("/api/views/{view_id}/slide.dzi")
def view_dzi(request: Request, view_id: str) -> Response:
    return _dzi(request.app.state.views.get(view_id).zoomed)


@routes.get("/api/views/{view_id}/slide_files/{tile:path}")
def view_tile(request: Request, view_id: str, tile: str) -> Response:
    zoomed = request.app.state.views.get(view_id).zoomed
    return _image(zoomed.tile(*_address(tile, "jpeg")), "jpeg")


@routes.get("/api/views/{view_id}/overlay_files/{tile:path}")
def overlay_tile(
    request: Request,
    view_id: str,
    tile: str,
    layer: str = Query("prob", pattern="^(" + "|".join(LAYERS) + ")$"),
    threshold: float = Query(0.0, ge=0.0, le=1.0),
) -> Response:
    """An overlay tile: P(IDC) at or above ``threshold`` and the uncertain tiles, or the
    tissue mask; transparent where nothing is known yet."""
    views: ViewStore = request.app.state.views
    view = views.get(view_id)
    level, col, row = _address(tile, "png")
    box = view.zoomed.tile_box(level, col, row)  # TileNotFound when out of range
    layers, version = view.layers, view.version
    key = (layer, round(threshold, 4), version, level, col, row)
    data = view.overlays.get(key, lambda: png_bytes(overlay_rgba(layers, box, layer, threshold)))
    return _image(data, "png")


@routes.get("/api/views/{view_id}/inspect")
async def inspect_tile(
    request: Request, view_id: str, x: float = Query(..., ge=0), y: float = Query(..., ge=0)
) -> dict:
    """The tile under level-0 pixel ``(x, y)``: P(IDC), call, context, neighbours, maps."""
    state = request.app.state
    view = state.views.get(view_id)
    return await run_in_threadpool(inspect, state.analyst, view, x, y)
