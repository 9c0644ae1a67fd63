"""The server under load: 200 mixed requests, 20 at a time, on loopback.

Valid uploads must all succeed (no 5xx), invalid ones must get the right 4xx, memory must
stay bounded, old jobs must be pruned, and the server must still answer afterwards.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from pathlib import Path

import httpx

from idcscope.serve import Settings, create_app
from tests.conftest import serving
from tests.test_serve import image_bytes, patient_members, zip_bytes

N_REQUESTS, CONCURRENCY = 200, 20
KEEP_JOBS = 6


def rss_mb() -> float:
    """Resident memory of this process (the server runs in it), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def request_mix(patient_dir: Path, seed: int = 0) -> list[tuple[str, str, list, int]]:
    """``(kind, url, files, expected status)`` for N_REQUESTS requests in a seeded order."""
    patient_zip = zip_bytes(patient_members(patient_dir))
    slip = zip_bytes({"9000_idx5_x1_y1_class0.png": image_bytes(), "../../evil.png": b"x"})
    oversize = b"\0" * (2 * 1024 * 1024)
    kinds = {
        # kind: (count, url, files, expected status)
        "patch": (90, "/api/patches", [("p_class1.png", image_bytes())], 200),
        "patches+corrupt": (
            20,
            "/api/patches",
            [("a.png", image_bytes((90, 40, 160))), ("bad.png", b"\x89PNG\r\n\x1a\nbroken")],
            200,
        ),
        "patient zip": (6, "/api/patient", [("patient.zip", patient_zip)], 200),
        "wrong extension": (30, "/api/patches", [("scan.exe", b"MZ")], 415),
        "zip slip": (24, "/api/patient", [("evil.zip", slip)], 400),
        "oversize": (20, "/api/patches", [("big.png", oversize)], 413),
        "unknown job": (10, "/api/jobs/nope/files/predictions.csv", None, 404),
    }
    mix = [(k, url, f, code) for k, (n, url, f, code) in kinds.items() for _ in range(n)]
    assert len(mix) == N_REQUESTS
    random.Random(seed).shuffle(mix)
    return mix


async def fire(base: str, mix) -> list[tuple[str, int, int]]:
    """Send every request, at most CONCURRENCY at once; ``(kind, expected, got)`` each."""
    gate = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:

        async def one(kind, url, files, expected):
            async with gate:
                if files is None:
                    r = await client.get(url)
                else:
                    sent = [("files", (n, d, "application/octet-stream")) for n, d in files]
                    r = await client.post(url, files=sent)
                return kind, expected, r.status_code

        return await asyncio.gather(*(one(*m) for m in mix))


def test_server_under_mixed_load(trained_run, synthetic_root, tmp_path):
    settings = Settings(max_upload_mb=1, keep_jobs=KEEP_JOBS, temp_dir=str(tmp_path))
    app = create_app(trained_run / "best.pt", settings)
    patient = sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0]
    mix = request_mix(patient)
    with serving(app) as base:
        warm = httpx.post(  # first analysis loads lazily: keep it out of the memory figure
            f"{base}/api/patches",
            files=[("files", ("w.png", image_bytes(), "image/png"))],
            timeout=120,
        )
        assert warm.status_code == 200, warm.text
        before, start = rss_mb(), time.perf_counter()
        results = asyncio.run(fire(base, mix))
        seconds, after = time.perf_counter() - start, rss_mb()
        health = httpx.get(f"{base}/api/health", timeout=10)
        jobs = [p for p in app.state.jobs.root.iterdir() if p.is_dir()]
    print(f"{N_REQUESTS} requests in {seconds:.1f} s, RSS {before:.0f} -> {after:.0f} MB")

    wrong = [(k, want, got) for k, want, got in results if got != want]
    assert not wrong, Counter(wrong).most_common(5)
    assert not any(got >= 500 for _, _, got in results)
    assert Counter(k for k, _, _ in results)["patch"] == 90
    assert after - before < 400, f"RSS grew {after - before:.0f} MB over {N_REQUESTS} requests"
    # Finished jobs beyond KEEP_JOBS are pruned and refused ones deleted at once.
    assert len(jobs) <= KEEP_JOBS
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert not list(tmp_path.rglob("evil.png"))
