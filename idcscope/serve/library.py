"""The slide library of ``idcscope serve --slides DIR``: the slides in a folder of the
server's own disk, viewed where they lie, so nothing of several GB is uploaded.

A slide is named by its path under the folder, with ``/`` between folders (``a/b.svs``).
Every name a client sends is checked before it touches the file system: no absolute path,
no ``..``, no backslash or NUL, and the path, resolved (symbolic links followed), must be a
file inside the resolved folder; anything else is "no such slide", never a file elsewhere.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path, PurePosixPath

from ..errors import IdcscopeError
from .viewer import ZoomedSlide

logger = logging.getLogger(__name__)

MAX_LISTED = 2000  # slides listed from one folder
OPEN_SLIDES = 8  # slides of the library kept open, with their tile caches (least recent out)
_SKIPPED_SUFFIXES = {".png", ".jpg", ".jpeg", ".txt", ".csv", ".json", ".geojson", ".xml"}


class NoSuchSlide(IdcscopeError):
    """A slide name that names no slide of the library (answered with 404)."""


def slide_format(path: Path) -> str | None:
    """The format OpenSlide reads ``path`` as (``aperio``, ``dicom``, ``generic-tiff``, ...),
    None when it reads none (plain images included: the library lists slides only)."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except (OSError, openslide.OpenSlideError):
        return None


class SlideLibrary:
    """The slides under ``folder`` and the ones open for viewing.

    Args:
        folder: The library's folder; None: no library (uploads only).
    """

    def __init__(self, folder: str | Path | None):
        self.folder = None if folder is None else Path(folder).resolve()
        if self.folder is not None and not self.folder.is_dir():
            raise IdcscopeError(f"{folder}: the slide folder does not exist or is not a folder")
        self._open: OrderedDict[str, ZoomedSlide] = OrderedDict()  # by name
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The slides' names, sorted: every file OpenSlide reads inside the folder (one per
        folder of DICOM files: they are the levels of one slide), links that lead outside
        it left out."""
        if self.folder is None:
            return []
        found = []
        for top, dirs, files in os.walk(self.folder, followlinks=False):
            dirs.sort()
            for name in sorted(files):
                path = Path(top) / name
                if path.suffix.lower() in _SKIPPED_SUFFIXES or not self._inside(path):
                    continue
                kind = slide_format(path)
                if kind is None:
                    continue
                found.append(path.relative_to(self.folder).as_posix())
                if kind == "dicom":
                    break  # the folder's other files are this slide's other levels
            if len(found) >= MAX_LISTED:
                logger.warning("%s: listing the first %d slides only", self.folder, MAX_LISTED)
                break
        return found[:MAX_LISTED]

    def path(self, name: str) -> Path:
        """The file of the slide ``name``.

        Raises:
            NoSuchSlide: ``name`` is not a plain relative path to a slide inside the folder.
        """
        if self.folder is None:
            raise NoSuchSlide("this server has no slide folder (start it with --slides DIR)")
        pure = PurePosixPath(name)
        unsafe = (
            not name
            or "\\" in name
            or "\x00" in name
            or pure.is_absolute()
            or any(part in ("..", ".", "") for part in name.split("/"))
        )
        path = (self.folder / pure).resolve() if not unsafe else None
        if path is None or not self._inside(path) or not path.is_file():
            raise NoSuchSlide(f"no slide {name!r} in the slide folder")
        if slide_format(path) is None:
            raise NoSuchSlide(f"{name!r} is not a slide OpenSlide reads")
        return path

    def open(self, name: str) -> ZoomedSlide:
        """The slide ``name``, opened for Deep Zoom and kept open for the next requests
        (its name checked once, when it is opened)."""
        with self._lock:
            zoomed = self._open.pop(name, None)
        if zoomed is None:
            zoomed = ZoomedSlide(self.path(name), name)
        with self._lock:
            self._open[name] = zoomed
            while len(self._open) > OPEN_SLIDES:
                self._open.popitem(last=False)  # closed once no view holds it either
        return zoomed

    def _inside(self, path: Path) -> bool:
        """Whether ``path``, links followed, lies inside the folder."""
        try:
            return path.resolve().is_relative_to(self.folder)
        except (OSError, RuntimeError):  # a link loop
            return False
