"""Compiled loops for the per-pixel work numpy does badly (numba; compiled once, cached on disk).

Imported only where used, so the command line starts without compiling anything.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True, boundscheck=False)
def block_average(planes, nb, k, src, dst, channels, rounding):  # pragma: no cover - compiled
    """For each patch q, planes[q, dst:dst + channels] = its k x k block of patches (rows
    ``nb[q]``, -1 for glass), averaged over k x k pixels; ``rounding[s]`` is the mean of a
    sum ``s``.

    Per output row it adds the k block rows of the k tiles across (contiguous, vectorised
    adds), then sums groups of k columns; numpy needs ten passes and a transpose for the
    same and runs about 15x slower.
    """
    _, _, h, w = planes.shape
    acc = np.empty(k * w, np.uint16)
    glass = np.full(w, 255, np.uint8)
    for q in range(nb.shape[0]):
        for ch in range(channels):
            for i in range(h):
                acc[:] = 0
                for a in range(k):
                    r = k * i + a
                    ty = r // h
                    rr = r - ty * h
                    for tx in range(k):
                        j0 = nb[q, ty * k + tx]
                        row = glass if j0 < 0 else planes[j0, src + ch, rr]
                        base = tx * w
                        for x in range(w):
                            acc[base + x] += row[x]
                out = planes[q, dst + ch, i]
                if k == 3:  # the 3x3 block: an unrolled sum
                    for j in range(w):
                        out[j] = rounding[acc[3 * j] + acc[3 * j + 1] + acc[3 * j + 2]]
                else:
                    for j in range(w):
                        s = 0
                        for b in range(k):
                            s += acc[k * j + b]
                        out[j] = rounding[s]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def pack_colours(images):  # pragma: no cover - compiled
    """uint8 (..., 3) images -> one uint32 per pixel, r | g << 8 | b << 16 (one pass; numpy
    needs eight over strided channels)."""
    flat = images.reshape(-1)
    out = np.empty(flat.size // 3, np.uint32)
    for i in range(out.size):
        out[i] = (
            np.uint32(flat[3 * i])
            | (np.uint32(flat[3 * i + 1]) << np.uint32(8))
            | (np.uint32(flat[3 * i + 2]) << np.uint32(16))
        )
    return out


@numba.njit(cache=True, nogil=True, boundscheck=False)
def unpack_to_planes(table, keys, planes):  # pragma: no cover - compiled
    """planes[n, c, y, x] = byte c of ``table[keys[pixel]]``, pixels in (n, y, x) order:
    a colour map applied and written in the model's layout in one pass."""
    n, _, h, w = planes.shape
    i = 0
    for q in range(n):
        for y in range(h):
            for x in range(w):
                v = table[keys[i]]
                planes[q, 0, y, x] = v & 255
                planes[q, 1, y, x] = (v >> 8) & 255
                planes[q, 2, y, x] = (v >> 16) & 255
                i += 1
