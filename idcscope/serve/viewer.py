"""Deep Zoom for the page's slide viewer: a slide's own pyramid as JPEG tiles, and the
model's P(IDC) over it as PNG tiles with alpha, in the same Deep Zoom geometry.

The slide's tiles come from ``openslide.deepzoom.DeepZoomGenerator`` (``NAME.dzi`` and
``NAME_files/{level}/{col}_{row}.jpeg``, as openslide-python's deepzoom server serves
them), read from the level of the slide's pyramid nearest each Deep Zoom level. Each tile
is encoded once and kept in a least-recently-used cache bounded in bytes, one per open
slide. The overlay's tiles are drawn from the scored tile grid (``TileLayers``) in the
level-0 coordinates the slide's tiles use (no ``limit_bounds``), so the two line up at
every zoom: P(IDC) in the colour map of the heatmaps (``spatial.figures.CMAP``), the
tiles called uncertain grey and hatched, or the tissue mask. A tile or level out of range
is ``TileNotFound`` (the app answers 404).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import IdcscopeError

TILE_SIZE = 254  # with the overlap, 256-px tiles: openslide's deepzoom default
OVERLAP = 1
JPEG_QUALITY = 80
CACHE_BYTES = 64 * 1024 * 1024  # encoded tiles kept per open slide
LAYERS = ("prob", "tissue")
HATCH = 8  # screen pixels per stripe period of the uncertain hatching
TISSUE_RGBA = (0, 170, 200, 110)


class TileNotFound(IdcscopeError):
    """A Deep Zoom level or tile address outside the slide (answered with 404)."""


class TileCache:
    """Encoded tiles, least recently used out first, at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int = CACHE_BYTES):
        self.max_bytes, self.bytes = max_bytes, 0
        self._tiles: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, make) -> bytes:
        """The tile ``key``, made by ``make()`` (outside the lock) when not cached."""
        with self._lock:
            data = self._tiles.get(key)
            if data is not None:
                self._tiles.move_to_end(key)
                return data
        data = make()
        with self._lock:
            if key not in self._tiles:
                self._tiles[key] = data
                self.bytes += len(data)
            while self.bytes > self.max_bytes and len(self._tiles) > 1:
                self.bytes -= len(self._tiles.popitem(last=False)[1])
        return data

    def clear(self) -> None:
        with self._lock:
            self._tiles.clear()
            self.bytes = 0


