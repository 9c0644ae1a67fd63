"""An input check: does a patch look like what the model was made for?

The model reads 50x50 H&E patches at 4 µm/px (about 2.5x). Shown anything else (a 10x crop
resized to 50x50, a stain far outside its training spread, bare glass, a grayscale or
immunohistochemistry image) it still answers, and confidently: real patches at four times
the magnification are called IDC a tenth as often as they should be, with nine in ten
scores below 0.1 or above 0.9. This check names such patches before anyone reads a score.

It is fitted on the training patches themselves: real patches are "ok", and the same
patches made into what the model was not made for are the other reasons
(:func:`out_of_spec`): zoomed in (2x to 5x, the centre upsampled) or out (0.5x, a 2x2
block of neighbours downsampled), re-stained far beyond the spread between patients
(optical densities scaled per channel by 2x or more), bare glass, and not H&E at all
(grayscale, channels swapped, haematoxylin-DAB, inverted). Each patch is described by a
few cheap statistics (:func:`features`): its colour in optical density over its tissue,
how much of it is tissue, and its texture's scale, the variogram of its optical density at
lags 1 to 8 px relative to its variance, which tells the size of nuclei and how sharp their
edges are. A network with one hidden layer of 32 units on those gives P(ok) and the likeliest
other reason; the threshold on P(ok) is set on patients the network did not see, so that a
chosen share of real patches (0.5% by default) is flagged. Everything fitted is plain JSON
(lists of floats), for a model's metadata (``ModelMeta.input_check``): :func:`check_patches`
needs nothing else. The statistics come from one compiled pass per patch
(``_kernels.patch_statistics``), tens of thousands of patches a second.
"""

from __future__ import annotations

import logging
import math
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..cpus import usable_cpus
from . import PATCH_SIZE

logger = logging.getLogger(__name__)

REASONS = ("ok", "magnification", "stain", "glass", "not H&E")
FORMAT = "idcscope-inputcheck/1"
# Share of real patches the threshold aims to flag, on the fit's own held-out patients;
# patients further off are flagged about twice as often (1% flagged 1.9% of the sample's
# held-out patients, the issue's limit being 2%; this 1.4%: RECIPES.md).
FLAG_RATE = 0.005
LAGS = (1, 2, 4, 8)  # variogram lags in pixels: nuclei are 2-4 px across at 4 µm/px
TISSUE_OD = 0.3  # summed optical density of tissue (glass is below 0.2)
HIDDEN = 32  # units of the hidden layer: 1,100 parameters in all
_CHUNK = 2048  # patches per task: a few MB of float32, cache-friendly
# -log((i + 1) / 256) for every uint8 value: optical density, 0 for white.
_OD = (math.log(256.0) - np.log(np.arange(1, 257, dtype=np.float64))).astype(np.float32)
FEATURES = (
    "tissue", "od_r", "od_g", "od_b", "log_rg", "log_bg", "chroma_spread", "log_var",
    *(f"vario_{h}" for h in LAGS), *(f"chroma_vario_{h}" for h in LAGS), "edge_kurtosis",
    "curvature", "dark_share", "dark_light", "dark_rg", "dark_bg", "light_rg", "light_bg",
)  # fmt: skip
# Ruifrok & Johnston 1998: OD of haematoxylin, eosin and DAB per unit concentration (RGB).
_HE = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float32)
_DAB = np.array([0.27, 0.57, 0.78], np.float32)


