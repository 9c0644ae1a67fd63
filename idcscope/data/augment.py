"""Batched augmentations for float images of shape (B, 3, H, W) with values in [0, 1].

Everything works on whole batches, on whatever device the batch lives on, with no loop over
samples. Random parameters are drawn from an explicit `torch.Generator` (on the generator's
device, normally the CPU) and then moved to the batch, so a seeded generator gives the same
augmentations on CPU and GPU. Apply them before normalisation.

Histology has no canonical orientation, so the 8 dihedral transforms (flips and 90-degree
rotations) are free, exact (no interpolation) augmentations and a natural test-time
augmentation. `random_affine` reproduces the Keras ImageDataGenerator set of the original
study; `hed_jitter` (Tellez et al. 2018) and `color_jitter` imitate stain and scanner
variation between patients, which is what decides generalisation to unseen patients.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Ruifrok & Johnston stain vectors (optical density of haematoxylin, eosin, DAB), the
# matrix of skimage.color.rgb2hed; rows are stains, so od = stains @ _RGB_FROM_HED.
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64
)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
_LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)  # as torchvision grayscale


def _rand(generator: torch.Generator | None, *shape: int) -> torch.Tensor:
    """U(-1, 1) in float64 on the generator's device (CPU when there is none)."""
    device = generator.device if generator is not None else None
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return 2 * u - 1


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Dihedral transform k (0-7) of the last two dims; 0 is the identity.

    k % 4 quarter turns, then a left-right flip when k >= 4.
    """
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def _check_square(x: torch.Tensor) -> None:
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"dihedral transforms need square images, got {tuple(x.shape)}")


def dihedral(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Applies one of the 8 dihedral transforms, drawn uniformly, to each sample.

    One `gather` with a per-sample pixel permutation, rather than one op per transform.

    Args:
        x: batch (B, C, H, W) with H == W.
        generator: source of randomness.

    Returns:
        Transformed batch, same shape, dtype and device.
    """
    _check_square(x)
    b, c, h, w = x.shape
    device = generator.device if generator is not None else None
    k = torch.randint(0, 8, (b,), generator=generator, device=device).cpu()
    # Row j: for each output pixel, the input pixel that transform j moves there.
    pixels = torch.arange(h * w).view(h, w)
    perms = torch.stack([_dihedral(pixels, j).reshape(-1) for j in range(8)])
    index = perms[k].to(x.device)[:, None].expand(b, c, h * w)
    return x.flatten(2).gather(2, index).view(b, c, h, w)