class ZoomedSlide:
    """One open slide and its Deep Zoom generator and tile cache.

    Args:
        path: The slide file.
        name: What the client calls it (errors name it so, never by its server path).
    """

    def __init__(self, path: str | Path, name: str):
        from openslide.deepzoom import DeepZoomGenerator

        from ..spatial.wsi import open_slide

        self.path, self.name = Path(path), name
        try:
            self.slide = open_slide(self.path)
        except IdcscopeError as e:
            raise type(e)(str(e).replace(str(self.path), name)) from e
        self.dz = DeepZoomGenerator(self.slide, TILE_SIZE, OVERLAP, limit_bounds=False)
        self.cache = TileCache()

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 width and height in pixels."""
        return self.slide.dimensions

    def mpp(self) -> float | None:
        """µm per level-0 pixel as the file records it; None when it does not."""
        try:
            mpp = float(self.slide.properties.get("openslide.mpp-x", "nan"))
        except ValueError:
            return None
        return mpp if mpp > 0 else None

    def dzi(self) -> str:
        return self.dz.get_dzi("jpeg")

    def check(self, level: int, col: int, row: int) -> None:
        """Raises TileNotFound unless ``(col, row)`` is a tile of Deep Zoom ``level``."""
        if not 0 <= level < self.dz.level_count:
            raise TileNotFound(f"{self.name}: no Deep Zoom level {level}")
        cols, rows = self.dz.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileNotFound(f"{self.name}: no tile {col}_{row} at level {level}")

    def tile(self, level: int, col: int, row: int) -> bytes:
        """The JPEG of one Deep Zoom tile, encoded once."""
        self.check(level, col, row)

        def encode() -> bytes:
            image = self.dz.get_tile(level, (col, row)).convert("RGB")
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=JPEG_QUALITY)
            return buf.getvalue()

        return self.cache.get(("slide", level, col, row), encode)

    def tile_box(self, level: int, col: int, row: int) -> tuple[float, float, int, int, float]:
        """Where a tile lies: its top-left corner in level-0 pixels, its size in pixels of
        Deep Zoom ``level`` and level-0 pixels per such pixel (as ``DeepZoomGenerator``
        cuts it: ``OVERLAP`` pixels more on each side that has a neighbour)."""
        self.check(level, col, row)
        cols, rows = self.dz.level_tiles[level]
        w, h = self.dz.level_dimensions[level]
        scale = 2.0 ** (self.dz.level_count - 1 - level)
        x0 = col * TILE_SIZE - (OVERLAP if col else 0)
        y0 = row * TILE_SIZE - (OVERLAP if row else 0)
        x1 = min(w, (col + 1) * TILE_SIZE) + (OVERLAP if col < cols - 1 else 0)
        y1 = min(h, (row + 1) * TILE_SIZE) + (OVERLAP if row < rows - 1 else 0)
        return x0 * scale, y0 * scale, x1 - x0, y1 - y0, scale

    def close(self) -> None:
        self.cache.clear()
        self.slide.close()


@dataclass
class TileLayers:
    """The scored tile grid, as the overlay draws it.

    ``prob`` holds P(IDC) per grid cell (NaN: not scored), ``call`` the call code per cell
    (1, 0, -1 uncertain; NaN: not scored), ``tissue`` whether a cell is tissue (scored,
    or to be), ``tile`` the cell's side in level-0 pixels.
    """

    prob: np.ndarray
    call: np.ndarray
    tissue: np.ndarray
    tile: float


def _cells(origin: float, n: int, scale: float, cell: float, limit: int) -> np.ndarray:
    """The grid cell under the centre of each of ``n`` screen pixels (-1: off the grid)."""
    index = np.floor((origin + (np.arange(n) + 0.5) * scale) / cell).astype(np.int64)
    return np.where(index < limit, index, -1)


def overlay_rgba(
    layers: TileLayers | None, box: tuple, layer: str = "prob", threshold: float = 0.0
) -> np.ndarray:
    """One overlay tile as RGBA uint8 (h, w, 4).

    Args:
        layers: The scored grid; None: a transparent tile.
        box: ``ZoomedSlide.tile_box`` of the tile.
        layer: ``prob``: P(IDC) at or above ``threshold`` in the heatmaps' colour map, the
            tiles called uncertain grey with white stripes whatever their P(IDC);
            ``tissue``: the tissue cells tinted.
    """
    from matplotlib import colormaps

    from ..spatial.figures import CMAP, UNCERTAIN

    x0, y0, w, h, scale = box
    if layers is None:  # not read yet: nothing to show
        return np.zeros((h, w, 4), np.uint8)
    rows, cols = layers.prob.shape
    r = _cells(y0, h, scale, layers.tile, rows)[:, None]
    c = _cells(x0, w, scale, layers.tile, cols)[None, :]
    on = (r >= 0) & (c >= 0)
    r, c = np.where(on, r, 0), np.where(on, c, 0)
    rgba = np.zeros((h, w, 4), np.uint8)
    if layer == "tissue":
        rgba[on & layers.tissue[r, c]] = TISSUE_RGBA
        return rgba
    prob, call = layers.prob[r, c], layers.call[r, c]
    scored = on & ~np.isnan(prob)
    shown = scored & (prob >= threshold) & (call != -1)
    rgba[shown] = (colormaps[CMAP](prob[shown]) * 255).astype(np.uint8)
    uncertain = scored & (call == -1)
    grey = np.round(np.asarray(UNCERTAIN["fill"]) * 255).astype(np.uint8)
    # Stripes fixed to the screen, as a printed hatch: one in four pixels along x + y.
    ys, xs = np.mgrid[0:h, 0:w]
    stripe = ((xs + ys + round(x0 / scale) + round(y0 / scale)) % HATCH) < 2
    rgba[uncertain & ~stripe] = grey
    rgba[uncertain & stripe] = (255, 255, 255, 220)
    return rgba


def png_bytes(rgba: np.ndarray) -> bytes:
    """RGBA as a PNG, quickly compressed: tiles are made while a person waits."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def colour_bar(width: int = 256, height: int = 12) -> bytes:
    """The overlay's colour map from P(IDC) 0 (left) to 1 (right), as a PNG."""
    from matplotlib import colormaps

    from ..spatial.figures import CMAP

    row = (colormaps[CMAP](np.linspace(0, 1, width)) * 255).astype(np.uint8)
    return png_bytes(np.ascontiguousarray(np.repeat(row[None], height, axis=0)))
