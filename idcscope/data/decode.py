"""Decode patch files into uint8 RGB arrays of 50x50: fast for the common PNG, safe for the rest.

Patches smaller than 50x50 (edge patches of the slide) are padded with white, the colour
of glass, at their bottom and right; larger images are resized. The Kaggle patches are
8-bit RGB PNGs: those are decoded by libpng through ``imagecodecs``, which releases the
GIL, so threads decode on every core (2.5x Pillow's rate on one). Every other file (other
colour types, bit depths, formats, and anything libpng refuses) goes through Pillow, whose
errors name what is wrong.
"""

from __future__ import annotations

import logging
import os
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..cpus import usable_cpus
from ..progress import progress_bar
from . import PATCH_SIZE

logger = logging.getLogger(__name__)

PAD_VALUE = 255
MAX_PIXELS = 4096 * 4096  # far above any patch; guards against decompression bombs
DECODE_ERRORS = (OSError, ValueError)  # what decode_patch raises for a file it cannot use
_PNG = b"\x89PNG\r\n\x1a\n"
# IHDR of a 50x50 8-bit RGB PNG (chunk type, width, height, depth, colour type).
_KAGGLE_IHDR = b"IHDR" + struct.pack(">IIBB", PATCH_SIZE, PATCH_SIZE, 8, 2)
_FIRST_READ = 1 << 16  # a 50x50 RGB PNG is a few kB
_MAX_FAST_BYTES = 1 << 20  # more than this is left to Pillow
_CHUNK = 256  # files per task: enough to amortise the call, small enough to spread out


@dataclass
class PatchArray:
    """Decoded patches (N, 50, 50, 3) uint8 aligned with a manifest; ``ok`` marks usable rows."""

    images: np.ndarray
    ok: np.ndarray
    errors: list[tuple[str, str]] = field(default_factory=list)
    n_padded: int = 0
    n_resized: int = 0


def decode_patch(path: str | Path, size: int = PATCH_SIZE) -> tuple[np.ndarray, str]:
    """Read one patch as (size, size, 3) uint8 RGB; returns the array and "", "padded" or "resized".

    Raises:
        OSError: the file cannot be read, is no image Pillow knows, or its pixels are
            truncated or corrupt.
        ValueError: the image is too large for a patch (a decompression bomb), or a decoder
            failed in some other way; the message says how.
    """
    return _decode_bytes(path, _read(path), size)


def _read(path) -> bytes:
    # Bare file descriptors: this runs once per file, thousands of times a second, and a
    # buffered file object costs a third more than the read itself.
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.read(fd, _FIRST_READ)
        if len(data) == _FIRST_READ:  # not a small patch: read on, up to the fast path's limit
            data += os.read(fd, _MAX_FAST_BYTES - _FIRST_READ)
    finally:
        os.close(fd)
    return data


def _decode_bytes(path, data: bytes, size: int) -> tuple[np.ndarray, str]:
    png = head_size(data[:24])  # a bad header is refused here, with what is wrong with it
    fast = None
    if png and len(data) < _MAX_FAST_BYTES and _fast_png(data, size):
        fast = _decode_rgb_png(data, size)
    return fast if fast is not None else _decode_pillow(path, size)


