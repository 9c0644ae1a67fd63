"""Decode every patch once into a packed, memory-mapped uint8 array.

The array lives under ``$IDCSCOPE_CACHE`` (default ``~/.cache/idcscope``) in a folder named
by a hash of the manifest, so a second run on the same data starts training at once and
epochs never decode PNGs again. Patches smaller than 50x50 (edge patches of the slide) are
padded with white, the colour of glass, at their bottom and right; larger images are
resized. Files that fail to decode are marked, reported and left out, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd

from ..progress import progress_bar

logger = logging.getLogger(__name__)

PATCH_SIZE = 50
PAD_VALUE = 255
MAX_PIXELS = 4096 * 4096  # far above any patch; guards against decompression bombs
CACHE_VERSION = 1
_CHUNK = 1024


@dataclass
class PatchArray:
    """Decoded patches (N, 50, 50, 3) uint8 aligned with a manifest; ``ok`` marks usable rows."""

    images: np.ndarray
    ok: np.ndarray
    errors: list[tuple[str, str]] = field(default_factory=list)
    n_padded: int = 0
    n_resized: int = 0


def default_cache_dir() -> Path:
    return Path(os.environ.get("IDCSCOPE_CACHE", Path.home() / ".cache" / "idcscope"))


DECODE_ERRORS = (OSError, ValueError)  # what decode_patch raises for a file it cannot use


def decode_patch(path: str | Path, size: int = PATCH_SIZE) -> tuple[np.ndarray, str]:
    """Read one patch as (size, size, 3) uint8 RGB; returns the array and "", "padded" or "resized".

    Raises:
        OSError: the file cannot be read, is no image Pillow knows, or its pixels are
            truncated or corrupt.
        ValueError: the image is too large for a patch (a decompression bomb), or a decoder
            failed in some other way; the message says how.
    """
    from PIL import Image

    try:
        return _decode(path, size)
    except (*DECODE_ERRORS, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"too large for a patch: {e}") from e
    except Exception as e:  # Pillow's plugins also raise SyntaxError, EOFError, struct.error...
        raise ValueError(f"not a decodable image ({type(e).__name__}: {e})") from e


def _decode(path: str | Path, size: int) -> tuple[np.ndarray, str]:
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ValueError(f"{im.width}x{im.height} pixels is too large for a patch")
            rgb = _to_rgb(im)
    how = ""
    if rgb.width > size or rgb.height > size:
        rgb = rgb.resize((size, size), Image.Resampling.BOX)
        how = "resized"
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.shape[:2] != (size, size):
        out = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
        out[: arr.shape[0], : arr.shape[1]] = arr
        arr, how = out, "padded"
    return arr, how


def _to_rgb(im):
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of letting convert() clip at 255.
        a = np.asarray(im, dtype=np.float32)
        a = (a / max(float(a.max()), 1.0) * 255).round().astype(np.uint8)
        from PIL import Image

        return Image.fromarray(a).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        from PIL import Image

        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _decode_chunk(paths: list[str]) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    out = np.empty((len(paths), PATCH_SIZE, PATCH_SIZE, 3), dtype=np.uint8)
    ok = np.zeros(len(paths), dtype=bool)
    hows, reasons = [""] * len(paths), [""] * len(paths)
    for i, p in enumerate(paths):
        try:
            out[i], hows[i] = decode_patch(p)
            ok[i] = True
        except Exception as e:  # any decoder failure is a skipped patch, reported below
            reasons[i] = f"{type(e).__name__}: {e}"
    return out, ok, hows, reasons


def decode_files(
    paths: list[str],
    out: np.ndarray | None = None,
    workers: int | None = None,
    desc: str = "decoding patches",
) -> PatchArray:
    """Decode ``paths`` in parallel into ``out`` (allocated if None)."""
    n = len(paths)
    images = np.empty((n, PATCH_SIZE, PATCH_SIZE, 3), np.uint8) if out is None else out
    ok = np.zeros(n, dtype=bool)
    result = PatchArray(images=images, ok=ok)
    chunks = [(s, paths[s : s + _CHUNK]) for s in range(0, n, _CHUNK)]
    workers = workers or min(len(os.sched_getaffinity(0)), 8)

    def collect(start: int, decoded) -> None:
        arr, good, hows, reasons = decoded
        images[start : start + len(arr)] = arr
        ok[start : start + len(arr)] = good
        result.n_padded += hows.count("padded")
        result.n_resized += hows.count("resized")
        chunk_paths = paths[start : start + len(arr)]
        result.errors += [
            (p, r) for p, r, g in zip(chunk_paths, reasons, good, strict=True) if not g
        ]

    with progress_bar(desc, total=n) as advance:
        if workers <= 1 or len(chunks) <= 1:
            for start, chunk in chunks:
                collect(start, _decode_chunk(chunk))
                advance(len(chunk))
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
                futures = [(s, c, pool.submit(_decode_chunk, c)) for s, c in chunks]
                for start, chunk, fut in futures:
                    collect(start, fut.result())
                    advance(len(chunk))
    for p, reason in result.errors[:10]:
        logger.warning("skipped %s: %s", p, reason)
    return result


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