def dihedral_all(x: torch.Tensor) -> torch.Tensor:
    """All 8 dihedral transforms of a batch, the identity first.

    Args:
        x: batch (B, C, H, W) with H == W.

    Returns:
        Tensor (8, B, C, H, W).
    """
    _check_square(x)
    return torch.stack([_dihedral(x, k) for k in range(8)])


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    degrees: float = 90.0,
    zoom: tuple[float, float] = (0.95, 1.05),
    shift: float = 0.1,
    shear: float = 0.05,
    hflip: bool = True,
    vflip: bool = True,
    padding_mode: str = "reflection",
) -> torch.Tensor:
    """Random rotation, zoom, shift, shear and flips in one batched resampling.

    The defaults are the original study's Keras ImageDataGenerator (rotation_range=90,
    zoom_range=0.05, width/height_shift_range=0.1, shear_range=0.05, both flips). Like
    Keras, zoom is drawn per axis. Keras' fill_mode="nearest" smears edge pixels into the
    corners; reflection padding continues the tissue instead.

    Args:
        x: batch (B, C, H, W).
        generator: source of randomness.
        degrees: rotation angle drawn from U(-degrees, degrees).
        zoom: range of the per-axis scale factors; (1, 1) for none.
        shift: translation as a fraction of the image size, drawn from U(-shift, shift).
        shear: shear angle in radians drawn from U(-shear, shear). Older Keras read
            shear_range in radians; keras-preprocessing reads degrees, making 0.05 a no-op.
        hflip: flip left-right with probability 0.5.
        vflip: flip top-bottom with probability 0.5.
        padding_mode: grid_sample padding for pixels mapped from outside the image.

    Returns:
        Transformed batch, same shape, dtype and device; values stay in the input's range.
    """
    b, _, h, w = x.shape
    r = _rand(generator, 8, b).cpu()
    angle, sh = math.radians(degrees) * r[0], shear * r[1]
    zx = (zoom[0] + zoom[1]) / 2 + (zoom[1] - zoom[0]) / 2 * r[2]
    zy = (zoom[0] + zoom[1]) / 2 + (zoom[1] - zoom[0]) / 2 * r[3]
    fx = 1 - 2 * ((r[4] < 0) & hflip).double()  # -1 flips
    fy = 1 - 2 * ((r[5] < 0) & vflip).double()

    # Output pixel -> input pixel, in (x, y) pixel units about the image centre, composed as
    # Keras does: rotation @ shear @ zoom (and the flips).
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([cos, -sin, sin, cos], -1).view(b, 2, 2)
    one, zero = torch.ones_like(sh), torch.zeros_like(sh)
    shr = torch.stack([one, -torch.sin(sh), zero, torch.cos(sh)], -1).view(b, 2, 2)
    a = rot @ shr @ torch.diag_embed(torch.stack([zx * fx, zy * fy], -1))
    t = torch.stack([shift * w * r[6], shift * h * r[7]], -1)
    # affine_grid works in [-1, 1] coordinates: conjugate by the pixel -> normalised scaling.
    d = torch.tensor([w / 2, h / 2], dtype=torch.float64)
    theta = torch.cat([a * d[None, :] / d[:, None], (t / d)[..., None]], -1)

    theta = theta.to(x.device, torch.float32)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    out = F.grid_sample(
        x.float(), grid, mode="bilinear", padding_mode=padding_mode, align_corners=False
    )
    return out.to(x.dtype)


def color_jitter(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    brightness: float = 0.1,
    contrast: float = 0.1,
    saturation: float = 0.1,
    hue: float = 0.02,
) -> torch.Tensor:
    """Per-sample brightness, contrast, saturation and hue jitter, as one affine colour map.

    Brightness scales, contrast blends with the mean grey level, saturation with the grey
    image (torchvision's definitions), and hue rotates colours about the grey axis (a linear
    stand-in for an HSV hue shift). Composed, they are a per-sample 3x3 matrix plus an
    offset, applied in one einsum. Unlike torchvision, the fixed order has no clamping
    between steps; the output is clamped to [0, 1].

    Args:
        x: batch (B, 3, H, W) in [0, 1].
        generator: source of randomness.
        brightness: factor drawn from U(1 - brightness, 1 + brightness).
        contrast: factor drawn from U(1 - contrast, 1 + contrast).
        saturation: factor drawn from U(1 - saturation, 1 + saturation).
        hue: rotation drawn from U(-hue, hue), in turns (0.5 is the opposite colour).

    Returns:
        Jittered batch, same shape, dtype and device.
    """
    b = x.shape[0]
    r = _rand(generator, 4, b).cpu()
    bri, con, sat = 1 + brightness * r[0], 1 + contrast * r[1], 1 + saturation * r[2]
    theta = 2 * math.pi * hue * r[3]

    eye = torch.eye(3, dtype=torch.float64)
    grey = torch.ones(3, 1, dtype=torch.float64) @ _LUMA[None]  # x -> its grey level, per channel
    sat_m = sat[:, None, None] * eye + (1 - sat)[:, None, None] * grey
    k = torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64)  # the grey axis
    cross = torch.tensor([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], dtype=torch.float64) * k[0]
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    hue_m = cos * eye + sin * cross + (1 - cos) * torch.outer(k, k)  # Rodrigues
    m = ((bri * con)[:, None, None] * hue_m @ sat_m).to(x.device, torch.float32)
    # Both matrices keep grey (1, 1, 1) fixed, so the contrast offset passes through them.
    offset = ((1 - con) * bri).to(x.device, torch.float32)
    mean_grey = torch.einsum("c,bchw->b", _LUMA.to(x.device, torch.float32), x.float())
    mean_grey = mean_grey / (x.shape[-1] * x.shape[-2])
    out = torch.baddbmm((offset * mean_grey)[:, None, None], m, x.float().flatten(2))
    return out.clamp_(0, 1).view_as(x).to(x.dtype)


