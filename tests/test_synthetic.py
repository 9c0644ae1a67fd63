"""The synthetic generator: Kaggle layout, determinism, class balance, edges and clustering."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idcscope.data.synthetic import make_synthetic_dataset, random_stain, render_patch

NAME = re.compile(r"^(\d+)_idx5_x(\d+)_y(\d+)_class([01])\.png$")


def _patches(root: Path) -> list[Path]:
    return sorted(root.glob("*/*/*.png"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("syn")
    return root, make_synthetic_dataset(root, n_patients=4, grid=(12, 12), seed=3)


def test_layout_and_names(dataset):
    root, counts = dataset
    files = _patches(root)
    assert len(files) == counts["n_patches"] > 100
    per_patient = {}
    for f in files:
        m = NAME.match(f.name)
        assert m, f.name
        patient, x, y, label = m.groups()
        assert f.parent.name == label
        assert f.parent.parent.name == patient
        assert int(x) % 50 == 1
        assert int(y) % 50 == 1
        with Image.open(f) as im:
            assert im.mode == "RGB"
            assert 1 <= im.width <= 50
            assert 1 <= im.height <= 50
        n, pos = per_patient.get(patient, (0, 0))
        per_patient[patient] = (n + 1, pos + int(label))
    assert sorted(per_patient) == ["90001", "90002", "90003", "90004"]
    assert {p: {"n_patches": n, "n_positive": k} for p, (n, k) in per_patient.items()} == counts[
        "patients"
    ]
    assert counts["n_positive"] == sum(k for _, k in per_patient.values())


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    kwargs = {"n_patients": 2, "grid": (6, 6)}
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_synthetic_dataset(a, seed=7, **kwargs)
    make_synthetic_dataset(b, seed=7, **kwargs)
    make_synthetic_dataset(c, seed=8, **kwargs)
    files_a = [p.relative_to(a) for p in _patches(a)]
    assert files_a == [p.relative_to(b) for p in _patches(b)]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a)
    files_c = [p.relative_to(c) for p in _patches(c)]
    assert files_a != files_c


def test_patients_do_not_depend_on_how_many(tmp_path):
    make_synthetic_dataset(tmp_path / "two", n_patients=2, grid=(5, 5), seed=0)
    make_synthetic_dataset(tmp_path / "one", n_patients=1, grid=(5, 5), seed=0)
    one = _patches(tmp_path / "one" / "90001")
    two = _patches(tmp_path / "two" / "90001")
    assert [p.name for p in one] == [p.name for p in two]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(one, two, strict=True))


def test_label_noise_flips_labels_not_images(tmp_path):
    kwargs = {"n_patients": 1, "grid": (6, 6), "seed": 2, "patient_prefix": "7"}
    clean = make_synthetic_dataset(tmp_path / "clean", label_noise=0.0, **kwargs)
    flipped = make_synthetic_dataset(tmp_path / "flipped", label_noise=1.0, **kwargs)
    assert flipped["n_positive"] == clean["n_patches"] - clean["n_positive"]
    for p in _patches(tmp_path / "clean"):
        assert p.name.startswith("70001_")
        label = int(p.parent.name)
        twin = tmp_path / "flipped" / "70001" / str(1 - label)
        twin = twin / p.name.replace(f"class{label}", f"class{1 - label}")
        assert twin.read_bytes() == p.read_bytes()


def test_positive_fraction(tmp_path):
    counts = make_synthetic_dataset(tmp_path, n_patients=8, grid=(10, 10), seed=0)
    assert 0.15 < counts["n_positive"] / counts["n_patches"] < 0.45
    assert all(0 < p["n_positive"] < p["n_patches"] for p in counts["patients"].values())


def test_edge_patches(dataset, tmp_path):
    root, _ = dataset
    sizes = [Image.open(f).size for f in _patches(root)]
    small = [s for s in sizes if s != (50, 50)]
    assert small, "expected some cropped edge patches"
    assert len(small) < 0.1 * len(sizes)
    make_synthetic_dataset(tmp_path, n_patients=2, grid=(6, 6), seed=3, edge_patches=False)
    assert all(Image.open(f).size == (50, 50) for f in _patches(tmp_path))


def test_positives_are_spatially_clustered(dataset):
    root, _ = dataset
    for patient in sorted(p.name for p in root.iterdir()):
        labels = {}
        for f in (root / patient).glob("*/*.png"):
            _, x, y, label = NAME.match(f.name).groups()
            labels[int(x) // 50, int(y) // 50] = int(label)
        base = np.mean(list(labels.values()))
        assert 0 < base < 1
        neighbours = [
            labels[(x + dx, y + dy)]
            for (x, y), label in labels.items()
            if label
            for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1))
            if (x + dx, y + dy) in labels
        ]
        # Shuffled labels would give positives about `base` positive neighbours.
        assert np.mean(neighbours) > base + 0.3, patient


def test_render_patch_classes_differ():
    rng = np.random.default_rng(0)
    stain = random_stain(rng)
    neg = np.stack([render_patch(rng, False, stain) for _ in range(8)])
    pos = np.stack([render_patch(rng, True, stain) for _ in range(8)])
    assert neg.shape == (8, 50, 50, 3)
    assert neg.dtype == np.uint8
    assert render_patch(rng, True, size=32).shape == (32, 32, 3)
    # IDC has more haematoxylin, which (unlike eosin) absorbs red.
    assert pos[..., 0].mean() < neg[..., 0].mean() - 10