def _check(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (50, 50, 3):
        raise ValueError(
            f"expected uint8 patches (N, 50, 50, 3), got {images.dtype} {images.shape}"
        )
    return images


def _features(images: np.ndarray) -> np.ndarray:
    """:data:`FEATURES` of a chunk of uint8 patches, (n, len(FEATURES)) float64, from the
    sums one compiled pass makes (``_kernels.patch_statistics``; numpy's for a few
    patches, which spares importing numba and loading its compiled code)."""
    lags = np.array(LAGS, np.int64)
    if len(images) <= SMALL:
        s = _statistics(images, lags)
    else:
        from ._kernels import patch_statistics

        s = np.empty((len(images), 24 + 2 * len(lags)), np.float64)
        patch_statistics(np.ascontiguousarray(images), _OD, lags, TISSUE_OD, s)
    side = images.shape[1]
    px, eps = side * side, 1e-3
    count = s[:, 0:1]
    # Colour over tissue; a patch without tissue is described by all its pixels.
    mean = np.where(count > 0, s[:, 1:4] / np.maximum(count, 1), s[:, 4:7] / px)
    total = mean.sum(1) + eps
    c_var = np.where(
        count[:, 0] > 0,
        s[:, 8] / np.maximum(count[:, 0], 1) - (s[:, 7] / np.maximum(count[:, 0], 1)) ** 2,
        s[:, 23] / px - (s[:, 22] / px) ** 2,
    )
    var = s[:, 10] / px - (s[:, 9] / px) ** 2 + 1e-4
    chroma_var = s[:, 23] / px - (s[:, 22] / px) ** 2 + 1e-5
    pairs = np.array([2 * side * (side - h) for h in LAGS])
    vario = s[:, 24 : 24 + len(LAGS)] / pairs / var[:, None]
    chroma_vario = s[:, 24 + len(LAGS) :] / pairs / chroma_var[:, None]
    m2 = s[:, 11] / pairs[0] + 1e-6
    kurt = (s[:, 12] / pairs[0] + 1e-12) / (m2 * m2)  # 1 for a flat patch
    curv = s[:, 13] / (side - 2) ** 2 / m2
    dark = s[:, 15:18] / np.maximum(s[:, 14:15], 1) + eps
    light = s[:, 19:22] / np.maximum(s[:, 18:19], 1) + eps
    cols = [
        count[:, 0] / px, *mean.T, np.log((mean[:, 0] + eps) / (mean[:, 1] + eps)),
        np.log((mean[:, 2] + eps) / (mean[:, 1] + eps)), np.sqrt(np.maximum(c_var, 0)) / total,
        np.log(var), *np.log(vario + 1e-6).T, *np.log(chroma_vario + 1e-6).T, np.log(kurt),
        np.log(curv + 1e-6), s[:, 14] / np.maximum(count[:, 0], 1),
        np.log(dark.sum(1) / light.sum(1)), np.log(dark[:, 0] / dark[:, 1]),
        np.log(dark[:, 2] / dark[:, 1]), np.log(light[:, 0] / light[:, 1]),
        np.log(light[:, 2] / light[:, 1]),
    ]  # fmt: skip
    return np.nan_to_num(np.stack(cols, 1), posinf=50.0, neginf=-50.0)


SMALL = 64  # up to this many patches numpy's sums are quick enough (as ``neighbourhood``)


def _statistics(images: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """``_kernels.patch_statistics``' sums in numpy, for a few patches."""
    od = _OD[images].transpose(0, 3, 1, 2).astype(np.float64)  # (n, 3, h, w)
    n, _, h, w = od.shape
    g, c = od.sum(1), od[:, 2] - od[:, 0]
    m = (g > TISSUE_OD).astype(np.float64)
    s = np.zeros((n, 24 + 2 * len(lags)))
    s[:, 0], s[:, 1:4], s[:, 4:7] = m.sum((1, 2)), (od * m[:, None]).sum((2, 3)), od.sum((2, 3))
    s[:, 7], s[:, 8] = (m * c).sum((1, 2)), (m * c * c).sum((1, 2))
    s[:, 9], s[:, 10] = g.sum((1, 2)), (g * g).sum((1, 2))
    s[:, 22], s[:, 23] = c.sum((1, 2)), (c * c).sum((1, 2))
    mean = np.where(s[:, 0] == 0, s[:, 9] / (h * w), s[:, 1:4].sum(1) / np.maximum(s[:, 0], 1))
    dark = g > mean[:, None, None]
    for k, side in ((14, dark), (18, ~dark)):
        s[:, k] = (m * side).sum((1, 2))
        s[:, k + 1 : k + 4] = (od * (m * side)[:, None]).sum((2, 3))
    across, down = np.diff(g, axis=2), np.diff(g, axis=1)
    s[:, 11] = (across**2).sum((1, 2)) + (down**2).sum((1, 2))
    s[:, 12] = (across**4).sum((1, 2)) + (down**4).sum((1, 2))
    inner = g[:, 1:-1, 1:-1]
    lap = 4 * inner - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:]
    s[:, 13] = (lap**2).sum((1, 2))
    for i, lag in enumerate(lags):
        for v, col in ((g, 24 + i), (c, 24 + len(lags) + i)):
            a, d = v[:, :, lag:] - v[:, :, :-lag], v[:, lag:] - v[:, :-lag]
            s[:, col] = (a**2).sum((1, 2)) + (d**2).sum((1, 2))
    return s


def features(images: np.ndarray, workers: int | None = None) -> np.ndarray:
    """The statistics the check reads (:data:`FEATURES`), one row per patch.

    Args:
        images: uint8 patches (N, 50, 50, 3).
        workers: threads (numpy releases the GIL); default every usable core.
    """
    images = _check(images)
    chunks = [images[i : i + _CHUNK] for i in range(0, len(images), _CHUNK)]
    if not chunks:
        return np.zeros((0, len(FEATURES)))
    workers = min(workers or usable_cpus(), len(chunks))
    if workers <= 1:
        return np.concatenate([_features(c) for c in chunks])
    with ThreadPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(_features, chunks)))


