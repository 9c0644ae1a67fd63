"""``create_app``: the web app behind ``idcscope serve``.

The model is loaded once. Uploads stream into a fresh job folder under the server's temp
root; the analysis runs in a worker thread (one model pass at a time, so the event loop
keeps answering, ``/api/health`` included); results are downloaded by job id and file name.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import IdcscopeError
from .analysis import Analyst, slides_supported
from .jobs import Job, JobStore
from .uploads import MB, PATCH_SUFFIXES, SLIDE_SUFFIXES, ZIP_SUFFIXES, UploadError, receive_files

logger = logging.getLogger(__name__)

_INLINE = (".png",)  # shown in the page; everything else downloads as a file
_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
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
    keep_jobs: int = 20  # finished jobs kept on disk, newest first
    temp_dir: str | None = None  # parent of the server's temp root; None: the system's
    device: str = "cpu"


def create_app(checkpoint: str | Path, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app serving the page and the API for one checkpoint."""
    settings = settings or Settings()
    analyst = Analyst(checkpoint, settings.device)
    root = Path(tempfile.mkdtemp(prefix="idcscope-serve-", dir=settings.temp_dir))
    jobs = JobStore(root, settings.keep_jobs)
    logger.info("serving %s; uploads go to %s", checkpoint, root)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        jobs.close()

    app = FastAPI(title="idcscope", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.analyst, app.state.jobs, app.state.settings = analyst, jobs, settings
    app.state.page = (files("idcscope.serve") / "static" / "index.html").read_text("utf-8")
    app.add_middleware(_SecurityHeaders)
    app.add_exception_handler(UploadError, _upload_error)
    app.add_exception_handler(IdcscopeError, _analysis_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(Exception, _internal_error)
    app.mount("/static", StaticFiles(packages=[("idcscope.serve", "static")]), name="static")
    app.include_router(routes)
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
    folder = job.folder / "upload"
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
    limits = {k: v for k, v in asdict(state.settings).items() if k not in ("temp_dir", "device")}
    return {
        "status": "ok",
        "busy": state.analyst.lock.locked(),
        "model": state.analyst.describe(),
        "slides": slides_supported(),
        "limits": limits
        | {
            "patch_suffixes": PATCH_SUFFIXES,
            "zip_suffixes": ZIP_SUFFIXES,
            "slide_suffixes": SLIDE_SUFFIXES,
        },
    }


@routes.post("/api/patches")
async def patches(request: Request) -> dict:
    """Patch images (PNG/JPEG, field ``files``): P(IDC), Grad-CAM and saliency for each."""
    state = request.app.state

    async def work(job: Job) -> dict:
        uploads = await _receive(request, job, PATCH_SUFFIXES, state.settings.max_patch_files)
        return await run_in_threadpool(state.analyst.patches, job, uploads)

    return await _run_job(request, "patches", work)


@routes.post("/api/patient")
async def patient(request: Request) -> dict:
    """One patient's patches as a zip: heatmap, IDC area, Dice/IoU, predictions."""
    state = request.app.state

    async def work(job: Job) -> dict:
        (upload,) = await _receive(request, job, ZIP_SUFFIXES)
        limit = int(state.settings.max_unzipped_mb * MB)
        return await run_in_threadpool(
            state.analyst.patient, job, upload.path, state.settings.max_zip_members, limit
        )

    return await _run_job(request, "patient", work)


@routes.post("/api/slide")
async def slide(
    request: Request,
    mpp: float | None = Query(None, gt=0, description="µm per pixel, if the file lacks it"),
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


async def _upload_error(request: Request, e: UploadError) -> JSONResponse:
    return JSONResponse({"error": str(e), "files": e.files}, status_code=e.status)


async def _analysis_error(request: Request, e: IdcscopeError) -> JSONResponse:
    return JSONResponse({"error": str(e)}, status_code=422)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": e.detail}, status_code=e.status_code, headers=e.headers)


async def _invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
    where = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
    return JSONResponse({"error": f"invalid request: {where}"}, status_code=422)


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    logger.exception("%s %s failed", request.method, request.url.path)
    return JSONResponse({"error": f"internal error ({type(e).__name__}); see the server log"}, 500)


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