def head_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the first 24+ bytes of a PNG; None for other formats.

    Raises:
        ValueError: the file is empty, or its PNG header is truncated, corrupt, or claims
            no pixels or more than a patch can hold (a decompression bomb).
    """
    if len(head) == 0:
        raise ValueError("empty file (0 bytes)")
    if head[:8] != _PNG:
        return None
    if len(head) < 24:
        raise ValueError(f"truncated PNG header ({len(head)} bytes)")
    if head[12:16] != b"IHDR":
        raise ValueError("corrupt PNG header (no IHDR chunk)")
    w, h = struct.unpack(">II", head[16:24])
    if w == 0 or h == 0:
        raise ValueError(f"PNG header says {w}x{h} pixels")
    if w * h > MAX_PIXELS:
        raise ValueError(f"{w}x{h} pixels is too large for a patch (decompression bomb?)")
    return int(w), int(h)


def _fast_png(head: bytes, size: int) -> bool:
    """Whether the (valid) header is that of an 8-bit RGB PNG no larger than a patch."""
    w, h, depth, colour = struct.unpack(">IIBB", head[16:26]) if len(head) >= 26 else (0,) * 4
    return depth == 8 and colour == 2 and 0 < w <= size and 0 < h <= size


def _decode_rgb_png(data: bytes, size: int) -> tuple[np.ndarray, str] | None:
    """libpng for an 8-bit RGB PNG no larger than a patch; None when it refuses."""
    import imagecodecs

    w, h = struct.unpack(">II", data[16:24])

    try:
        rgb = imagecodecs.png_decode(data)
    except Exception:  # damaged: Pillow decides, and its error says what is wrong
        return None
    if rgb.shape != (h, w, 3) or rgb.dtype != np.uint8:
        return None
    if (h, w) == (size, size):
        return rgb, ""
    out = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    out[:h, :w] = rgb
    return out, "padded"


def _decode_pillow(path: str | Path, size: int) -> tuple[np.ndarray, str]:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ValueError(f"{im.width}x{im.height} pixels is too large for a patch")
                rgb = _to_rgb(im)
    except Image.UnidentifiedImageError as e:
        raise ValueError(f"not a readable image ({e})") from e
    except (*DECODE_ERRORS, MemoryError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"too large for a patch: {e}") from e
    except Exception as e:  # Pillow's plugins also raise SyntaxError, EOFError, struct.error...
        raise ValueError(f"not a decodable image ({type(e).__name__}: {e})") from e
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
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of letting convert() clip at 255.
        a = np.asarray(im, dtype=np.float32)
        a = (a / max(float(a.max()), 1.0) * 255).round().astype(np.uint8)
        return Image.fromarray(a).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def decode_into(paths: list[str], out: np.ndarray) -> tuple[np.ndarray, list[str], list[str]]:
    """Decode ``paths`` into ``out`` (len(paths), 50, 50, 3) in this thread.

    Returns ``(ok, how, reasons)``: which decoded, "padded"/"resized"/"" for each, and why
    each failure failed ("" where none); a failed row of ``out`` is left as it was.
    """
    import imagecodecs

    png_decode = imagecodecs.png_decode
    ok = np.zeros(len(paths), dtype=bool)
    hows, reasons = [""] * len(paths), [""] * len(paths)
    for i, p in enumerate(paths):
        try:
            data = _read(p)
            # The Kaggle patch, by far the most common file: straight into its row. Anything
            # else, or anything libpng refuses, takes the general path and its messages.
            if data[12:26] == _KAGGLE_IHDR and data[:8] == _PNG and len(data) < _MAX_FAST_BYTES:
                try:
                    png_decode(data, out=out[i])
                    ok[i] = True
                    continue
                except Exception:  # decided again below, with the reason
                    pass
            out[i], hows[i] = _decode_bytes(p, data, PATCH_SIZE)
            ok[i] = True
        except Exception as e:  # any decoder failure is a skipped patch, reported by the caller
            reasons[i] = f"{type(e).__name__}: {e}"
    return ok, hows, reasons


def default_workers() -> int:
    return min(usable_cpus(), 8)


def decode_files(
    paths: list[str],
    out: np.ndarray | None = None,
    workers: int | None = None,
    desc: str = "decoding patches",
) -> PatchArray:
    """Decode ``paths`` on ``workers`` threads (default: the cores) into ``out`` (allocated
    if None)."""
    n = len(paths)
    images = np.empty((n, PATCH_SIZE, PATCH_SIZE, 3), np.uint8) if out is None else out
    result = PatchArray(images=images, ok=np.zeros(n, dtype=bool))
    starts = range(0, n, _CHUNK)

    def chunk(start: int):
        part = np.empty((min(_CHUNK, n - start), PATCH_SIZE, PATCH_SIZE, 3), np.uint8)
        return start, part, *decode_into(paths[start : start + _CHUNK], part)

    with (
        progress_bar(desc, total=n) as advance,
        ThreadPoolExecutor(workers or default_workers()) as pool,
    ):
        for start, part, good, hows, reasons in pool.map(chunk, starts):
            images[start : start + len(part)] = part  # in order: a memory map fills sequentially
            result.ok[start : start + len(part)] = good
            result.n_padded += hows.count("padded")
            result.n_resized += hows.count("resized")
            result.errors += [(paths[start + i], r) for i, r in enumerate(reasons) if not good[i]]
            advance(len(part))
    for p, reason in result.errors[:10]:
        logger.warning("skipped %s: %s", p, reason)
    return result