def _probabilities(params: dict, f: np.ndarray) -> np.ndarray:
    """P(reason) per patch: a one-hidden-layer network on the standardised features."""
    clip = params.get("clip", 8.0)  # a far-out feature stays finite
    z = np.clip((f - np.asarray(params["mean"])) / np.asarray(params["scale"]), -clip, clip)
    hidden = np.maximum(z @ np.asarray(params["w1"]) + np.asarray(params["b1"]), 0)
    logits = hidden @ np.asarray(params["w2"]) + np.asarray(params["b2"])
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(1, keepdims=True)


def p_ok(params: dict, images: np.ndarray, workers: int | None = None) -> np.ndarray:
    """Each patch's probability of being what the model was made for (``params`` from
    :func:`fit_input_check`)."""
    return _probabilities(params, features(images, workers))[:, 0]


def check_patches(params: dict, images: np.ndarray, workers: int | None = None) -> np.ndarray:
    """A reason per patch (:data:`REASONS`): "ok", or why it is not what the model was made
    for. Empty ``params`` (a model without a check) pass every patch."""
    images = _check(images)
    if not params:
        return np.full(len(images), "ok", dtype=object)
    p = _probabilities(params, features(images, workers))
    reasons = np.asarray(params["classes"], dtype=object)
    out = reasons[1 + p[:, 1:].argmax(1)]
    out[p[:, 0] >= params["threshold"]] = "ok"
    return out