def hed_jitter(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    sigma: float = 0.03,
    bias: float = 0.03,
) -> torch.Tensor:
    """HED stain augmentation (Tellez et al. 2018) on a batch.

    Converts RGB to optical density, projects it on the haematoxylin, eosin and DAB
    vectors (skimage.color.rgb2hed), and per sample scales each stain by 1 + alpha and
    shifts it by beta, with alpha ~ U(-sigma, sigma) and beta ~ U(-bias, bias) in
    optical-density units (natural log; current skimage divides densities by
    -log(1e-6) = 13.8, so a bias there is 13.8 times this one). Being linear in optical
    density, the whole round trip is one 3x3 matrix plus an offset per sample.

    Args:
        x: batch (B, 3, H, W) in [0, 1].
        generator: source of randomness.
        sigma: range of the multiplicative stain jitter.
        bias: range of the additive stain jitter.

    Returns:
        Jittered batch clamped to [0, 1], same shape, dtype and device; the identity (up to
        float error, and black raised to 1e-6) when sigma and bias are 0.
    """
    b = x.shape[0]
    r = _rand(generator, 2, b, 3).cpu()
    alpha, beta = 1 + sigma * r[0], bias * r[1]
    m = _HED_FROM_RGB @ torch.diag_embed(alpha) @ _RGB_FROM_HED  # (B, 3, 3), row vectors
    offset = beta @ _RGB_FROM_HED
    m, offset = m.to(x.device, torch.float32), offset.to(x.device, torch.float32)
    # Contiguous NCHW first: on a channels_last batch the same ops run about 4x slower.
    od = x.float().clamp(min=1e-6).contiguous().log_().neg_().flatten(2)  # black: inf density
    od = torch.baddbmm(offset[:, :, None], m.transpose(1, 2), od)
    return od.neg_().exp_().clamp_(0, 1).view_as(x).to(x.dtype)


def stain_jitter(x: torch.Tensor, generator: torch.Generator | None, spread: dict) -> torch.Tensor:
    """Stain augmentation drawn from the spread of stain between patients (``spread``, from
    ``data.stain.stain_spread``), in Reinhard's l-alpha-beta space.

    Per sample, each channel is scaled about the patients' median by ``exp(log_scale * n1)``
    and shifted by ``shift * n2`` (n1, n2 standard normal): a draw of how another slide's
    tissue statistics differ, as in RandStainNA (Shen et al., MICCAI 2022) but with the
    statistics of whole patients, not of single patches. Glass and black are kept, blended
    in by tissue weight exactly as the Reinhard normaliser does.

    Args:
        x: batch (B, 3, H, W) in [0, 1].
        generator: source of randomness.
        spread: ``{"centre", "shift", "log_scale"}``, three floats each.

    Returns:
        The batch, same shape, dtype and device.
    """
    from . import stain

    b = x.shape[0]
    n = torch.randn(2, b, 3, generator=generator, dtype=torch.float64).numpy()
    centre = np.asarray(spread["centre"])
    scale = np.exp(np.asarray(spread["log_scale"]) * n[0])
    offset = centre * (1 - scale) + np.asarray(spread["shift"]) * n[1]
    a, off = (
        torch.from_numpy(v).to(x.device, torch.float32) for v in stain.lab_affine(scale, offset)
    )
    f = x.float().contiguous().flatten(2)  # (B, 3, HW)
    od = math.log(256.0) - torch.log1p(f * 255)
    od_norm = od.square().sum(1).sqrt_()  # torch's norm over a short axis is 100x slower
    weight = ((od_norm - stain.GLASS_OD) / (stain.TISSUE_OD - stain.GLASS_OD)).clamp_(0, 1)
    weight *= od.amin(1) < stain.BLACK_OD
    to_lms = torch.from_numpy(stain.RGB_TO_LMS).to(x.device, torch.float32)
    to_rgb = torch.from_numpy(stain.LMS_TO_RGB).to(x.device, torch.float32)
    z = torch.baddbmm(off[:, :, None], a, torch.log(torch.matmul(to_lms, f).clamp_(min=1e-4)))
    rgb = torch.matmul(to_rgb, z.clamp_(-30, 30).exp_()).clamp_(0, 1)
    out = f + weight[:, None] * (rgb - f)
    return out.view_as(x).to(x.dtype)


