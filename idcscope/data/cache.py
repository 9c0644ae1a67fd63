"""Decode every patch once into a packed, memory-mapped uint8 array.

The array lives under ``$IDCSCOPE_CACHE`` (default ``~/.cache/idcscope``) in a folder named
by a hash of the manifest, so a second run on the same data starts training at once and
epochs never decode PNGs again. Decoding is ``data.decode``'s: edge patches padded with
glass, files that fail marked, reported and left out, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from . import PATCH_SIZE
from .decode import PatchArray, decode_files

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("IDCSCOPE_CACHE", Path.home() / ".cache" / "idcscope"))


def manifest_key(root: Path, table: pd.DataFrame) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}:{Path(root).resolve()}\n".encode())
    for chunk in np.array_split(np.arange(len(table)), max(1, len(table) // 50_000)):
        part = table.iloc[chunk][["path", "width", "height"]]
        h.update(part.to_csv(index=False, header=False).encode())
    return h.hexdigest()[:16]


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
    folder.mkdir(parents=True, exist_ok=True)
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
