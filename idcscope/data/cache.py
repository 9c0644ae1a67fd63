"""Decode every patch once into a packed, memory-mapped uint8 array.

The array lives under ``$IDCSCOPE_CACHE`` (default: the platform's cache folder, e.g.
``~/.cache/idcscope``) in a folder named by a hash of the manifest and of each file's size
and modification time (:func:`manifest_key`), so a second run on the same data starts
training at once, epochs never decode PNGs again, and a file replaced since is decoded
anew. Decoding is ``data.decode``'s: edge patches padded with glass, files that fail
marked, reported and left out, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd

from . import PATCH_SIZE
from .decode import PatchArray, decode_files

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$IDCSCOPE_CACHE``, else idcscope's folder in the platform's cache folder:
    ``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux, ``~/Library/Caches`` on macOS,
    ``%LOCALAPPDATA%`` on Windows."""
    if os.environ.get("IDCSCOPE_CACHE"):
        return Path(os.environ["IDCSCOPE_CACHE"]).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:  # the XDG spec ignores a relative XDG_CACHE_HOME
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        base = xdg if Path(xdg).is_absolute() else Path.home() / ".cache"
    return Path(base) / "idcscope"


def private_dir(folder: Path) -> Path:
    """``folder``, created if need be, each folder made on the way readable by the user
    alone (0700): what is cached there is trusted later."""
    folder = Path(folder)
    for f in reversed([p for p in (folder, *folder.parents) if not p.exists()]):
        f.mkdir(mode=0o700, exist_ok=True)
    return folder


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader sees the
    old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def manifest_key(root: Path, table: pd.DataFrame) -> str:
    """The cache folder's name: a hash of the folder and of each file's path, size in pixels,
    size in bytes and modification time, so a file replaced, even by one of the same size,
    is decoded again. One ``stat`` per file: a few seconds for the 277k Kaggle files, where
    decoding them takes minutes."""
    h = hashlib.sha1(f"v{CACHE_VERSION}:{Path(root).resolve()}\n".encode())
    for chunk in np.array_split(np.arange(len(table)), max(1, len(table) // 50_000)):
        part = table.iloc[chunk][["path", "width", "height"]]
        h.update(part.to_csv(index=False, header=False).encode())
        stamps = [_stamp(os.path.join(root, p)) for p in part["path"]]  # noqa: PTH118
        h.update(np.asarray(stamps, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _stamp(path: str) -> tuple[int, int]:
    """(size in bytes, mtime in ns) of a file; (-1, -1) for one that cannot be read, which
    decoding then reports."""
    try:
        st = os.stat(path)  # noqa: PTH116
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def load_or_build(
    root: Path,
    table: pd.DataFrame,
    cache_dir: Path | None = None,
    rebuild: bool = False,
    workers: int | None = None,
) -> PatchArray:
    """The decoded patches of ``table`` (paths relative to ``root``), from the cache when there."""
    folder = (cache_dir or default_cache_dir()) / manifest_key(root, table)
    data, meta_path = folder / "patches.u8", folder / "meta.json"
    shape = (len(table), PATCH_SIZE, PATCH_SIZE, 3)
    if meta_path.exists() and not rebuild:
        try:
            meta = json.loads(meta_path.read_text())
            images = np.memmap(data, dtype=np.uint8, mode="r", shape=shape)
            ok = np.load(folder / "ok.npy")  # no pickles: allow_pickle stays False
            if ok.shape != (len(table),) or ok.dtype != bool:
                raise ValueError(f"ok.npy holds {ok.shape} {ok.dtype}, not {len(table)} flags")
            errors = [tuple(e) for e in meta["errors"]]
            logger.info("patch cache hit: %s", folder)
            return PatchArray(images, ok, errors, meta["n_padded"], meta["n_resized"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            # A cache is only ever a copy: one that was damaged is decoded again.
            logger.warning("patch cache %s is damaged (%s); decoding again", folder, e)
    private_dir(folder)
    meta_path.unlink(missing_ok=True)
    images = np.memmap(data, dtype=np.uint8, mode="w+", shape=shape)
    paths = [str(root / p) for p in table["path"]]
    result = decode_files(paths, out=images, workers=workers)
    images.flush()
    np.save(folder / "ok.npy", result.ok)
    meta = {
        "n": len(table),
        "root": str(Path(root).resolve()),
        "errors": result.errors,
        "n_padded": result.n_padded,
        "n_resized": result.n_resized,
    }
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta))
    tmp.replace(meta_path)  # the cache counts as complete only once this file exists
    result.images = np.memmap(data, dtype=np.uint8, mode="r", shape=shape)
    logger.info(
        "decoded %d patches into %s (%d padded, %d skipped)",
        len(table),
        folder,
        result.n_padded,
        len(result.errors),
    )
    return result
