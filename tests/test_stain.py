"""Stain normalisation on synthetic Beer-Lambert tissue with known stains, edge cases, state."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from idcscope.data.stain import (
    create_normalizer,
    fit_reference,
    list_normalizers,
    normalize_per_patient,
    tissue_mask,
)
from idcscope.errors import IdcscopeError

METHODS = ["reinhard", "macenko"]
H_E = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])  # Ruifrok & Johnston
H_E_OTHER = np.array([[0.50, 0.80, 0.33], [0.25, 0.80, 0.55]])


def _unit(m: np.ndarray) -> np.ndarray:
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def _concentrations(n: int = 24, seed: int = 0) -> np.ndarray:
    """(n, 50, 50, 2) H and E amounts: pure nuclei, pure stroma, mixtures, and a glass band."""
    rng = np.random.default_rng(seed)
    c = rng.gamma(2.0, 0.35, (n, 50, 50, 2))
    kind = rng.integers(0, 3, (n, 50, 50))
    c[..., 0] *= kind != 1
    c[..., 1] *= kind != 0
    c[:, :10] = 0
    return c


def _render(c: np.ndarray, stains: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Beer-Lambert: optical density is concentrations times unit stain vectors."""
    od = scale * c @ _unit(stains)
    return np.clip(np.rint(256 * np.exp(-od) - 1), 0, 255).astype(np.uint8)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int64) - b).mean())


def test_macenko_recovers_stain_vectors():
    for stains in (H_E, H_E_OTHER):
        norm = create_normalizer("macenko").fit(_render(_concentrations(), stains))
        found = np.asarray(norm.source["stain_matrix"])
        cosine = (found * _unit(stains)).sum(1)  # rows are unit vectors: H first, then E
        assert cosine.min() > 0.95, cosine
        assert not norm.fell_back


@pytest.mark.parametrize("name", METHODS)
def test_normalising_brings_differently_stained_tissue_together(name):
    c = _concentrations()
    a, b = _render(c, H_E), _render(c, H_E_OTHER, scale=1.25)
    na = create_normalizer(name).fit_transform(a)
    nb = create_normalizer(name).fit_transform(b)
    assert _mad(na, nb) < 0.5 * _mad(a, b)
    # Towards a reference fitted on `a`, Macenko reproduces `a` itself.
    if name == "macenko":
        ref = fit_reference(a, name)
        assert _mad(create_normalizer(name, ref).fit_transform(b), a) < 0.1 * _mad(a, b)


def _edge_cases() -> dict[str, np.ndarray]:
    strip = np.full((1, 50, 50, 3), 255, np.uint8)
    strip[0, :1] = _render(_concentrations(1), H_E)[0, 20:21]  # a 50x1 edge patch, padded
    return {
        "white": np.full((2, 50, 50, 3), 255, np.uint8),
        "black": np.zeros((2, 50, 50, 3), np.uint8),
        "uniform": np.broadcast_to(np.array([190, 110, 170], np.uint8), (2, 50, 50, 3)).copy(),
        "strip": strip,
        "empty": np.zeros((0, 50, 50, 3), np.uint8),
    }


@pytest.mark.parametrize("name", list_normalizers())
@pytest.mark.parametrize("case", list(_edge_cases()))
def test_degenerate_inputs_give_uint8(name, case):
    images = _edge_cases()[case]
    out = create_normalizer(name).fit_transform(images)
    assert out.dtype == np.uint8 and out.shape == images.shape
    if case in ("white", "black") or name == "none":
        np.testing.assert_array_equal(out, images)  # glass and black are kept
    norm = create_normalizer(name).fit(images)
    assert np.isfinite(np.concatenate([[0.0], *map(np.ravel, norm.state_dict().values())])).all()


def test_too_little_tissue_falls_back_to_the_reference():
    for name in METHODS:
        norm = create_normalizer(name).fit(_edge_cases()["strip"])
        assert norm.fell_back and norm.source == norm.target


def test_tissue_mask():
    assert not tissue_mask(np.full((4, 4, 3), 255, np.uint8)).any()
    assert not tissue_mask(np.zeros((4, 4, 3), np.uint8)).any()
    tissue = _render(_concentrations(2), H_E)
    mask = tissue_mask(tissue)
    assert mask.shape == tissue.shape[:-1] and not mask[:, :10].any() and mask.mean() > 0.6
    np.testing.assert_array_equal(tissue_mask(tissue / 255.0), mask)


