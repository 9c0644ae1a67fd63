"""Batched augmentations: shapes, ranges, determinism, exact identities and geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idcscope.data import augment
from idcscope.data.augment import (
    Augment,
    color_jitter,
    create_augment,
    dihedral,
    dihedral_all,
    hed_jitter,
    random_affine,
)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]
RANDOM_OPS = {
    "dihedral": dihedral,
    "affine": random_affine,
    "color": color_jitter,
    "hed": hed_jitter,
    "default": create_augment("default"),
    "report": create_augment("report"),
    "strong": create_augment("strong"),
}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(b: int = 6, h: int = 50, w: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=_gen(seed))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(RANDOM_OPS))
def test_keeps_shape_dtype_device_and_range(name, device):
    x = _batch().to(device)
    y = RANDOM_OPS[name](x, _gen())
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    assert y.device == x.device
    assert y.min() >= 0
    assert y.max() <= 1
    assert not torch.equal(y, x)


@pytest.mark.parametrize("name", sorted(RANDOM_OPS))
def test_deterministic_given_the_generator(name):
    x = _batch(16)
    fn = RANDOM_OPS[name]
    assert torch.equal(fn(x, _gen(5)), fn(x, _gen(5)))
    assert not torch.equal(fn(x, _gen(5)), fn(x, _gen(6)))


def test_dihedral_permutes_pixels_within_each_sample():
    x = _batch(32)
    y = dihedral(x, _gen())
    assert torch.equal(x.flatten(1).sort(1).values, y.flatten(1).sort(1).values)
    # Each sample is one of its own 8 transforms, and the draws are not all the same.
    variants = dihedral_all(x)  # (8, B, 3, H, W)
    which = [[torch.equal(y[i], variants[k, i]) for k in range(8)] for i in range(len(x))]
    assert all(sum(w) == 1 for w in which)
    assert len({w.index(True) for w in which}) > 3


def test_dihedral_all_is_the_group():
    x = _batch(2)
    v = dihedral_all(x)
    assert v.shape == (8, *x.shape)
    assert torch.equal(v[0], x)
    flat = v.flatten(1)
    assert len({tuple(row.tolist()) for row in flat}) == 8  # distinct on a random image
    expected = [x, x.flip(-1), x.flip(-2), x.flip(-2).flip(-1), x.transpose(-1, -2)]
    for e in expected:
        assert any(torch.equal(e, t) for t in v)


def test_dihedral_rejects_non_square():
    with pytest.raises(ValueError, match="square"):
        dihedral(torch.rand(2, 3, 50, 42), _gen())


def test_dihedral_all_averages_as_tta_needs():
    x = _batch(3)
    views = dihedral_all(x)  # TTA averages a model's output over these
    torch.testing.assert_close(views.mean((2, 3, 4)), x.mean((1, 2, 3)).expand(8, -1))
    # The top-left pixel visits each corner twice among the 8 transforms.
    corners = (x[..., 0, 0] + x[..., 0, -1] + x[..., -1, 0] + x[..., -1, -1]) / 4
    torch.testing.assert_close(views[..., 0, 0].mean(0), corners)


@pytest.mark.parametrize("size", [(50, 50), (40, 60)])
def test_affine_without_transforms_is_identity(size):
    x = _batch(4, *size)
    kw = {"degrees": 0.0, "zoom": (1.0, 1.0), "shift": 0.0, "shear": 0.0}
    y = random_affine(x, _gen(), **kw, hflip=False, vflip=False)
    torch.testing.assert_close(y, x, atol=1e-4, rtol=0)
    # With only hflip each sample is either itself or its mirror image, and both happen.
    y = random_affine(x.repeat(8, 1, 1, 1), _gen(), **kw, hflip=True, vflip=False)
    mirrored = [torch.allclose(s, x[i % 4].flip(-1), atol=1e-4) for i, s in enumerate(y)]
    same = [torch.allclose(s, x[i % 4], atol=1e-4) for i, s in enumerate(y)]
    assert all(m != s for m, s in zip(mirrored, same, strict=True))
    assert any(mirrored)
    assert any(same)


def _quarter_turn(generator, *shape):
    """Stands in for augment._rand: rotation at +degrees, flips off, everything else 0."""
    r = torch.zeros(shape, dtype=torch.float64)
    r[0], r[4], r[5] = 1, 1, 1
    return r


def test_affine_quarter_turn_is_exact(monkeypatch):
    monkeypatch.setattr(augment, "_rand", _quarter_turn)
    x = _batch(2)
    y = random_affine(x, None, degrees=90.0, zoom=(1.0, 1.0), shift=0.1, shear=0.05)
    assert any(torch.allclose(y, torch.rot90(x, k, dims=(-2, -1)), atol=1e-4) for k in (1, 3))


def test_affine_rotates_in_pixel_units_on_non_square(monkeypatch):
    monkeypatch.setattr(augment, "_rand", _quarter_turn)
    x = _batch(2, 40, 60)
    y = random_affine(x, None, degrees=90.0, zoom=(1.0, 1.0), shift=0.1, shear=0.05)
    # The central 40x40 square turns onto itself; normalised-coordinate rotation would squash it.
    centre = x[..., 10:50]
    assert any(
        torch.allclose(y[..., 10:50], torch.rot90(centre, k, dims=(-2, -1)), atol=1e-4)
        for k in (1, 3)
    )


def test_affine_fills_by_reflection_not_black():
    x = torch.full((8, 3, 50, 50), 0.6)
    y = random_affine(x, _gen(), degrees=45.0, zoom=(0.7, 0.8), shift=0.2)
    torch.testing.assert_close(y, x)


def test_hed_jitter_identity_at_zero_and_finite_on_extremes():
    x = torch.cat([_batch(4), torch.zeros(1, 3, 50, 50), torch.ones(1, 3, 50, 50)])
    torch.testing.assert_close(hed_jitter(x, _gen(), sigma=0.0, bias=0.0), x, atol=1e-5, rtol=0)
    for fill in (0.0, 1.0, 0.5):
        y = hed_jitter(torch.full((4, 3, 8, 8), fill), _gen(), sigma=0.5, bias=0.5)
        assert torch.isfinite(y).all()
        assert y.min() >= 0
        assert y.max() <= 1
    # Scaling stains leaves zero density (white glass) white.
    white = torch.ones(4, 3, 8, 8)
    torch.testing.assert_close(hed_jitter(white, _gen(), sigma=0.3, bias=0.0), white)


def test_hed_jitter_matches_a_numpy_reference(monkeypatch):
    alpha, beta = np.array([0.5, -1.0, 0.2]), np.array([1.0, 0.3, -0.7])
    draws = torch.tensor(np.stack([alpha, beta])[:, None], dtype=torch.float64)
    monkeypatch.setattr(augment, "_rand", lambda generator, *shape: draws)
    x = _batch(1)
    y = hed_jitter(x, None, sigma=0.1, bias=0.05)[0].permute(1, 2, 0).numpy()

    rgb_from_hed = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
    od = -np.log(np.clip(x[0].permute(1, 2, 0).numpy().astype(np.float64), 1e-6, None))
    stains = od @ np.linalg.inv(rgb_from_hed)
    stains = stains * (1 + 0.1 * alpha) + 0.05 * beta
    expected = np.clip(np.exp(-(stains @ rgb_from_hed)), 0, 1)
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_color_jitter_identity_at_zero_and_keeps_grey():
    x = _batch()
    assert torch.allclose(color_jitter(x, _gen(), 0.0, 0.0, 0.0, 0.0), x, atol=1e-6)
    # Saturation and hue act on colour only: a grey image stays put.
    grey = torch.rand(6, 1, 50, 50, generator=_gen(1)).expand(6, 3, 50, 50)
    y = color_jitter(grey, _gen(), brightness=0.0, contrast=0.0, saturation=0.5, hue=0.3)
    torch.testing.assert_close(y, grey)


def test_color_jitter_brightness_scales_each_sample():
    x = _batch() * 0.5
    y = color_jitter(x, _gen(), brightness=0.2, contrast=0.0, saturation=0.0, hue=0.0)
    ratio = y / x
    per_sample = ratio.flatten(1)
    torch.testing.assert_close(per_sample.min(1).values, per_sample.max(1).values)
    assert (per_sample >= 0.8 - 1e-5).all()
    assert (per_sample <= 1.2 + 1e-5).all()
    assert per_sample[:, 0].std() > 0


def test_color_jitter_contrast_keeps_mean_grey():
    x = 0.25 + 0.5 * _batch()  # no clamping for factors in [0.8, 1.2]
    y = color_jitter(x, _gen(), brightness=0.0, contrast=0.2, saturation=0.0, hue=0.0)
    luma = torch.tensor([0.299, 0.587, 0.114])[:, None, None]
    torch.testing.assert_close((y * luma).sum(1).mean((1, 2)), (x * luma).sum(1).mean((1, 2)))
    spread = y.flatten(1).std(1) / x.flatten(1).std(1)
    assert ((spread > 0.8 - 1e-4) & (spread < 1.2 + 1e-4)).all()
    assert spread.std() > 0


def test_presets():
    x = _batch()
    assert torch.equal(create_augment("none")(x, _gen()), x)
    assert create_augment("dihedral") == Augment(dihedral=True)
    assert create_augment("report") == Augment(dihedral=False, affine=True)
    default = create_augment("default")
    assert default.dihedral
    assert default.hed > 0
    assert default.color > 0
    assert not default.affine
    assert create_augment("default", hed=0.1).hed == 0.1
    strong = create_augment("strong")
    assert strong.dihedral and strong.hed > default.hed and strong.color > default.color
    with pytest.raises(ValueError, match="dihedral"):
        create_augment("nope")
