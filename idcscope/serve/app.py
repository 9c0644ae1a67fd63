"""``create_app``: the web app behind ``idcscope serve``.

The model is loaded once. Uploads stream into a fresh job folder under the server's temp
root; the analysis runs in a worker thread (one analysis at a time, so the event loop
keeps answering, ``/api/health`` included); results are downloaded by job id and file name.

Protections (see also jobs.py and uploads.py):

- Host allow-list: a request's ``Host`` must name the bound host, ``localhost``,
  ``127.0.0.1``, ``[::1]`` or the address the connection came in on, with the port it came
  in on; otherwise 421. This stops DNS rebinding: a page of ``evil.example`` whose name
  now resolves to 127.0.0.1 still sends ``Host: evil.example``.
- Same origin: a POST's ``Origin`` (or, without one, its ``Referer``), when present, must
  name an allowed host; otherwise 403. Browsers send it on every cross-site POST; clients
  that send neither (curl, scripts) are not browsers a site could steer.
- Limits per request: bytes, files, zip members and unpacked bytes, and pixels (read from
  the image headers before anything is decoded); a slide's mpp must lie in ``MPP_RANGE``.
- Error messages never hold a server path: files are named as the client sent them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import IdcscopeError
from ..spatial.wsi import MPP_RANGE
from .analysis import Analyst, slides_supported
from .jobs import Job, JobStore
from .library import NoSuchSlide, SlideLibrary
from .uploads import MB, PATCH_SUFFIXES, SLIDE_SUFFIXES, ZIP_SUFFIXES, UploadError, receive_files
from .viewer import TileNotFound
from .viewer_api import routes as viewer_routes
from .views import NotReady, ViewStore

logger = logging.getLogger(__name__)

_INLINE = (".png",)  # shown in the page; everything else downloads as a file
_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
        # the one stylesheet OpenSeadragon injects (touch screens' focus outline), by hash
        b"style-src 'self' 'sha256-9xTiqzfwFaL2SGb1rmr8gysEwVVjIvqWAgmZgqFqpEE='",
    ),
    (b"referrer-policy", b"no-referrer"),
]


@dataclass(frozen=True)
class Settings:
    """Limits and places of one server; the defaults suit one person on their own machine."""

    max_upload_mb: float = 2048  # one request: a whole slide fits
    max_patch_files: int = 1000  # patch images in one upload
    max_zip_members: int = 20_000  # a Kaggle patient has at most a few thousand patches
    max_unzipped_mb: float = 1024  # what one zip may unpack to
    # Pixels of all the images of one request: the file cap of 50x50 patches is 2.5, a
    # patient's zip at the member cap 50; 200 images of 4096x4096 would be 3,355.
    max_megapixels: float = 100
    keep_jobs: int = 20  # finished jobs kept on disk, newest first
    temp_dir: str | None = None  # parent of the server's temp root; None: the system's
    device: str = "cpu"
    host: str = "127.0.0.1"  # the interface served; its name is an allowed Host
    slides: str | None = None  # the slide library's folder (``--slides``); None: none
    alpha: float | None = None  # the uncertain band calls are made with; None: the model's


def create_app(checkpoint: str | Path, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app serving the page and the API for one checkpoint."""
    settings = settings or Settings()
    library = SlideLibrary(settings.slides)  # a missing folder is refused before the model loads
    analyst = Analyst(checkpoint, settings.device, settings.alpha)
    jobs = JobStore(settings.temp_dir, settings.keep_jobs)
    views = ViewStore(analyst, jobs, settings.keep_jobs)
    logger.info("serving %s; uploads go to %s", checkpoint, jobs.root)
    if library.folder is not None:
        logger.info("slides of %s in the viewer", library.folder)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        views.close()
        jobs.close()

    app = FastAPI(title="idcscope", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.analyst, app.state.jobs, app.state.settings = analyst, jobs, settings
    app.state.library, app.state.views = library, views
    app.state.page = (files("idcscope.serve") / "static" / "index.html").read_text("utf-8")
    app.add_middleware(_SameOrigin, names=_host_names(settings.host))
    app.add_middleware(_SecurityHeaders)  # added last: outermost, so refusals get it too
    app.add_exception_handler(ClientDisconnect, _disconnected)
    app.add_exception_handler(UploadError, _upload_error)
    app.add_exception_handler(IdcscopeError, _analysis_error)
    for missing in (NoSuchSlide, TileNotFound):
        app.add_exception_handler(missing, _not_found)
    app.add_exception_handler(NotReady, _not_ready)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Exception, _internal_error)
    app.mount("/static", StaticFiles(packages=[("idcscope.serve", "static")]), name="static")
    app.include_router(routes)
    app.include_router(viewer_routes)
    return app


