"""Per-request folders under one server temp root, and the only way results are served.

Each upload gets a job: a fresh ``tempfile.mkdtemp`` folder. A job publishes the result
files it wrote under their names; a download is looked up by job id and published name, so
no path sent by a client ever reaches the file system. Only the newest ``keep`` finished jobs
are kept on disk.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One upload's folder and what it published."""

    id: str
    kind: str
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    done: bool = False

    def publish(self, path: str | Path) -> str:
        """Make a file inside the job's folder downloadable; returns its URL."""
        path = Path(path).resolve()
        if not path.is_file() or not path.is_relative_to(self.folder.resolve()):
            raise ValueError(f"{path} is not a file of job {self.id}")
        self.files[path.name] = path
        return self.url(path.name)

    def url(self, name: str) -> str:
        return f"/api/jobs/{self.id}/files/{name}"


class JobStore:
    """The server's jobs, newest last, in folders under ``root``."""

    def __init__(self, root: Path, keep: int = 20):
        self.root, self.keep = Path(root), max(1, keep)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()

    def create(self, kind: str) -> Job:
        folder = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=self.root))
        job = Job(folder.name, kind, folder)
        with self._lock:
            self._jobs[job.id] = job
        return job

    def finish(self, job: Job) -> None:
        """Mark ``job`` done and remove the oldest finished jobs beyond ``keep``."""
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

    def _remove(self, job: Job) -> None:
        self._jobs.pop(job.id, None)
        shutil.rmtree(job.folder, ignore_errors=True)
        logger.debug("removed job %s", job.id)