@dataclass
class Augment:
    """Training augmentation: a callable `(x, generator) -> x` for batches in [0, 1].

    Geometry first (the affine resamples), then stain (between-patient spread, then HED) and
    scanner (colour) jitter.

    Attributes:
        dihedral: random dihedral transform per sample.
        affine: random affine transform with the original study's Keras settings.
        color: brightness, contrast and saturation range (hue gets a fifth); 0 for none.
        hed: HED jitter sigma and bias; 0 for none.
        stain: the spread of stain between the training patients (`stain_jitter`), or
            None for no stain augmentation of that kind.
    """

    dihedral: bool = True
    affine: bool = False
    color: float = 0.0
    hed: float = 0.0
    stain: dict | None = None

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augments (B, 3, H, W), or (B, 3k, H, W): k views of each sample (a patch and
        its neighbourhood) get the same geometry and the same stain and colour jitter."""
        if self.affine:
            x = random_affine(x, generator)
        if self.dihedral:
            x = dihedral(x, generator)
        views, colour = x.shape[1] // 3, bool(self.hed or self.color or self.stain)
        if views > 1 and colour:  # side by side: one colour draw per sample
            x = torch.cat(x.split(3, dim=1), dim=-1)
        if self.stain:
            x = stain_jitter(x, generator, self.stain)
        if self.hed:
            x = hed_jitter(x, generator, sigma=self.hed, bias=self.hed)
        if self.color:
            c = self.color
            x = color_jitter(x, generator, brightness=c, contrast=c, saturation=c, hue=c / 5)
        if views > 1 and colour:
            x = torch.cat(x.split(x.shape[-1] // views, dim=-1), dim=1)
        return x


_PRESETS = {
    "none": {"dihedral": False},
    "dihedral": {"dihedral": True},
    "report": {"dihedral": False, "affine": True},  # the original study's Keras set
    "default": {"dihedral": True, "hed": 0.03, "color": 0.05},
    # Stronger stain and colour jitter, which Tellez et al. (2019) found to generalise best.
    "strong": {"dihedral": True, "hed": 0.06, "color": 0.15},
}


def create_augment(name: str = "default", **overrides) -> Augment:
    """Builds a named augmentation preset, optionally overriding its fields.

    Args:
        name: "none", "dihedral", "report" (the original study's affine and flips),
            "default" (dihedral, light HED and light colour jitter) or "strong" (dihedral,
            twice the HED and three times the colour jitter).
        **overrides: `Augment` fields to change.

    Returns:
        The configured `Augment`.
    """
    if name not in _PRESETS:
        raise ValueError(f"unknown augmentation {name!r}; choose from {sorted(_PRESETS)}")
    return Augment(**{**_PRESETS[name], **overrides})
