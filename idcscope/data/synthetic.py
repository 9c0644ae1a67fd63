"""Deterministic synthetic H&E-like patches in the Kaggle breast-histopathology layout.

A stand-in for demos and tests, not a benchmark. Each patient is one small "slide": an
irregular tissue blob on a grid of 50-px cells, with one or more smooth IDC regions, rendered
as a whole in optical density (Beer-Lambert: haematoxylin and eosin absorb, the background
transmits) and cut into patches. Neighbouring patches therefore share tissue, tumour
boundaries run through patches, and the positive class is spatially clustered like on real
slides. The class signal is nuclear: tumour has denser, larger, irregular, darker nuclei.
What keeps it from being trivial: each patient has its own stain vectors and brightness,
lymphocyte aggregates give dense dark (but small, round) nuclei in negatives, tumour grade
varies between patients, boundary patches are partly tumour, and some labels are flipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.special import expit as _sigmoid

from . import PATCH_SIZE

logger = logging.getLogger(__name__)

PATCH = PATCH_SIZE
# Ruifrok & Johnston optical-density vectors (as in skimage.color.rgb2hed); eosin gets more
# blue absorption, closer to the purplish pink of the Kaggle scans.
_H = np.array([0.65, 0.70, 0.29])
_E = np.array([0.07, 0.99, 0.36])
_WIN = 15  # nucleus stamp window (px); the largest tumour nucleus fits inside


@dataclass(frozen=True)
class Stain:
    """One patient's staining and scanning.

    Attributes:
        haematoxylin: optical density per unit haematoxylin, RGB.
        eosin: optical density per unit eosin, RGB.
        white: transmitted background intensity per RGB channel (0-255).
    """

    haematoxylin: np.ndarray
    eosin: np.ndarray
    white: np.ndarray


@dataclass(frozen=True)
class Grade:
    """How a patient's tumour looks: density and size multipliers, stroma cellularity."""

    density: float = 1.0
    size: float = 1.0
    stroma: float = 1.0


def random_stain(rng: np.random.Generator) -> Stain:
    """Draws a patient's stain: perturbed H&E directions, stain amount and a tinted white."""

    def vec(base: np.ndarray, gain: float) -> np.ndarray:
        v = np.clip(base + rng.normal(0, 0.05, 3), 0.02, None)
        return v / np.linalg.norm(v) * gain

    thickness = rng.uniform(0.65, 1.45)  # thicker sections take up more of both dyes
    h = vec(_H, thickness * rng.uniform(0.8, 1.25))
    e = vec(_E, thickness * rng.uniform(0.8, 1.25))
    white = rng.uniform(215, 252) + rng.normal(0, 3, 3)
    return Stain(*(np.float32(v) for v in (h, e, np.clip(white, 200, 255))))


def random_grade(rng: np.random.Generator) -> Grade:
    """Draws a patient's tumour grade and stroma cellularity."""
    return Grade(rng.uniform(0.55, 1.3), rng.uniform(0.85, 1.2), rng.uniform(0.6, 1.6))


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, normalised to zero mean and unit variance."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-8)


def _upsample(f: np.ndarray, shape: tuple[int, int], step: int) -> np.ndarray:
    """Linearly interpolates samples `step` px apart to `shape`, one axis at a time.

    Much cheaper than ndimage.zoom or a wide Gaussian filter at full resolution: a gather
    for small steps, a matrix product (fast BLAS, small inner size) for large ones.
    """
    for axis, n in enumerate(shape):
        pos = np.arange(n, dtype=np.float32) / step
        i0 = pos.astype(int)
        w = pos - i0
        if step >= 4:
            a = np.zeros((n, f.shape[axis]), np.float32)
            a[np.arange(n), i0], a[np.arange(n), i0 + 1] = 1 - w, w
            f = a @ f if axis == 0 else f @ a.T
        else:
            w = w.reshape((-1, 1) if axis == 0 else (1, -1))
            f0, f1 = np.take(f, i0, axis), np.take(f, i0 + 1, axis)
            f = f0 + w * (f1 - f0)
    return f