def fit_input_check(
    images: np.ndarray,
    reasons: np.ndarray,
    groups: np.ndarray,
    flag_rate: float = FLAG_RATE,
    seed: int = 0,
    hidden: int = HIDDEN,
) -> dict:
    """Fit the check on patches labelled with :data:`REASONS`; returns its JSON parameters.

    The network is fitted on half the groups (patients; a real patch and the patches
    made from it share one) and the threshold set on the other half's real patches, at
    the ``flag_rate`` quantile of their P(ok): scores of patients it never saw, as in use.
    The network is then refitted on every group, with that threshold.

    Args:
        images: uint8 patches (N, 50, 50, 3).
        reasons: one of :data:`REASONS` per patch; "ok" for real patches as the model reads them.
        groups: the patient of each patch (the one it was made from).
        flag_rate: share of real patches of unseen patients to flag.
        seed: which groups go to which half.
        hidden: units of the network's hidden layer.
    """
    f = features(images)
    y = np.array([REASONS.index(r) for r in reasons])
    groups = np.asarray(groups)
    names = np.unique(groups)
    rng = np.random.default_rng(seed)
    held = np.isin(groups, rng.permutation(names)[: len(names) // 2])
    if not (held & (y == 0)).any() or not (~held).any():
        raise ValueError("fitting the input check needs real patches of at least 2 patients")
    first = _regression(f[~held], y[~held], hidden, seed)
    scores = _probabilities(first, f[held & (y == 0)])[:, 0]
    params = _regression(f, y, hidden, seed)
    params["threshold"] = float(np.quantile(scores, flag_rate))
    params["flag_rate"] = flag_rate
    params["n_fit"] = {r: int((y == i).sum()) for i, r in enumerate(REASONS)}
    params["n_patients"] = len(names)
    return params


def _regression(f: np.ndarray, y: np.ndarray, hidden: int, seed: int) -> dict:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    mean, scale = f.mean(0), f.std(0) + 1e-6
    z = np.clip((f - mean) / scale, -8.0, 8.0)
    # Each reason weighs as much in total as every other: real patches are not outvoted.
    counts = np.bincount(y, minlength=len(REASONS)).astype(float)
    weight = (len(y) / (len(REASONS) * np.maximum(counts, 1)))[y]
    model = MLPClassifier((hidden,), alpha=1e-3, batch_size=256, max_iter=60, random_state=seed)
    with warnings.catch_warnings():  # 60 epochs on purpose: enough, and a bounded time
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(z, y, sample_weight=weight)
    w2 = np.zeros((hidden, len(REASONS)))
    b2 = np.full(len(REASONS), -50.0)  # a reason absent from the fit is never chosen
    w2[:, model.classes_], b2[model.classes_] = model.coefs_[1], model.intercepts_[1]
    return {
        "format": FORMAT,
        "classes": list(REASONS),
        "features": list(FEATURES),
        "mean": mean.tolist(),
        "scale": scale.tolist(),
        "clip": 8.0,
        "w1": model.coefs_[0].tolist(),
        "b1": model.intercepts_[0].tolist(),
        "w2": w2.tolist(),
        "b2": b2.tolist(),
    }


# What the check is fitted on: real patches made into what the model was not made for.

_RESAMPLE = ("bilinear", "bicubic", "lanczos")
NOT_HE = ("grayscale", "swapped", "H-DAB", "inverted")


def _resize(patch: np.ndarray, resample: str) -> np.ndarray:
    from PIL import Image

    filt = getattr(Image.Resampling, resample.upper())
    return np.asarray(Image.fromarray(patch).resize((PATCH_SIZE, PATCH_SIZE), filt))


def zoom(
    images: np.ndarray,
    factor: float | np.ndarray,
    rng: np.random.Generator | None = None,
    resample: str = "bicubic",
) -> np.ndarray:
    """Patches shown at ``factor`` times their magnification: a square of ``50 / factor`` px
    (the centre; anywhere with ``rng``) resized to 50x50.

    ``factor`` above 1 magnifies; below 1 needs patches larger than 50x50 (``images`` of
    (N, S, S, 3) with ``S >= 50 / factor``: 2x2 blocks of neighbours, :func:`blocks`).
    With ``rng``, the resampling filter is drawn too.
    """
    images = np.asarray(images)
    factors = np.broadcast_to(np.asarray(factor, float), len(images))
    out = np.empty((len(images), PATCH_SIZE, PATCH_SIZE, 3), np.uint8)
    for i, (patch, f) in enumerate(zip(images, factors, strict=True)):
        side = min(round(PATCH_SIZE / f), patch.shape[0])
        y = x = (patch.shape[0] - side) // 2
        if rng is not None:
            y, x = rng.integers(0, patch.shape[0] - side + 1, 2)
            resample = _RESAMPLE[rng.integers(len(_RESAMPLE))]
        out[i] = _resize(np.ascontiguousarray(patch[y : y + side, x : x + side]), resample)
    return out


def blocks(images: np.ndarray, patients, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Every 2x2 block of neighbouring patches of one patient as one 100x100 image:
    ``(rows of the blocks' top-left patches, blocks (M, 100, 100, 3))``."""
    where = {(p, int(a), int(b)): i for i, (p, a, b) in enumerate(zip(patients, x, y, strict=True))}
    s = PATCH_SIZE
    rows, out = [], []
    for (p, a, b), i in where.items():
        others = [where.get((p, a + s, b)), where.get((p, a, b + s)), where.get((p, a + s, b + s))]
        if None in others:
            continue
        right, below, corner = (images[j] for j in others)
        top = np.concatenate([images[i], right], 1)
        out.append(np.concatenate([top, np.concatenate([below, corner], 1)], 0))
        rows.append(i)
    shape = (0, 2 * s, 2 * s, 3)
    return np.array(rows, int), np.stack(out) if out else np.zeros(shape, np.uint8)


def _from_od(od: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(256 * np.exp(-od) - 1), 0, 255).astype(np.uint8)


def restain(images: np.ndarray, rng: np.random.Generator, least: float = 0.7) -> np.ndarray:
    """Patches re-stained far outside the spread between patients: each channel's optical
    density scaled by its own factor, the largest and smallest factors at least
    ``exp(least)`` apart (2x by default; patients of the Kaggle set differ by far less)."""
    n = len(images)
    logs = rng.uniform(-1.2, 1.2, (n, 3))
    spread = logs.max(1) - logs.min(1)
    short = spread < least  # stretch them apart to the least spread
    centre = logs.mean(1, keepdims=True)
    stretch = (least / np.maximum(spread[short], 1e-3))[:, None]
    logs[short] = centre[short] + (logs[short] - centre[short]) * stretch
    return _from_od(_OD[images] * np.exp(logs)[:, None, None, :].astype(np.float32))


def not_he(
    images: np.ndarray, rng: np.random.Generator, kinds: tuple[str, ...] = NOT_HE
) -> np.ndarray:
    """Patches made into images of other kinds, one of ``kinds`` (:data:`NOT_HE`) drawn
    per patch: grayscale, colour channels swapped, haematoxylin-DAB (eosin's share shown
    as DAB's brown), inverted."""
    images = np.asarray(images)
    out = images.copy()
    kind = np.array([NOT_HE.index(k) for k in kinds])[rng.integers(0, len(kinds), len(images))]
    grey = (images[kind == 0] @ np.array([0.299, 0.587, 0.114])).round().astype(np.uint8)
    out[kind == 0] = grey[..., None]
    perms = [(0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    for i in np.flatnonzero(kind == 1):
        out[i] = images[i][..., list(perms[rng.integers(len(perms))])]
    unit = _HE / np.linalg.norm(_HE, axis=1, keepdims=True)
    conc = _OD[images[kind == 2]] @ np.linalg.inv(unit)  # (.., 3): H, E, residual
    dab = np.stack([unit[0], _DAB / np.linalg.norm(_DAB), unit[2]])
    out[kind == 2] = _from_od(np.clip(conc, 0, None) @ dab)
    out[kind == 3] = 255 - images[kind == 3]
    return out


def glass(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` synthetic patches of bare glass: a near-white tint, a gentle gradient, noise,
    and now and then a speck of dust."""
    yy, xx = np.mgrid[0:PATCH_SIZE, 0:PATCH_SIZE]
    base = rng.uniform(215, 250, (n, 1, 1, 1)) + rng.normal(0, 4, (n, 1, 1, 3))
    slope = rng.normal(0, 6, (n, 2, 1, 1))
    img = (
        base
        + (slope[:, 0] * (yy / PATCH_SIZE - 0.5) + slope[:, 1] * (xx / PATCH_SIZE - 0.5))[..., None]
    )
    img = img + rng.normal(0, 1, img.shape) * rng.uniform(0.5, 3, (n, 1, 1, 1))
    for i in np.flatnonzero(rng.random(n) < 0.3):
        cy, cx = rng.integers(0, PATCH_SIZE, 2)
        speck = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.uniform(0.8, 2.5) ** 2
        img[i][speck] -= rng.uniform(40, 120)
    return np.clip(img.round(), 0, 255).astype(np.uint8)


def out_of_spec(
    images: np.ndarray,
    groups: np.ndarray,
    rng: np.random.Generator,
    wide: np.ndarray | None = None,
    wide_groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real patches, labelled "ok", and as many again made into each other reason, from a
    random share of them: ``(patches, reasons, groups)`` for :func:`fit_input_check`.

    Magnification: zoomed in 1.7x to 5x (half of them with a little noise, as a camera
    adds, so smoothness alone does not decide) and, from ``wide`` (2x2 blocks of
    neighbours, :func:`blocks`, with their ``wide_groups``), zoomed out to 0.5x-0.6x.
    """
    images, groups = _check(images), np.asarray(groups)
    n = len(images)
    parts = [(images, "ok", groups)]
    pick = rng.integers(0, n, n)
    zoomed = zoom(images[pick], rng.uniform(1.7, 5.0, n), rng)
    noisy = rng.random(n) < 0.5
    noise = rng.normal(0, 1, zoomed[noisy].shape) * rng.uniform(1, 4, (noisy.sum(), 1, 1, 1))
    zoomed[noisy] = np.clip(zoomed[noisy] + noise, 0, 255).round().astype(np.uint8)
    parts.append((zoomed, "magnification", groups[pick]))
    if wide is not None and len(wide):
        k = rng.integers(0, len(wide), n // 2)
        shrunk = zoom(wide[k], rng.uniform(0.5, 0.6, len(k)), rng)
        parts.append((shrunk, "magnification", np.asarray(wide_groups)[k]))
    pick = rng.integers(0, n, n)
    parts.append((restain(images[pick], rng), "stain", groups[pick]))
    pick = rng.integers(0, n, n)
    parts.append((not_he(images[pick], rng), "not H&E", groups[pick]))
    pick = rng.integers(0, n, n // 2)
    parts.append((glass(len(pick), rng), "glass", groups[pick]))
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([np.full(len(p[0]), p[1], dtype=object) for p in parts]),
        np.concatenate([p[2] for p in parts]),
    )
