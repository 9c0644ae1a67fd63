"""Per-request folders under one server temp root, and the only way results are served.

Each upload gets a job: a fresh ``tempfile.mkdtemp`` folder. A job publishes the result
files it wrote under their names; a download is looked up by job id and published name, so
no path sent by a client ever reaches the file system. Only the newest ``keep`` finished jobs
are kept on disk.

Protections:

- Job ids are ``secrets.token_urlsafe`` (unguessable), and unrelated to the folder's name.
- A job's ``scratch`` folder (the raw uploads, a zip's unpacked members) is deleted as soon
  as its analysis ends, failed or not: a kept job holds its results only.
- Every CSV is made spreadsheet-safe as it is published (:func:`spreadsheet_safe`).
- The server's root holds a lock file, locked for the server's life. At start, the roots of
  dead servers (killed before they could clean up) are removed: only roots of this user
  whose lock nobody holds, so a live server's root is never touched.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

ROOT_PREFIX = "idcscope-serve-"
LOCK_NAME = "server.lock"
_FORMULA = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as a formula
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def spreadsheet_safe(cell: str) -> str:
    """``cell`` with a leading ``'`` when a spreadsheet would run it as a formula (OWASP).

    Numbers (``-0.5``, ``1e-3``) are left as they are: they start with a sign, not a formula.
    """
    if cell.startswith(_FORMULA) and not _NUMBER.fullmatch(cell):
        return "'" + cell
    return cell


def make_csv_safe(path: Path) -> None:
    """Rewrite a CSV file with :func:`spreadsheet_safe` applied to every cell."""
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([[spreadsheet_safe(c) for c in row] for row in rows])


@dataclass
class Job:
    """One upload's folder and what it published."""

    id: str
    kind: str
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    done: bool = False

    @property
    def scratch(self) -> Path:
        """Where the uploads and unpacked members go: deleted when the analysis ends."""
        return self.folder / "scratch"

    def publish(self, path: str | Path) -> str:
        """Make a file inside the job's folder downloadable; returns its URL."""
        path = Path(path).resolve()
        if not path.is_file() or not path.is_relative_to(self.folder.resolve()):
            raise ValueError(f"{path} is not a file of job {self.id}")
        if path.is_relative_to(self.scratch.resolve()):
            raise ValueError(f"{path} is scratch of job {self.id}, deleted after the analysis")
        if path.suffix.lower() == ".csv":
            make_csv_safe(path)
        self.files[path.name] = path
        return self.url(path.name)

    def url(self, name: str) -> str:
        return f"/api/jobs/{self.id}/files/{name}"


class JobStore:
    """The server's jobs, newest last, in folders under a fresh root in ``parent``.

    Args:
        parent: Where the root is made; None: the system's temp folder.
        keep: Finished jobs kept on disk.
    """

    def __init__(self, parent: str | Path | None = None, keep: int = 20):
        parent = Path(parent or tempfile.gettempdir())
        remove_stale_roots(parent)
        self.root = Path(tempfile.mkdtemp(prefix=ROOT_PREFIX, dir=parent))
        self._lock_file = _hold_lock(self.root / LOCK_NAME)
        self.keep = max(1, keep)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def create(self, kind: str) -> Job:
        folder = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=self.root))
        job = Job(secrets.token_urlsafe(16), kind, folder)
        job.scratch.mkdir()
        with self._lock:
            self._jobs[job.id] = job
        return job

    def finish(self, job: Job) -> None:
        """Mark ``job`` done, delete its scratch, and remove the oldest finished jobs beyond
        ``keep``."""
        shutil.rmtree(job.scratch, ignore_errors=True)
        job.done = True
        with self._lock:
            finished = [j for j in self._jobs.values() if j.done]
            for old in finished[: max(0, len(finished) - self.keep)]:
                self._remove(old)

    def discard(self, job: Job) -> None:
        """Remove a job at once (its upload was refused)."""
        with self._lock:
            self._remove(job)

    def file(self, job_id: str, name: str) -> Path | None:
        """The published file ``name`` of job ``job_id``; None when there is no such file."""
        job = self._jobs.get(job_id)
        path = job.files.get(name) if job else None
        return path if path is not None and path.is_file() else None

    def close(self) -> None:
        """Remove every job and the root."""
        with self._lock:
            self._jobs.clear()
        shutil.rmtree(self.root, ignore_errors=True)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _remove(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        shutil.rmtree(job.folder, ignore_errors=True)
        logger.debug("removed job %s", job.id)


def _hold_lock(path: Path):
    """Create and lock ``path`` for as long as the returned file stays open (POSIX only).

    The OS drops the lock when the process dies, however it dies, which is what tells a
    dead server's root from a live one (a pid could be reused).
    """
    try:
        import fcntl
    except ImportError:  # Windows: no flock; stale roots are left (never a live one removed)
        return None
    # Locked under another name first: no one may find the file and lock it before we do.
    starting = path.with_name(path.name + ".new")
    f = starting.open("w")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write(f"{os.getpid()}\n")
    f.flush()
    starting.rename(path)
    return f


def remove_stale_roots(parent: Path) -> list[Path]:
    """Remove the roots in ``parent`` left by dead servers of this user; returns them.

    A root is stale when it is a real folder of this user holding a lock file nobody holds.
    A root without a lock file (a server that is just starting) is left alone.
    """
    try:
        import fcntl
    except ImportError:
        return []
    removed = []
    for root in sorted(parent.glob(ROOT_PREFIX + "*")):
        lock = root / LOCK_NAME
        try:
            if root.is_symlink() or not root.is_dir() or root.stat().st_uid != os.getuid():
                continue
            fd = os.open(lock, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: a live server's root
        else:
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root)
        finally:
            os.close(fd)
    if removed:
        logger.info("removed %d temp folder(s) of servers that are gone", len(removed))
    return removed
