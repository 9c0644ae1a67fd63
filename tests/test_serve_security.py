"""``idcscope serve`` against an attacker: foreign hosts and origins, disk left behind, bad
slides, leaked paths, formula injection, pixel floods, guessable ids, aborted uploads.

The network-level checks go through the real app served by uvicorn on a free loopback port.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from idcscope.errors import DataError
from idcscope.serve import Settings, create_app
from idcscope.serve.app import _split_host
from idcscope.serve.jobs import JobStore, spreadsheet_safe
from tests.conftest import serving
from tests.test_serve import files, image_bytes, patient_members, zip_bytes


@pytest.fixture(scope="module")
def checkpoint(trained_run) -> Path:
    return trained_run / "best.pt"


@pytest.fixture(scope="module")
def app(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    return create_app(checkpoint, Settings(temp_dir=str(root), keep_jobs=3, max_upload_mb=64))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def server(app):
    """``(base URL, port)`` of uvicorn serving ``app`` in a thread."""
    with serving(app) as url:
        yield url, int(url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def patient(synthetic_root) -> Path:
    return sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]


def job_folders(app) -> list[Path]:
    return sorted(p for p in app.state.jobs.root.iterdir() if p.is_dir())


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (its pixel data is a stub)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------- 1. hosts, origins


def test_foreign_host_is_refused(server):
    url, port = server
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1:1", "localhost", "a@b"):
        r = httpx.get(f"{url}/api/health", headers={"Host": host}, timeout=10)
        assert r.status_code == 421, host
        assert "host" in r.json()["error"]
        assert r.headers["x-content-type-options"] == "nosniff"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST.:{port}"):
        assert httpx.get(f"{url}/api/health", headers={"Host": host}, timeout=10).is_success


def test_cross_site_post_is_refused(server, app):
    url, port = server
    before = job_folders(app)
    sent = files(("patch.png", image_bytes()))
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": f"http://evil.example:{port}"},
        {"Origin": "null"},  # sandboxed frames, file:// pages
        {"Referer": "http://evil.example/page.html"},  # no Origin: the Referer decides
        {"Origin": f"http://127.0.0.1:{port + 1}"},  # another local service
    ):
        r = httpx.post(f"{url}/api/patches", files=sent, headers=headers, timeout=30)
        assert r.status_code == 403, headers
        assert "cross-site" in r.json()["error"]
    assert job_folders(app) == before  # refused before any upload was stored
    for headers in (
        {},  # curl and scripts send no Origin
        {"Origin": f"http://127.0.0.1:{port}"},  # the page itself
        {"Origin": f"http://localhost:{port}", "Referer": f"http://localhost:{port}/"},
    ):
        r = httpx.post(f"{url}/api/patches", files=sent, headers=headers, timeout=60)
        assert r.status_code == 200, (headers, r.text)
    r = httpx.get(f"{url}/api/health", headers={"Origin": "http://evil.example"}, timeout=10)
    assert r.is_success  # reads stay readable: CORS keeps their answers from other sites


@pytest.mark.parametrize(
    ("value", "split"),
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("[::1]:8000", ("::1", 8000)),
        ("LocalHost", ("localhost", None)),
        ("localhost.:80", ("localhost", 80)),
        ("evil.example:8000:1", None),
        ("user@localhost:8000", None),
        ("", None),
    ],
)
def test_split_host(value, split):
    assert _split_host(value) == split


def test_serve_command_passes_its_host(checkpoint, monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from idcscope.cli import app as cli

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda web, **kw: served.update(web=web, **kw))
    args = ["serve", "--model", str(checkpoint), "--host", "myhost.lan"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    web = served.pop("web")
    try:
        assert web.state.settings.host == "myhost.lan"
        assert served["proxy_headers"] is False  # no X-Forwarded-* can rename the client
        with serving(web) as url:
            port = url.rsplit(":", 1)[1]
            for host, status in (("myhost.lan", 200), ("otherhost.lan", 421)):
                r = httpx.get(f"{url}/api/health", headers={"Host": f"{host}:{port}"}, timeout=10)
                assert r.status_code == status, host
    finally:
        web.state.jobs.close()


# ----------------------------------------------------------------------------- 2. disk


def disk_files(app) -> dict[str, int]:
    return {
        p.relative_to(app.state.jobs.root).as_posix(): p.stat().st_size
        for p in app.state.jobs.root.rglob("*")
        if p.is_file()
    }


def test_kept_jobs_keep_results_only(client, app, patient):
    junk = b"\x89PNG\r\n\x1a\n" + os.urandom(2 * 1024 * 1024)  # a large unreadable "patch"
    r = client.post("/api/patches", files=files(("junk.png", junk), ("a.png", image_bytes())))
    assert r.status_code == 200, r.text
    members = patient_members(patient)
    r = client.post("/api/patient", files=files(("patient.zip", zip_bytes(members))))
    assert r.status_code == 200, r.text
    left = disk_files(app)
    for name in (*map(Path, members), Path("junk.png"), Path("a.png"), Path("patient.zip")):
        assert not [f for f in left if f.endswith("/" + name.name)], name.name
    assert sum(left.values()) < 2 * 1024 * 1024, left  # results only: CSVs, overlays, maps
    for url in r.json()["files"].values():
        assert client.get(url).status_code == 200  # what the page links to is kept


def test_failed_analysis_leaves_nothing(client, app, monkeypatch):
    before = job_folders(app)

    def broken(*a, **kw):
        raise DataError("the model broke")

    monkeypatch.setattr(app.state.analyst.explainer, "explain", broken)
    r = client.post("/api/patches", files=files(("a.png", image_bytes())))
    assert r.status_code == 422
    assert job_folders(app) == before


def test_zip_is_unpacked_inside_the_one_at_a_time_work(server, app, patient):
    url, _ = server
    lock, result = app.state.analyst.lock, {}
    sent = files(("patient.zip", zip_bytes(patient_members(patient))))
    lock.acquire()
    try:
        thread = threading.Thread(
            target=lambda: result.update(
                r=httpx.post(f"{url}/api/patient", files=sent, timeout=120)
            )
        )
        thread.start()
        deadline = time.monotonic() + 30
        while not list(app.state.jobs.root.glob("patient-*/scratch/upload/patient.zip")):
            assert time.monotonic() < deadline, "the upload never arrived"
            time.sleep(0.05)
        time.sleep(0.5)  # time to unpack, were it outside the lock
        assert not list(app.state.jobs.root.glob("patient-*/scratch/patient"))
    finally:
        lock.release()
    thread.join(120)
    assert result["r"].status_code == 200, result["r"].text


# ----------------------------------------------------------------------------- 3. stale roots


OWNER = textwrap.dedent(
    """
    import sys, time
    from idcscope.serve.jobs import JobStore
    store = JobStore(sys.argv[1])
    (store.root / "partial-upload.bin").write_bytes(b"x" * 1000)
    print(store.root, flush=True)
    time.sleep(120)
    """
)


def start_owner(parent: Path) -> tuple[subprocess.Popen, Path]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(parent)], stdout=subprocess.PIPE, text=True, env=env
    )
    return proc, Path(proc.stdout.readline().strip())


@pytest.mark.skipif(sys.platform == "win32", reason="stale roots are found by flock (POSIX)")
def test_roots_of_killed_servers_are_removed_at_start(tmp_path):
    dead, dead_root = start_owner(tmp_path)
    live, live_root = start_owner(tmp_path)
    try:
        mine = JobStore(tmp_path)  # a live server in this very process
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait(10)
        assert dead_root.is_dir()  # nobody cleaned up after the SIGKILL
        unlocked = tmp_path / "idcscope-serve-starting"  # a server between mkdtemp and lock
        unlocked.mkdir()
        store = JobStore(tmp_path)
        assert not dead_root.exists()
        assert live_root.is_dir()
        assert (live_root / "partial-upload.bin").is_file()
        assert mine.root.is_dir()
        assert unlocked.is_dir()
        store.close()
        mine.close()
        assert not store.root.exists()
        assert not mine.root.exists()
    finally:
        live.kill()
        live.wait(10)
        dead.kill()


# ----------------------------------------------------------------------------- 4. bad slides


@pytest.mark.parametrize("mpp", ["inf", "-inf", "nan", "0", "1e9", "1e-9"])
def test_bad_slide_mpp_is_a_4xx(client, mpp):
    r = client.post(f"/api/slide?mpp={mpp}", files=files(("s.svs", b"II*\0")))
    assert r.status_code == 422, r.text
    assert "mpp" in r.json()["error"]


def test_huge_plain_image_as_slide_is_a_4xx(client, app):
    r = client.post("/api/slide", files=files(("huge.tif", png_header_only(14000, 14000))))
    assert r.status_code == 422, r.text
    assert "too large" in r.json()["error"]
    assert "huge.tif" in r.json()["error"]
    r = client.post("/api/slide", files=files(("junk.svs", os.urandom(4096))))
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("mpp", [math.inf, -math.inf, math.nan, 0.0, -1.0, 1e9])
def test_slide_inference_refuses_bad_mpp(checkpoint, tmp_path, mpp):
    from idcscope.spatial.slide import slide_inference

    with pytest.raises(DataError, match=r"slide mpp must be a number of µm per pixel from"):
        slide_inference(checkpoint, tmp_path / "any.tif", tmp_path / "out", slide_mpp=mpp)
    assert not (tmp_path / "out").exists()


def test_slide_recording_an_absurd_mpp_is_refused(tmp_path):
    import numpy as np

    from idcscope.spatial import wsi

    path = wsi.write_tiff_slide(np.full((64, 64, 3), 200, np.uint8), tmp_path / "s.tif", mpp=1e-3)
    with pytest.raises(DataError, match=r"s\.tif: the resolution the slide records"):
        wsi.read_slide(path, None, 4.0, 50, 0.25)


# ----------------------------------------------------------------------------- 5. paths


def test_messages_hold_no_server_path(client, app):
    root = str(app.state.jobs.root)
    for url, name, data in (
        ("/api/slide?mpp=0.5", "my slide.svs", b"II*\0not a tiff"),
        ("/api/slide", "huge.tif", png_header_only(14000, 14000)),
        ("/api/patches", "broken.png", b"\x89PNG\r\n\x1a\nbroken"),
        ("/api/patient", "bad.zip", b"PK\x03\x04broken"),
    ):
        r = client.post(url, files=files((name, data)))
        text = r.text
        assert r.status_code < 500, text
        assert root not in text
        assert "/tmp" not in text
        assert "scratch" not in text
        assert name in text or r.status_code == 400, text


# ----------------------------------------------------------------------------- 6. CSV injection


@pytest.mark.parametrize(
    ("cell", "safe"),
    [
        ("=1+1", "'=1+1"),
        ("@SUM(A1:A2)", "'@SUM(A1:A2)"),
        ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
        ("-2+3", "'-2+3"),
        ("\t=1", "'\t=1"),
        ("\r=1", "'\r=1"),
        ("-0.5", "-0.5"),
        ("1e-3", "1e-3"),
        ("+7", "+7"),
        ("a=1", "a=1"),
        ("", ""),
    ],
)
def test_spreadsheet_safe(cell, safe):
    assert spreadsheet_safe(cell) == safe


def test_csv_cells_cannot_be_formulas(client):
    names = ["=1+1.png", "@SUM(1+1).png", "+1+1.png", "-1+1.png", "ok.png"]
    r = client.post("/api/patches", files=files(*[(n, image_bytes()) for n in names]))
    assert r.status_code == 200, r.text
    rows = list(csv.DictReader(io.StringIO(client.get(r.json()["files"]["csv"]).text)))
    assert [row["file"] for row in rows] == ["'" + n for n in names[:4]] + ["ok.png"]
    assert all(0 <= float(row["prob_idc"]) <= 1 for row in rows)  # numbers stay numbers


def test_every_published_csv_is_escaped(tmp_path):
    store = JobStore(tmp_path)
    try:
        job = store.create("patient")
        path = job.folder / "table.csv"
        path.write_text('path,prob_idc\n"=HYPERLINK(""http://x"")",-0.25\n@A1,0.5\n')
        job.publish(path)
        assert path.read_text().splitlines() == [
            "path,prob_idc",
            '"\'=HYPERLINK(""http://x"")",-0.25',
            "'@A1,0.5",
        ]
        upload = job.scratch / "a.png"
        upload.write_bytes(b"x")
        with pytest.raises(ValueError, match="scratch"):
            job.publish(upload)  # uploads are deleted after the analysis: never linked
    finally:
        store.close()


# ----------------------------------------------------------------------------- 7. pixels


def test_pixel_flood_is_refused_before_decoding(client, app, monkeypatch):
    def never(*a, **kw):
        raise AssertionError("decoded an upload over the pixel budget")

    monkeypatch.setattr(app.state.analyst.explainer, "explain", never)
    big = png_header_only(4096, 4096)
    r = client.post("/api/patches", files=files(*[(f"p{i}.png", big) for i in range(7)]))
    assert r.status_code == 413
    assert "117.4 megapixels; the limit is 100 megapixels" in r.json()["error"]
    members = {f"9000_idx5_x{i}_y1_class0.png": big for i in range(7)}
    r = client.post("/api/patient", files=files(("many.zip", zip_bytes(members))))
    assert r.status_code == 413
    assert "megapixels" in r.json()["error"]


def test_the_pixel_budget_passes_honest_uploads():
    s = Settings()
    patch = 50 * 50
    assert s.max_megapixels * 1e6 >= s.max_patch_files * patch
    assert s.max_megapixels * 1e6 >= s.max_zip_members * patch


# ----------------------------------------------------------------------------- 8. job ids


def test_job_ids_are_unguessable(client, app, monkeypatch):
    import secrets

    ids = set()
    for _ in range(3):
        res = client.post("/api/patches", files=files(("a.png", image_bytes()))).json()
        ids.add(res["job"])
    assert len(ids) == 3
    for job_id in ids:
        assert len(job_id) >= 22  # at least 128 random bits, URL-safe base64
        assert all(job_id not in p.name for p in app.state.jobs.root.iterdir())
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n=None: "from-the-csprng")
    res = client.post("/api/patches", files=files(("a.png", image_bytes()))).json()
    assert res["job"] == "from-the-csprng"


# ----------------------------------------------------------------------------- 9. aborted uploads


def test_aborted_upload_logs_one_line(server, app, caplog):
    _, port = server
    uvicorn_log = logging.getLogger("uvicorn")
    uvicorn_log.addHandler(caplog.handler)
    before = job_folders(app)
    try:
        with caplog.at_level(logging.INFO), socket.create_connection(("127.0.0.1", port)) as s:
            body = (
                b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n'
                + b"\0" * 100_000
            )
            s.sendall(
                b"POST /api/patches HTTP/1.1\r\n"
                + f"Host: 127.0.0.1:{port}\r\n".encode()
                + b"Content-Type: multipart/form-data; boundary=b\r\n"
                + b"Content-Length: 10000000\r\n\r\n"
                + body
            )
            time.sleep(0.5)
            s.close()
            deadline = time.monotonic() + 10
            while not [r for r in caplog.records if r.levelno >= logging.WARNING]:
                assert time.monotonic() < deadline, "nothing was logged"
                time.sleep(0.05)
            time.sleep(0.5)
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1, [r.getMessage() for r in loud]
    assert "disconnected" in loud[0].getMessage()
    assert loud[0].exc_info is None
    assert len(caplog.text.splitlines()) <= 2
    assert job_folders(app) == before  # the partial upload is gone
