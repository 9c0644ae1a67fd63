"""Slide-level stain normalisation: Reinhard (colour statistics) and Macenko (stain vectors).

A normaliser is fitted on the pooled tissue pixels of one patient (or one patch) and maps
its patches from the fitted *source* statistics onto a *target* (the reference, fitted on
training patients); both are plain floats and lists, stored in checkpoints. A patient has
far fewer distinct colours (5-15% of its pixels here) than pixels, so maps are evaluated once
per distinct colour and scattered back (exact, several times faster), and fits weigh colours
by their counts (all pixels' statistics, in any patch order). Glass and black are kept.

Why not ``torchstain`` (1.4.1), measured on the 848 patches of sample patient 10254: its
Reinhard normaliser fits on every pixel of an image, glass included, and moves white glass
by up to 24 grey levels (this one leaves it at 255); and it takes 8x as long, whether the
patient is given as one image (661 ms) or patch by patch (663 ms), against 82 ms here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import ClassVar

import numpy as np

from ..errors import IdcscopeError
from ..progress import progress_bar

logger = logging.getLogger(__name__)

# Optical density is -log((I + 1) / 256): 0 for white, finite (5.5) for black.
_LOG256 = math.log(256.0)
# OD norm of tissue; glass peaks at 0.08-0.12 in the Kaggle patches and ends near 0.17.
TISSUE_OD = 0.2
GLASS_OD = 0.1  # below this the map gets no weight
BLACK_OD = -math.log(26 / 256)  # every channel <= 25: padding or pen, not stain
MIN_TISSUE_PIXELS = 100
_MAX_SCALE = 5.0  # Reinhard std ratio bound: a near-uniform patient must not explode
_MAX_CONC = 10.0  # Macenko concentration bound: OD 10 is already black
# Up to this many pixels (64 patches) numpy packs and unpacks as fast as the compiled
# loops, and scoring a few patches skips importing numba and starting its compiler (a
# second or more of a command that takes two).
SMALL_PIXELS = 64 * 50 * 50

# Reinhard et al. 2001: RGB -> LMS, then log LMS -> l-alpha-beta (Ruderman et al. 1998);
# the statistics use log10 as in the paper, the code the natural log (hence / ln 10).
RGB_TO_LMS = np.array(
    [[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]]
)
LMS_TO_RGB = np.linalg.inv(RGB_TO_LMS)
_TO_LAB = np.array([[1, 1, 1], [1, 1, -2], [1, -1, 0]]) / np.sqrt([[3], [6], [2]]) / math.log(10)
_FROM_LAB = np.linalg.inv(_TO_LAB)

# Built-in references: fit_reference(..., patients=...) on the 14-patient Kaggle sample.
_DEFAULT_TARGETS = {
    "reinhard": {"mean": [-0.3561, -0.0264, 0.0183], "std": [0.1845, 0.0307, 0.0095]},
    "macenko": {
        "stain_matrix": [[0.5561, 0.7218, 0.4120], [0.1639, 0.8364, 0.5231]],
        "max_conc": [1.6218, 1.1782],
    },
}


def _od(f: np.ndarray) -> np.ndarray:
    return np.float32(_LOG256) - np.log(f + np.float32(1))


def tissue_mask(rgb: np.ndarray, threshold: float = TISSUE_OD) -> np.ndarray:
    """Boolean mask (``rgb.shape[:-1]``) of tissue: OD norm above ``threshold``, not black.

    Args:
        rgb: image(s) (..., 3), uint8 or float in [0, 1].
        threshold: optical-density norm (natural log) separating glass from tissue.
    """
    x = np.asarray(rgb)
    if x.shape[-1:] != (3,):
        raise ValueError(f"expected RGB in the last axis, got shape {x.shape}")
    # float32 like the normalisers, so both agree on every colour.
    f = np.float32(255) * x if np.issubdtype(x.dtype, np.floating) else x
    od = _od(np.clip(f, 0, 255).astype(np.float32))
    return (np.sqrt((od * od).sum(-1)) > threshold) & (od.min(-1) < BLACK_OD)


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[-1:] != (3,):
        raise ValueError(f"expected uint8 RGB (..., 3), got {images.dtype} {images.shape}")
    return images


class _Colours:
    """Distinct colours of uint8 images: counts, (3, n) ``rgb`` and ``od``, tissue, black."""

    def __init__(self, images: np.ndarray):
        self.key, self.shape = _pack_colours(np.ascontiguousarray(images)), images.shape
        s = np.sort(self.key)
        first = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]])) if s.size else s
        self.uniq, self.counts = s[first], np.diff(first, append=s.size).astype(np.float64)
        self.rgb = self.uniq.view(np.uint8).reshape(-1, 4)[:, :3].T.astype(np.float32)
        self.od = _od(self.rgb)
        self.od_norm = np.sqrt(np.einsum("ij,ij->j", self.od, self.od))
        # Row by row: numpy's min over the short axis is 15x slower.
        self.black = np.minimum(np.minimum(self.od[0], self.od[1]), self.od[2]) >= BLACK_OD
        self.tissue = (self.od_norm > TISSUE_OD) & ~self.black

    @cached_property
    def log_lms(self) -> np.ndarray:
        """(3, n) natural log of the LMS cone responses (Reinhard's colour space)."""
        lms = (RGB_TO_LMS / 255).astype(np.float32) @ self.rgb
        return np.log(np.maximum(lms, 1e-4, out=lms), out=lms)

    def expand(
        self, mapped: np.ndarray, table: np.ndarray | None = None, planes: np.ndarray | None = None
    ) -> np.ndarray:
        """uint8 images after a colour map, blended in by tissue weight; mapped is (3, n).

        With ``planes`` (uint8 (N, C, H, W), C >= 3, for images (N, H, W, 3)) the result
        goes to planes 0..2 instead, and ``planes`` is returned.
        """
        w = np.clip((self.od_norm - GLASS_OD) / (TISSUE_OD - GLASS_OD), 0, 1) * ~self.black
        packed = np.zeros((self.uniq.size, 4), np.uint8)
        packed[:, :3] = np.rint(self.rgb + w * (np.clip(mapped, 0, 255) - self.rgb)).T
        values = packed.view(np.uint32).ravel()
        if table is None and self.key.size < 1 << 16:
            table, keys = values, np.searchsorted(self.uniq, self.key)
        else:
            # Beats binary search on large inputs; stale entries are never read, so one table
            # serves many calls (its pages are touched once).
            table = np.empty(1 << 24, np.uint32) if table is None else table
            table[self.uniq], keys = values, self.key
        if planes is None:
            return table[keys].view(np.uint8).reshape(-1, 4)[:, :3].reshape(self.shape)
        if keys.size > SMALL_PIXELS:
            from ._kernels import unpack_to_planes

            unpack_to_planes(table, keys, planes)
        else:
            v = table[keys].reshape(len(planes), *planes.shape[2:])
            for c in range(3):
                planes[:, c] = (v >> np.uint32(8 * c)) & np.uint32(255)
        return planes


def _pack_colours(images: np.ndarray) -> np.ndarray:
    """One uint32 per pixel of uint8 (..., 3) images: r | g << 8 | b << 16."""
    if images.size // 3 > SMALL_PIXELS:
        from ._kernels import pack_colours

        return pack_colours(images)
    rgb = images.reshape(-1, 3).astype(np.uint32)
    return rgb[:, 0] | rgb[:, 1] << np.uint32(8) | rgb[:, 2] << np.uint32(16)


def _weighted_percentile(values: np.ndarray, weights: np.ndarray, q: list[float]) -> np.ndarray:
    """Percentiles of values repeated by weights (np.percentile's inverted CDF method)."""
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    idx = np.searchsorted(cum, np.asarray(q) / 100 * cum[-1], side="left")
    return values[order][np.minimum(idx, values.size - 1)]


class StainNormalizer:
    """The identity ("none"); subclasses map fitted source statistics onto a target.

    Attributes:
        target: reference statistics (plain floats and lists).
        source: statistics fitted by `fit`, None before.
        fell_back: whether the last fit found too little tissue and used the target instead.
    """

    name = "none"
    fields: ClassVar[dict[str, tuple[int, ...]]] = {}  # statistics and their shapes
    positive: tuple[str, ...] = ()

    def __init__(self, target: dict | None = None):
        target = _DEFAULT_TARGETS.get(self.name, {}) if target is None else target
        self.target, self.source, self.fell_back = self._validated(target), None, False

    def _validated(self, stats: dict) -> dict:
        out = {k: np.asarray(stats[k], dtype=np.float64) for k in self.fields}
        for k, v in out.items():
            if v.shape != self.fields[k] or not np.isfinite(v).all():
                raise ValueError(f"{self.name} {k} must be finite {self.fields[k]}: {stats[k]!r}")
            if k in self.positive and v.min() <= 0:
                raise ValueError(f"{self.name} {k} must be positive: {stats[k]!r}")
        return {k: v.tolist() for k, v in out.items()}

    def fit(self, images: np.ndarray) -> StainNormalizer:
        """Fits the source statistics on the tissue pixels of all ``images`` pooled."""
        self.source = self._fit_tissue(_Colours(_check_images(images)))
        return self

    def transform(self, images: np.ndarray) -> np.ndarray:
        """Maps uint8 (..., 3) images from the fitted source onto the target; uint8 out."""
        images = _check_images(images)
        if self.source is None and self.fields:
            raise IdcscopeError(f"{self.name} stain normaliser used before fit")
        return self._apply(_Colours(images))

    def fit_transform(
        self, images: np.ndarray, _table: np.ndarray | None = None, planes: np.ndarray | None = None
    ) -> np.ndarray:
        """`fit` then `transform` on the same images, sharing the colour analysis (into
        ``planes``, the model's layout, when given: see ``_Colours.expand``)."""
        colours = _Colours(_check_images(images))
        self.source = self._fit_tissue(colours)
        return self._apply(colours, _table, planes)

    def state_dict(self) -> dict:
        """Target (and fitted source) statistics as ``target_*`` / ``source_*`` lists."""
        state = {f"target_{k}": v for k, v in self.target.items()}
        return state | {f"source_{k}": v for k, v in (self.source or {}).items()}

    def load_state_dict(self, state: dict) -> None:
        """Restores `state_dict` output; without ``source_*`` keys the normaliser is unfitted."""
        if missing := [f"target_{k}" for k in self.fields if f"target_{k}" not in state]:
            raise ValueError(f"{self.name} stain state lacks {missing}")
        self.target = self._validated({k: state[f"target_{k}"] for k in self.fields})
        fitted = self.fields and all(f"source_{k}" in state for k in self.fields)
        source = {k: state[f"source_{k}"] for k in self.fields} if fitted else None
        self.source = None if source is None else self._validated(source)

    def _fit_tissue(self, colours: _Colours) -> dict:
        n = colours.counts[colours.tissue].sum()
        stats = self._fit(colours) if n >= MIN_TISSUE_PIXELS or not self.fields else None
        self.fell_back = stats is None
        if self.fell_back:
            logger.debug("%s stain fit: %d tissue pixels, using the reference", self.name, n)
        return dict(self.target) if stats is None else stats

    def _fit(self, colours: _Colours) -> dict | None:
        """Source statistics of the distinct colours (enough are tissue); None if unusable."""
        return {}

    def _map(self, colours: _Colours) -> np.ndarray:
        """New (3, n) intensities of the distinct colours."""
        return colours.rgb

    def _apply(self, colours: _Colours, table=None, planes=None) -> np.ndarray:
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            mapped = np.nan_to_num(self._map(colours), nan=0.0, posinf=255.0, neginf=0.0)
        return colours.expand(mapped, table, planes)


class ReinhardNormalizer(StainNormalizer):
    """Reinhard et al. 2001: per-channel mean and std of tissue in l-alpha-beta."""

    name = "reinhard"
    fields: ClassVar = {"mean": (3,), "std": (3,)}
    positive = ("std",)

    def _fit(self, colours: _Colours) -> dict:
        w = colours.counts[colours.tissue]
        lab = _TO_LAB @ colours.log_lms[:, colours.tissue]
        mean = lab @ w / w.sum()
        std = np.sqrt(((lab - mean[:, None]) ** 2) @ w / w.sum())
        return {"mean": mean.tolist(), "std": np.maximum(std, 1e-6).tolist()}

    def _map(self, colours: _Colours) -> np.ndarray:
        mu_s, sd_s = np.asarray(self.source["mean"]), np.asarray(self.source["std"])
        mu_t, sd_t = np.asarray(self.target["mean"]), np.asarray(self.target["std"])
        scale = np.clip(sd_t / sd_s, 1 / _MAX_SCALE, _MAX_SCALE)
        a, b = lab_affine(scale, mu_t - scale * mu_s)  # lab' = scale (lab - mu_s) + mu_t
        z = a.astype(np.float32) @ colours.log_lms
        z += b.astype(np.float32)[:, None]
        z = np.exp(np.clip(z, -30, 30, out=z), out=z)
        return (LMS_TO_RGB * 255).astype(np.float32) @ z


def lab_affine(scale: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``lab' = scale * lab + offset`` (per l-alpha-beta channel) as one affine map of log LMS.

    Batched over leading axes: ``scale`` and ``offset`` (..., 3) give ``a`` (..., 3, 3) and
    ``b`` (..., 3), with ``log_lms' = a @ log_lms + b``.
    """
    scale, offset = np.asarray(scale, np.float64), np.asarray(offset, np.float64)
    a = _FROM_LAB @ (scale[..., :, None] * _TO_LAB)
    return a, np.einsum("ij,...j->...i", _FROM_LAB, offset)


class MacenkoNormalizer(StainNormalizer):
    """Macenko et al. 2009: H&E stain vectors and 99th-percentile concentrations.

    Stain vectors are the 1st and 99th percentile angles of tissue optical densities in the
    plane of their two main eigenvectors; haematoxylin, which absorbs red light more than
    eosin, is the one with the larger red density and comes first.
    """

    name = "macenko"
    fields: ClassVar = {"stain_matrix": (2, 3), "max_conc": (2,)}
    positive = ("max_conc",)

    def _validated(self, stats: dict) -> dict:
        out = super()._validated(stats)
        norms = np.linalg.norm(out["stain_matrix"], axis=1, keepdims=True)
        if norms.min() < 1e-6:
            raise ValueError(f"macenko stain_matrix has an empty stain: {out['stain_matrix']}")
        return out | {"stain_matrix": (out["stain_matrix"] / norms).tolist()}

    def _fit(self, colours: _Colours) -> dict | None:
        od, w = colours.od[:, colours.tissue].astype(np.float64), colours.counts[colours.tissue]
        if (he := _stain_vectors(od, w)) is None:
            return None
        conc = np.linalg.pinv(he).T @ od
        max_c = np.array([_weighted_percentile(c, w, [99])[0] for c in conc])
        ok = max_c.min() > 1e-3
        return {"stain_matrix": he.tolist(), "max_conc": max_c.tolist()} if ok else None

    def _map(self, colours: _Colours) -> np.ndarray:
        he_s, he_t = (np.asarray(d["stain_matrix"]) for d in (self.source, self.target))
        ratio = np.asarray(self.target["max_conc"]) / np.asarray(self.source["max_conc"])
        to_conc = (np.linalg.pinv(he_s).T * ratio[:, None]).astype(np.float32)
        conc = np.clip(to_conc @ colours.od, 0, _MAX_CONC)
        return 256 * np.exp(-(he_t.T.astype(np.float32) @ conc)) - 1


def _stain_vectors(od: np.ndarray, w: np.ndarray) -> np.ndarray | None:
    """(2, 3) unit H and E vectors from (3, n) tissue densities; None when degenerate."""
    centred = od - (od @ w / w.sum())[:, None]
    vals, vecs = np.linalg.eigh((centred * w) @ centred.T / w.sum())
    if not np.isfinite(vals).all() or vals[1] <= 1e-10:
        return None  # one colour (or none): no plane to find two stains in
    plane = vecs[:, [2, 1]]
    plane[:, 0] *= np.sign(plane[:, 0].sum()) or 1.0
    proj = plane.T @ od
    lo, hi = _weighted_percentile(np.arctan2(proj[1], proj[0]), w, [1, 99])
    v = np.stack([np.cos([lo, hi]), np.sin([lo, hi])], axis=1) @ plane.T
    v = np.clip(v * np.sign(v.sum(1, keepdims=True)), 0, None)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    if norms.min() < 1e-6 or (v[0] @ v[1]) / (norms[0, 0] * norms[1, 0]) > 0.99:
        return None  # a single stain direction
    v /= norms
    return v if v[0, 0] >= v[1, 0] else v[::-1].copy()


_NORMALIZERS = {n.name: n for n in (StainNormalizer, ReinhardNormalizer, MacenkoNormalizer)}


def list_normalizers() -> list[str]:
    return sorted(_NORMALIZERS)


def create_normalizer(name: str = "none", state: dict | None = None) -> StainNormalizer:
    """Builds a stain normaliser by name, with the built-in reference or ``state``'s.

    Args:
        name: "none", "reinhard" or "macenko".
        state: a `state_dict` or `fit_reference` output; the built-in reference when None.
    """
    if name not in _NORMALIZERS:
        raise ValueError(f"unknown stain normaliser {name!r}; choose from {list_normalizers()}")
    norm = _NORMALIZERS[name]()
    if state:
        norm.load_state_dict(state)
    return norm


def _patient_rows(patients: np.ndarray) -> list[np.ndarray]:
    """Row indices of each patient (sorted by id), ascending within a patient."""
    _, inv = np.unique(patients, return_inverse=True)
    return np.split(np.argsort(inv, kind="stable"), np.cumsum(np.bincount(inv))[:-1])


def fit_reference(images: np.ndarray, name: str, patients: np.ndarray | None = None) -> dict:
    """Reference (target) statistics fitted on training patches, as a state dict.

    With ``patients``, each patient is fitted alone and the median taken: pooling slides
    would add the spread between slides to the Reinhard stds, giving a reference with more
    contrast than any real slide. Patients without enough tissue are left out.

    Args:
        images: uint8 (N, H, W, 3) training patches.
        name: normaliser name.
        patients: patient id of each patch; None pools all patches.

    Returns:
        ``target_*`` entries, for `create_normalizer` and `normalize_per_patient`.
    """
    norm = create_normalizer(name)
    fits = patient_fits(images, name, patients)
    if fits:
        norm.target = norm._validated({k: np.median([f[k] for f in fits], 0) for k in norm.fields})
    else:
        logger.warning("%s reference: no tissue found; keeping the built-in reference", name)
    norm.source = None
    return norm.state_dict()


def patient_fits(images: np.ndarray, name: str, patients: np.ndarray | None = None) -> list:
    """Source statistics of each patient's pooled tissue (all ``images`` pooled without
    ``patients``); patients with too little tissue are left out."""
    norm = create_normalizer(name)
    groups = [slice(None)] if patients is None else _patient_rows(np.asarray(patients))
    return [norm.source for rows in groups if not norm.fit(images[rows]).fell_back]


def stain_spread(images: np.ndarray, patients: np.ndarray) -> dict | None:
    """How stain varies between patients, in Reinhard's l-alpha-beta statistics.

    Each patient's tissue mean and std are fitted (as the Reinhard normaliser fits them);
    the spread is the median mean (``centre``), the std of the means between patients
    (``shift``) and the std of their log stds (``log_scale``), per channel: what
    ``data.augment.stain_jitter`` draws from. None with fewer than 2 usable patients.
    """
    fits = patient_fits(images, "reinhard", patients)
    if len(fits) < 2:
        return None
    means = np.array([f["mean"] for f in fits])
    log_stds = np.log([f["std"] for f in fits])
    return {
        "centre": np.median(means, 0).tolist(),
        "shift": means.std(0, ddof=1).tolist(),
        "log_scale": log_stds.std(0, ddof=1).tolist(),
        "patients": len(fits),
    }


def normalize_per_patient(
    images: np.ndarray,
    patients: np.ndarray,
    normalizer_name: str,
    reference_state: dict | None = None,
    out: np.ndarray | None = None,
    workers: int | None = None,
    planes: np.ndarray | None = None,
) -> np.ndarray:
    """Fits one normaliser per patient, on all of its patches, and transforms them.

    Each patient's result depends only on its own patches (not on their order, nor on the
    other patients). Patients with too little tissue use the reference itself as source.

    Args:
        images: uint8 (N, H, W, 3) patches, e.g. a memory map.
        patients: patient id of each patch.
        normalizer_name: "none", "reinhard" or "macenko".
        reference_state: `fit_reference` output; the built-in reference when None.
        out: uint8 array to write into (may be ``images`` itself); a new one when None.
        workers: threads, each on whole patients; the cores (at most 8) when None.
        planes: instead of ``out``, a uint8 (N, C, H, W) array whose planes 0..2 receive
            the patches (the model's layout, ``data.preprocess``).

    Returns:
        The normalised patches (``out``, or ``planes`` when given).
    """
    images, patients = _check_images(images), np.asarray(patients).ravel()
    if patients.size != len(images):
        raise ValueError(f"{patients.size} patient ids for {len(images)} patches")
    n, h, w, _ = images.shape
    if planes is not None:
        if planes.shape[0] != n or planes.shape[2:] != (h, w) or planes.dtype != np.uint8:
            raise ValueError(f"planes must be uint8 ({n}, C, {h}, {w}), got {planes.shape}")
    else:
        out = np.empty_like(images) if out is None else out
        if out.shape != images.shape or out.dtype != np.uint8:
            raise ValueError(f"out must be uint8 {images.shape}, got {out.dtype} {out.shape}")
    target = out if planes is None else planes

    def write(sel, patches: np.ndarray) -> None:
        if planes is None:
            out[sel] = patches
        else:
            planes[sel, :3] = patches.transpose(0, 3, 1, 2)

    groups = _patient_rows(patients) if len(images) else []
    if not create_normalizer(normalizer_name, reference_state).fields or not len(images):
        for rows in groups:
            sel = _as_slice(rows)
            write(sel, np.asarray(images[sel]))
        return target
    workers = max(1, min(workers or os.cpu_count() or 1, 8, len(groups)))

    def run(my_groups: list[np.ndarray]) -> int:
        norm, fallbacks = create_normalizer(normalizer_name, reference_state), 0
        for rows in my_groups:
            sel = _as_slice(rows)
            if planes is None:
                out[sel] = norm.fit_transform(images[sel], _table=_lookup_table())
            elif isinstance(sel, slice):
                norm.fit_transform(images[sel], _lookup_table(), planes[sel])
            else:  # a fancy index gives a copy: fill it, then put it in place
                planes[sel] = norm.fit_transform(images[sel], _lookup_table(), planes[sel])
            fallbacks += norm.fell_back
            advance(len(rows))
        return fallbacks

    # numpy releases the GIL in sorts, ufuncs and gathers, so threads scale across cores.
    # A bar only for work a person waits on (training data), not for each batch scored.
    bar = progress_bar(f"stain ({normalizer_name})", len(images)) if len(images) > 10_000 else None
    with bar or contextlib.nullcontext(lambda n: None) as advance:
        if workers == 1:  # in the caller: a new thread would also need its own table
            fallbacks = run(groups)
        else:
            with ThreadPoolExecutor(workers) as pool:
                fallbacks = sum(pool.map(run, [groups[i::workers] for i in range(workers)]))
    logger.debug("%s stain: %d patients, %d fell back", normalizer_name, len(groups), fallbacks)
    return target


def _as_slice(rows: np.ndarray):
    """A contiguous range as a slice: read (a memory map sequentially) and written as one."""
    return slice(rows[0], rows[-1] + 1) if rows[-1] - rows[0] + 1 == len(rows) else rows


_TABLES = threading.local()


def _lookup_table() -> np.ndarray:
    """This thread's 2**24-entry colour table (see ``_Colours.expand``), made once: a new
    one for every patient would cost more page faults than the patient's whole map."""
    table = getattr(_TABLES, "table", None)
    if table is None:
        table = _TABLES.table = np.empty(1 << 24, np.uint32)
    return table