# The routes read the server's analyst, jobs and settings from ``request.app.state``.
routes = APIRouter()


async def _run_job(request: Request, kind: str, work: Callable[[Job], Awaitable[dict]]) -> dict:
    """``work`` in a new job folder; the job is kept when it succeeds, removed otherwise."""
    jobs: JobStore = request.app.state.jobs
    job = jobs.create(kind)
    try:
        result = await work(job)
    except BaseException:
        jobs.discard(job)
        raise
    jobs.finish(job)
    return {"job": job.id, **result}


async def _receive(request: Request, job: Job, suffixes, max_files: int = 1):
    folder = job.scratch / "upload"
    folder.mkdir()
    max_bytes = int(request.app.state.settings.max_upload_mb * MB)
    return await receive_files(request, folder, suffixes, max_bytes, max_files)


@routes.get("/", include_in_schema=False)
async def index(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.page)


@routes.get("/api/health")
async def health(request: Request) -> dict:
    """Liveness, the model, the limits, and whether an analysis is running."""
    state = request.app.state
    hidden = ("temp_dir", "device", "host", "slides")
    limits = {k: v for k, v in asdict(state.settings).items() if k not in hidden}
    return {
        "status": "ok",
        "busy": state.analyst.lock.locked(),
        "model": state.analyst.describe(),
        "slides": slides_supported(),
        "library": state.library.folder is not None,
        "limits": limits
        | {
            "patch_suffixes": PATCH_SUFFIXES,
            "zip_suffixes": ZIP_SUFFIXES,
            "slide_suffixes": SLIDE_SUFFIXES,
        },
    }


@routes.post("/api/patches")
async def patches(request: Request) -> dict:
    """Patch images (PNG/JPEG, field ``files``): P(IDC), call and explanation of each."""
    state = request.app.state

    async def work(job: Job) -> dict:
        uploads = await _receive(request, job, PATCH_SUFFIXES, state.settings.max_patch_files)
        pixels = _max_pixels(state.settings)
        return await run_in_threadpool(state.analyst.patches, job, uploads, pixels)

    return await _run_job(request, "patches", work)


@routes.post("/api/patient")
async def patient(request: Request) -> dict:
    """One patient's patches as a zip: heatmap, IDC area, Dice/IoU, predictions."""
    state = request.app.state

    async def work(job: Job) -> dict:
        (upload,) = await _receive(request, job, ZIP_SUFFIXES)
        settings = state.settings
        limits = settings.max_zip_members, int(settings.max_unzipped_mb * MB)
        return await run_in_threadpool(
            state.analyst.patient, job, upload.path, *limits, _max_pixels(settings)
        )

    return await _run_job(request, "patient", work)


@routes.post("/api/slide")
async def slide(
    request: Request,
    mpp: float | None = Query(
        None, ge=MPP_RANGE[0], le=MPP_RANGE[1], description="µm per pixel, if the file lacks it"
    ),
) -> dict:
    """A whole-slide image: tissue tiles scored, IDC overlay, GeoJSON and tile table."""
    analyst = request.app.state.analyst

    async def work(job: Job) -> dict:
        (upload,) = await _receive(request, job, SLIDE_SUFFIXES)
        return await run_in_threadpool(analyst.slide, job, upload.path, upload.name, mpp)

    return await _run_job(request, "slide", work)


@routes.get("/api/jobs/{job_id}/files/{name}")
async def download(request: Request, job_id: str, name: str) -> FileResponse:
    """A result file, by the job's id and the name the job published it under."""
    path = request.app.state.jobs.file(job_id, name)
    if path is None:
        raise HTTPException(404, f"no file {name!r} in job {job_id!r} (jobs are kept a while)")
    inline = path.suffix in _INLINE
    return FileResponse(
        path, filename=name, content_disposition_type="inline" if inline else "attachment"
    )


def _max_pixels(settings: Settings) -> int:
    return int(settings.max_megapixels * 1e6)