def _field(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Smooth noise (about unit variance) with features about `scale` px across."""
    step = max(1, round(scale / 2.5))
    coarse = (shape[0] // step + 2, shape[1] // step + 2)
    return _upsample(_noise(rng, coarse, scale / step), shape, step)


def _nuclei(rng: np.random.Generator, tumour, lymph, grade: Grade):
    """Samples nuclei as an inhomogeneous Poisson process and stamps them.

    Returns:
        Haematoxylin density of the nuclei and their coverage, both HxW float32.
    """
    hh, ww = tumour.shape
    # Expected nuclei per pixel for each kind; a 50x50 patch has 2,500 px.
    rates = np.stack(
        [
            0.0022 * grade.stroma * (1 - tumour) * (1 - lymph),
            0.03 * lymph * (1 - tumour),
            0.012 * grade.density * tumour,
        ]
    )
    total = rates.sum(0)
    lam_max = float(total.max()) + 1e-9
    n = rng.poisson(lam_max * hh * ww)
    ys, xs = rng.uniform(0, hh, n), rng.uniform(0, ww, n)
    iy, ix = ys.astype(int), xs.astype(int)
    keep = rng.uniform(0, lam_max, n) < total[iy, ix]  # thinning
    ys, xs, iy, ix = ys[keep], xs[keep], iy[keep], ix[keep]
    n = len(ys)
    p = rates[:, iy, ix] / total[iy, ix]
    u = rng.uniform(size=n)
    kind = (u > p[0]).astype(int) + (u > p[0] + p[1])  # 0 stroma, 1 lymphocyte, 2 tumour

    # Semi-axes a and b, darkness, outline irregularity, for stroma (spindle fibroblasts),
    # lymphocytes (small, round, very dark) and tumour (large, pleomorphic, often vesicular,
    # so not simply the darkest).
    a = np.choose(kind, [rng.uniform(3, 5.5, n), rng.uniform(1.6, 2.4, n), rng.gamma(9, 0.36, n)])
    a[kind == 2] *= grade.size
    b = a * np.choose(
        kind, [rng.uniform(0.2, 0.4, n), rng.uniform(0.85, 1, n), rng.uniform(0.6, 1, n)]
    )
    dark = np.choose(
        kind, [rng.uniform(0.9, 1.3, n), rng.uniform(1.3, 1.8, n), rng.uniform(0.8, 1.6, n)]
    )
    irreg = np.choose(kind, [np.full(n, 0.05), np.full(n, 0.03), rng.uniform(0.05, 0.25, n)])
    a, b = np.minimum(a, _WIN / 2 - 0.5), np.minimum(b, _WIN / 2 - 0.5)
    a, b, dark, irreg = (np.float32(z) for z in (a, b, dark, irreg))

    off = np.arange(_WIN) - _WIN // 2
    cy, cx = np.floor(ys).astype(int), np.floor(xs).astype(int)
    dy = (off[None, :, None] + 0.5 - (ys - cy)[:, None, None]).astype(np.float32)
    dx = (off[None, None, :] + 0.5 - (xs - cx)[:, None, None]).astype(np.float32)
    th = rng.uniform(0, np.pi, n).astype(np.float32)[:, None, None]
    u = (dx * np.cos(th) + dy * np.sin(th)) / a[:, None, None]
    v = (-dx * np.sin(th) + dy * np.cos(th)) / b[:, None, None]
    rho = np.sqrt(u * u + v * v) + 1e-6
    u, v = u / rho, v / rho
    # Irregular outline 1 + e (cos(2t + p) + 0.7 cos(3t + q)), expanded to skip arctan2.
    p, q = (rng.uniform(0, 2 * np.pi, n).astype(np.float32)[:, None, None] for _ in "pq")
    e = irreg[:, None, None]
    edge = 1 + e * (np.cos(p) * (u * u - v * v) - np.sin(p) * 2 * u * v)
    edge += 0.7 * e * (np.cos(q) * u * (4 * u * u - 3) - np.sin(q) * v * (3 - 4 * v * v))
    alpha = np.clip((edge - rho) * np.minimum(a, b)[:, None, None] * 1.5, 0, 1)
    # Chromatin: tumour nuclei have a paler centre and a darker rim, plus speckle.
    rim = np.where(kind == 2, rng.uniform(0.0, 0.45, n), 0.1).astype(np.float32)[:, None, None]
    speck = 0.8 + 0.35 * rng.random(alpha.shape, dtype=np.float32)
    val = alpha * dark[:, None, None] * (1 - rim * np.clip(1 - rho, 0, 1)) * speck

    yy, xx = cy[:, None, None] + off[None, :, None], cx[:, None, None] + off[None, None, :]
    inside = (alpha > 0) & (yy >= 0) & (yy < hh) & (xx >= 0) & (xx < ww)
    flat = (yy * ww + xx)[inside]
    h = np.zeros(hh * ww, np.float32)
    cover = np.zeros(hh * ww, np.float32)
    np.maximum.at(h, flat, val[inside])
    np.maximum.at(cover, flat, alpha[inside])
    return h.reshape(hh, ww), cover.reshape(hh, ww)


def render_tissue(
    rng: np.random.Generator,
    tumour: np.ndarray,
    stain: Stain,
    tissue: np.ndarray | None = None,
    fat: np.ndarray | None = None,
    lymph: np.ndarray | None = None,
    grade: Grade | None = None,
) -> np.ndarray:
    """Renders a tissue region from per-pixel maps.

    Args:
        rng: source of all randomness.
        tumour: IDC membership in [0, 1], HxW.
        stain: the patient's stain.
        tissue: tissue (1) versus glass (0); all tissue when None.
        fat: adipose membership in [0, 1]; none when None.
        lymph: lymphocyte-aggregate membership in [0, 1]; none when None.
        grade: tumour look; average when None.

    Returns:
        uint8 HxWx3 RGB image.
    """
    shape = tumour.shape
    zeros = np.zeros(shape, np.float32)
    tissue = np.ones(shape, np.float32) if tissue is None else tissue
    fat = zeros if fat is None else fat
    lymph = zeros if lymph is None else lymph
    grade = grade or Grade()

    # Collagen fibres: anisotropic noise, orientation blended by a smooth field.
    noise = rng.standard_normal(shape, dtype=np.float32)
    fib_h = ndimage.gaussian_filter(noise, (0.8, 4.0))
    fib_v = ndimage.gaussian_filter(noise, (4.0, 0.8))
    w = _sigmoid(3 * _field(rng, shape, 40))
    fibres = w * fib_h + (1 - w) * fib_v
    fibres /= fibres.std() + 1e-8
    # Stroma density and cellularity wander across the slide, so colour alone is ambiguous.
    dense = 1 + 0.3 * _field(rng, shape, 60)
    eosin = 0.42 * dense * (1 + 0.3 * fibres + 0.15 * _field(rng, shape, 12)) * (1 - 0.2 * tumour)
    haze = (0.10 + 0.05 * dense) * (1 + 0.6 * tumour + lymph)  # cytoplasm, blurred nuclei

    # Adipocytes: the zero set of band-passed noise makes a network of thin membranes.
    cells = _field(rng, shape, 5) - 0.5 * _field(rng, shape, 15)
    membrane = np.exp(-((cells / 0.25) ** 2))
    glass = np.maximum(1 - tissue, fat * (1 - membrane))

    h_nuc, cover = _nuclei(rng, tumour, lymph, grade)
    grain = 0.03 * rng.standard_normal(shape, dtype=np.float32)  # scanner noise, in OD
    h_conc = (haze * (1 - cover) + h_nuc + grain) * (1 - glass)
    e_conc = (np.clip(eosin, 0.05, None) * (1 - 0.7 * cover) + grain) * (1 - glass)
    # Channel-first 2-D passes are about twice as fast as broadcasting over a last axis.
    rgb = np.empty((3, *shape), np.float32)
    for k in range(3):
        np.multiply(h_conc, stain.haematoxylin[k], out=rgb[k])
        rgb[k] += e_conc * stain.eosin[k]
    np.exp(np.negative(rgb, out=rgb), out=rgb)
    rgb *= stain.white[:, None, None]
    rgb += 0.5  # rounds on the cast below
    return np.clip(rgb, 0, 255, out=rgb).astype(np.uint8).transpose(1, 2, 0).copy()


def render_patch(
    rng: np.random.Generator,
    positive: bool,
    stain: Stain | None = None,
    size: int = PATCH,
) -> np.ndarray:
    """Renders one isolated size x size patch of stroma (negative) or IDC (positive).

    Args:
        rng: source of all randomness.
        positive: render tumour instead of stroma.
        stain: stain to use; drawn from `rng` when None.
        size: patch side in pixels.

    Returns:
        uint8 HxWx3 RGB image.
    """
    stain = stain or random_stain(rng)
    tumour = np.full((size, size), float(positive), np.float32)
    return render_tissue(rng, tumour, stain)


def _layout(rng: np.random.Generator, rows: int, cols: int):
    """Pixel-level tissue, tumour, fat and lymphocyte maps of one patient's mosaic.

    The large-scale structure is built on a grid 10x coarser and upsampled, for speed.
    """
    hh, ww, s = rows * PATCH, cols * PATCH, 10
    shape = (hh // s + 2, ww // s + 2)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32) * s
    # Tissue: a rotated ellipse roughened by smooth noise, so every patient has its own shape.
    cy, cx = rng.uniform(0.4, 0.6) * hh, rng.uniform(0.4, 0.6) * ww
    t = rng.uniform(0, np.pi)
    ry, rx = rng.uniform(0.33, 0.5) * hh, rng.uniform(0.33, 0.5) * ww
    u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / rx
    v = (-(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)) / ry
    tissue = 1 - np.sqrt(u * u + v * v) + 0.3 * _noise(rng, shape, 3 * PATCH / s)

    # Tumour: one to three smooth blobs centred in tissue, thresholded to a per-patient share.
    k = PATCH // s
    cells = tissue[k // 2 :: k, k // 2 :: k][:rows, :cols] > 0
    ty, tx = np.nonzero(cells) if cells.any() else ([rows // 2], [cols // 2])
    tumour = 0.4 * _noise(rng, shape, 2 * PATCH / s)
    for i in rng.choice(len(ty), size=min(rng.integers(1, 4), len(ty)), replace=False):
        sd = rng.uniform(1.5, 4.0) * PATCH
        d2 = (yy - (ty[i] + 0.5) * PATCH) ** 2 + (xx - (tx[i] + 0.5) * PATCH) ** 2
        tumour += np.exp(-d2 / (2 * sd * sd))
    inside = tumour[tissue > 0] if (tissue > 0).any() else tumour
    tumour -= np.quantile(inside, 1 - rng.uniform(0.12, 0.5))

    fat = _noise(rng, shape, 2 * PATCH / s) - rng.uniform(0.3, 1.2)
    lymph = _noise(rng, shape, 25 / s) - rng.uniform(0.9, 1.6)
    tissue, tumour, fat, lymph = (_upsample(f, (hh, ww), s) for f in (tissue, tumour, fat, lymph))

    tissue = (tissue + 0.06 * _field(rng, (hh, ww), 10) > 0).astype(np.float32)  # ragged edges
    away = 1 - _sigmoid((tumour + 0.15) / 0.03)  # fat and lymphocytes stay off tumour
    fat = _sigmoid(4 * fat) * away
    lymph = _sigmoid(6 * lymph) * away
    tumour = _sigmoid(tumour / 0.03) * tissue
    return tissue, tumour, fat, lymph


def make_synthetic_dataset(
    root: str | Path,
    n_patients: int = 8,
    grid: tuple[int, int] = (24, 24),
    seed: int = 0,
    label_noise: float = 0.03,
    edge_patches: bool = True,
    patient_prefix: str = "9",
) -> dict:
    """Writes synthetic patients as `<root>/<patient>/<C>/<patient>_idx5_x<X>_y<Y>_class<C>.png`.

    Patient i depends only on `seed` and i, so adding patients leaves the others unchanged,
    and the same arguments always give byte-identical files. About 28% of the patches are
    IDC (20-35% over 8 patients; single patients range from about 10% to 50%).

    Args:
        root: output folder; created if needed, existing files are overwritten.
        n_patients: number of patients.
        grid: mosaic size in 50-px cells (rows, cols); about 60% of cells hold tissue.
        seed: random seed.
        label_noise: fraction of patch labels flipped, like annotation errors.
        edge_patches: end the mosaic inside the last row or column holding tissue, so
            that its patches are smaller than 50x50, as at real slide edges.
        patient_prefix: patient ids are this prefix plus a 4-digit number ("90001", ...).

    Returns:
        Counts: `n_patches`, `n_positive` and `patients` mapping each id to its counts.
    """
    root = Path(root)
    rows, cols = grid
    out = {"n_patches": 0, "n_positive": 0, "patients": {}}
    for i in range(n_patients):
        pid = f"{patient_prefix}{i + 1:04d}"
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
        stain, grade = random_stain(rng), random_grade(rng)
        tissue, tumour, fat, lymph = _layout(rng, rows, cols)
        hh, ww = rows * PATCH, cols * PATCH
        cells = tissue.reshape(rows, PATCH, cols, PATCH).mean((1, 3)) > 0.25
        if edge_patches and cells.any():  # the scan ends inside the last tissue row or column
            last = [np.nonzero(cells.any(1 - k))[0].max() for k in (0, 1)]
            axis = int(cells[last[0]].sum() > cells[:, last[1]].sum())  # the one with fewer
            end = last[axis] * PATCH + rng.integers(1, PATCH)
            hh, ww = (end, ww) if axis == 0 else (hh, end)
            tissue, tumour, fat, lymph = (m[:hh, :ww] for m in (tissue, tumour, fat, lymph))
        img = render_tissue(rng, tumour, stain, tissue, fat, lymph, grade)
        oy, ox = 1 + PATCH * rng.integers(0, 40, 2)  # real coordinates start at 1
        flips = rng.uniform(size=(rows, cols)) < label_noise
        for label in "01":
            (root / pid / label).mkdir(parents=True, exist_ok=True)
        n = pos = 0
        for r in range(-(-hh // PATCH)):
            for c in range(-(-ww // PATCH)):
                sl = np.s_[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH]
                if tissue[sl].mean() < 0.25:  # mostly glass
                    continue
                label = int((tumour[sl].mean() > 0.5) ^ flips[r, c])
                name = f"{pid}_idx5_x{ox + c * PATCH}_y{oy + r * PATCH}_class{label}.png"
                Image.fromarray(img[sl]).save(root / pid / str(label) / name)
                n, pos = n + 1, pos + label
        out["patients"][pid] = {"n_patches": n, "n_positive": pos}
        out["n_patches"] += n
        out["n_positive"] += pos
        logger.debug("patient %s: %d patches, %d IDC", pid, n, pos)
    logger.info(
        "wrote %d synthetic patches (%d IDC) to %s", out["n_patches"], out["n_positive"], root
    )
    return out
