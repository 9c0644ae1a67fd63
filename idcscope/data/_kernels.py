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


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=True)
def patch_statistics(images, lut, lags, tissue_od, out):  # pragma: no cover - compiled
    """Sums the input check (``data.inputcheck``) turns into its features, one row of
    ``out`` per uint8 patch of ``images`` (N, H, W, 3), in a few passes over each patch:

    0 tissue pixels (summed optical density above ``tissue_od``); 1-3 their OD per
    channel; 4-6 every pixel's OD per channel; 7, 8 the sum and squares of blue minus red
    OD (haematoxylin against eosin) over tissue; 9, 10 the sum and squares of summed OD
    ``g``; 11, 12 the squares and fourth powers of ``g``'s differences across and down;
    13 the squares of its 4-neighbour Laplacian; 14-17 pixels darker than the tissue's mean
    (count, OD per channel) and 18-21 the lighter ones; 22, 23 the sum and squares of blue
    minus red over every pixel; then per lag of ``lags`` the squared differences of ``g``
    that far apart across and down, and the same of blue minus red.
    """
    _, h, w, _ = images.shape
    od = np.empty((3, h, w), np.float32)
    g = np.empty((h, w), np.float32)
    c = np.empty((h, w), np.float32)
    for q in range(images.shape[0]):
        for y in range(h):
            for x in range(w):
                for ch in range(3):
                    od[ch, y, x] = lut[images[q, y, x, ch]]
        _colour_sums(od, tissue_od, g, c, out[q])
        _texture_sums(g, c, lags, out[q])


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=True)
def _colour_sums(od, tissue_od, g, c, s):  # pragma: no cover - compiled
    """``patch_statistics``' sums 0-10, 14-23; fills ``g`` and ``c`` (blue minus red)."""
    _, h, w = od.shape
    s[:] = 0.0
    for y in range(h):
        for x in range(w):
            r, gg, b = od[0, y, x], od[1, y, x], od[2, y, x]
            t = r + gg + b
            g[y, x] = t
            c[y, x] = b - r
            s[4] += r
            s[5] += gg
            s[6] += b
            s[9] += t
            s[10] += t * t
            s[22] += b - r
            s[23] += (b - r) * (b - r)
            m = 1.0 if t > tissue_od else 0.0
            s[0] += m
            s[1] += m * r
            s[2] += m * gg
            s[3] += m * b
            s[7] += m * (b - r)
            s[8] += m * (b - r) * (b - r)
    mean = s[9] / (h * w) if s[0] == 0 else (s[1] + s[2] + s[3]) / s[0]
    for y in range(h):
        for x in range(w):
            t = g[y, x]
            m = 1.0 if t > tissue_od else 0.0
            k = 14 if t > mean else 18
            s[k] += m
            for ch in range(3):
                s[k + 1 + ch] += m * od[ch, y, x]


@numba.njit(cache=True, nogil=True, boundscheck=False, fastmath=True)
def _texture_sums(g, c, lags, s):  # pragma: no cover - compiled
    """``patch_statistics``' sums 11-13 and its variograms, from ``g`` and ``c``."""
    h, w = g.shape
    nl = lags.shape[0]
    d2 = d4 = lap2 = 0.0
    for y in range(h):
        for x in range(w - 1):
            d = g[y, x + 1] - g[y, x]
            d2 += d * d
            d4 += d * d * d * d
    for y in range(h - 1):
        for x in range(w):
            d = g[y + 1, x] - g[y, x]
            d2 += d * d
            d4 += d * d * d * d
    for y in range(1, h - 1):
        for x in range(1, w - 1):
            lap = 4 * g[y, x] - g[y - 1, x] - g[y + 1, x] - g[y, x - 1] - g[y, x + 1]
            lap2 += lap * lap
    s[11], s[12], s[13] = d2, d4, lap2
    for i in range(nl):
        lag = lags[i]
        vg = vc = 0.0
        for y in range(h):
            for x in range(w - lag):
                d = g[y, x + lag] - g[y, x]
                e = c[y, x + lag] - c[y, x]
                vg += d * d
                vc += e * e
        for y in range(h - lag):
            for x in range(w):
                d = g[y + lag, x] - g[y, x]
                e = c[y + lag, x] - c[y, x]
                vg += d * d
                vc += e * e
        s[24 + i] = vg
        s[24 + nl + i] = vc