def _without_paths(request: Request, message: str) -> str:
    """``message`` with any path under the server's temp root cut to its file name.

    The analyses already name files as the client sent them; this is the net under that.
    """
    root = request.app.state.jobs.root
    for prefix in {str(root), str(root.resolve())}:
        message = re.sub(re.escape(prefix) + r"[^\s'\",:;)]*", _base_name, message)
    return message


def _base_name(m: re.Match) -> str:
    return re.split(r"[\\/]", m[0].rstrip("/\\"))[-1]


async def _upload_error(request: Request, e: UploadError) -> JSONResponse:
    message = _without_paths(request, str(e))
    return JSONResponse({"error": message, "files": e.files}, status_code=e.status)


async def _analysis_error(request: Request, e: IdcscopeError) -> JSONResponse:
    return JSONResponse({"error": _without_paths(request, str(e))}, status_code=422)


async def _not_found(request: Request, e: IdcscopeError) -> JSONResponse:
    return JSONResponse({"error": _without_paths(request, str(e))}, status_code=404)


async def _not_ready(request: Request, e: IdcscopeError) -> JSONResponse:
    return JSONResponse({"error": str(e)}, status_code=409)


async def _disconnected(request: Request, e: ClientDisconnect) -> Response:
    # Nobody is left to answer; one line is all the log needs (the job is already gone).
    logger.warning("%s %s: the client disconnected mid-upload", request.method, request.url.path)
    return Response(status_code=400)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": e.detail}, status_code=e.status_code, headers=e.headers)


async def _invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
    where = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
    return JSONResponse({"error": f"invalid request: {where}"}, status_code=422)


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    logger.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse({"error": f"internal error ({type(e).__name__}); see the server log"}, 500)


_LOOPBACK = ("localhost", "127.0.0.1", "::1")


def _host_names(host: str) -> frozenset[str]:
    """The host names a request may carry: loopback's and the served interface's own."""
    return frozenset(n.strip("[]").rstrip(".").lower() for n in (*_LOOPBACK, host))


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``(name, port)`` of a ``Host`` value (``name``, ``name:port``, ``[v6]:port``);
    the port is None when absent; None when the value is malformed."""
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]/@\s]+)(?::(\d{1,5}))?", value)
    if m is None:
        return None
    return m[1].strip("[]").rstrip(".").lower(), int(m[2]) if m[2] else None


class _SameOrigin:
    """Answers only requests for this server's own names: the Host allow-list on every
    request, and the same-origin check on every POST (see the module docstring)."""

    def __init__(self, app, names: frozenset[str]):
        self.app, self.names = app, names

    def allowed(self, scope, authority: str, scheme_port: int = 80) -> bool:
        """Whether ``authority`` (``host[:port]``) names this server, as reached."""
        split = _split_host(authority)
        if split is None:
            return False
        name, port = split
        server = scope.get("server") or (None, None)  # the address the connection came in on
        names = self.names | {str(server[0]).lower()} if server[0] else self.names
        return name in names and (port or scheme_port) == (server[1] or scheme_port)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:  # the first of a repeated header, as Starlette reads it
            headers.setdefault(k.decode("latin-1"), v.decode("latin-1"))
        if not self.allowed(scope, headers.get("host", "")):
            error = "this server answers only for its own host names (check the URL)"
            return await _refuse(421, error, scope, receive, send)
        source = headers.get("origin") or headers.get("referer")
        if scope["method"] == "POST" and source is not None and not self._same(scope, source):
            error = "cross-site upload refused: open the page from this server to upload"
            return await _refuse(403, error, scope, receive, send)
        return await self.app(scope, receive, send)

    def _same(self, scope, source: str) -> bool:
        from urllib.parse import urlsplit

        try:
            url = urlsplit(source)
        except ValueError:
            return False
        if url.scheme not in ("http", "https"):  # "null" (sandboxed frames, file://) too
            return False
        return self.allowed(scope, url.netloc, 443 if url.scheme == "https" else 80)


async def _refuse(status: int, error: str, scope, receive, send) -> None:
    logger.warning("refused %s %s: %s", scope["method"], scope["path"], error)
    await JSONResponse({"error": error}, status_code=status)(scope, receive, send)


class _SecurityHeaders:
    """Adds headers that keep the page to its own resources and stop content sniffing."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)