def _patients() -> tuple[np.ndarray, np.ndarray]:
    c = _concentrations(18, seed=3)
    images = np.concatenate(
        [_render(c[:6], H_E), _render(c[6:12], H_E_OTHER), _render(c[12:], H_E, scale=1.4)]
    )
    return images, np.repeat(["p1", "p2", "p3"], 6)


@pytest.mark.parametrize("name", METHODS)
def test_per_patient_is_consistent_and_order_free(name):
    images, patients = _patients()
    ref = fit_reference(images, name, patients)
    out = normalize_per_patient(images, patients, name, ref, workers=2)
    assert out.dtype == np.uint8 and out.shape == images.shape
    # A patient's patches get the transform fitted on that patient alone...
    for p in ("p1", "p2", "p3"):
        alone = create_normalizer(name, ref).fit_transform(images[patients == p])
        np.testing.assert_array_equal(out[patients == p], alone)
    # ...whatever the order of patients and patches.
    perm = np.random.default_rng(0).permutation(len(images))
    shuffled = normalize_per_patient(images[perm], patients[perm], name, ref, workers=1)
    np.testing.assert_array_equal(shuffled, out[perm])
    # One patch transformed alone is the same as within its batch.
    norm = create_normalizer(name, ref).fit(images[:6])
    np.testing.assert_array_equal(norm.transform(images[2:3]), norm.transform(images[:6])[2:3])


@pytest.mark.parametrize("name", list_normalizers())
def test_state_dict_round_trip(name, tmp_path):
    images, _ = _patients()
    norm = create_normalizer(name).fit(images[:6])
    state = norm.state_dict()
    assert json.loads(json.dumps(state, allow_nan=False)) == state
    assert all(isinstance(v, list) for v in state.values())
    torch.save({"stain": state}, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)["stain"]
    again = create_normalizer(name, loaded)
    np.testing.assert_array_equal(again.transform(images[6:]), norm.transform(images[6:]))
    # The reference alone (no source) loads unfitted.
    if name != "none":
        with pytest.raises(IdcscopeError, match="before fit"):
            create_normalizer(name, fit_reference(images, name)).transform(images)


def test_bad_names_and_states():
    with pytest.raises(ValueError, match="choose from"):
        create_normalizer("vahadane")
    with pytest.raises(ValueError, match="lacks"):
        create_normalizer("reinhard", {"target_mean": [0, 0, 0]})
    with pytest.raises(ValueError, match="std must be"):
        create_normalizer("reinhard", {"target_mean": [0, 0, 0], "target_std": [1, 0, 1]})
    with pytest.raises(ValueError, match="uint8"):
        create_normalizer("reinhard").fit(np.zeros((1, 5, 5, 3)))


def test_real_patients_get_closer(real_sample):
    from idcscope.data.decode import decode_patch

    # Two patients whose stains differ visibly: 10254 is dark purple, 8913 light pink.
    images, patients = [], []
    for p in ("10254", "8913"):
        files = sorted((real_sample / p / "0").glob("*.png"))[:60]
        images += [decode_patch(f)[0] for f in files]
        patients += [p] * len(files)
    images, patients = np.stack(images), np.array(patients)
    mask = tissue_mask(images)

    def gap(x: np.ndarray) -> float:
        means = [x[(patients == p)[:, None, None] & mask].mean(0) for p in ("10254", "8913")]
        return float(np.abs(means[0] - means[1]).mean())

    for name in METHODS:
        out = normalize_per_patient(images, patients, name)
        assert gap(out) < 0.7 * gap(images), name


@pytest.mark.parametrize("name", ["reinhard", "macenko"])
def test_few_patches_skip_numba_with_the_same_bytes(name, monkeypatch):
    """Up to ``SMALL_PIXELS`` the colours are packed and unpacked by numpy (no numba to
    import when a few patches are scored): the same bytes as the compiled loops."""
    import idcscope.data.stain as stain

    rng = np.random.default_rng(3)
    images = rng.integers(60, 230, (6, 50, 50, 3), dtype=np.uint8)
    patients = np.array([0, 0, 0, 1, 1, 1])
    planes = {}
    for how, limit in (("numpy", 10**9), ("numba", 0)):
        monkeypatch.setattr(stain, "SMALL_PIXELS", limit)
        planes[how] = np.zeros((6, 6, 50, 50), np.uint8)
        normalize_per_patient(images, patients, name, workers=1, planes=planes[how])
    np.testing.assert_array_equal(planes["numpy"], planes["numba"])
    assert planes["numpy"][:, :3].any()
