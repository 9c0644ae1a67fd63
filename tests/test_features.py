"""Cached backbone features give the same logits as the model, and train only its head.

The feature cache is a benchmark's tool (``benchmarks/features.py``), not the package's.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from idcscope.data.augment import _dihedral
from idcscope.data.preprocess import Preprocessing, to_float
from idcscope.errors import IdcscopeError
from idcscope.models import create_model

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from features import extract_features, split_frozen, train_head

PREP = Preprocessing(channels_last=False)


@pytest.fixture(scope="module")
def frozen_model():
    torch.manual_seed(0)
    return create_model("resnet50").eval()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Model input: uint8 (N, 3, 50, 50)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 3, 50, 50), dtype=np.uint8)


def test_cached_features_reproduce_the_model(frozen_model, images):
    rows = np.array([5, 0, 7])
    feats = extract_features(
        frozen_model, images, rows, PREP, batch_size=2, precision="fp32", dtype=torch.float32
    )
    assert feats.shape == (1, 3, frozen_model.backbone.num_features)
    _, head = split_frozen(frozen_model)
    with torch.no_grad():
        expected = frozen_model(PREP(to_float(images[rows])))
        torch.testing.assert_close(head(feats[0]), expected, atol=1e-4, rtol=1e-4)


def test_eight_views_are_the_dihedral_transforms(frozen_model, images):
    feats = extract_features(
        frozen_model, images, None, PREP, precision="fp32", views=8, dtype=torch.float32
    )
    assert feats.shape[:2] == (8, len(images))
    frozen, _ = split_frozen(frozen_model)
    with torch.no_grad():
        for k in (0, 3, 6):
            x = _dihedral(to_float(images), k)
            torch.testing.assert_close(feats[k], frozen(PREP(x)), atol=1e-4, rtol=1e-4)


def test_train_head_learns_and_leaves_the_backbone_alone(images):
    torch.manual_seed(0)
    model = create_model("resnet50").eval()
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    # Separable stand-in features: class 1 has larger values in the first 100 channels.
    labels = np.arange(64) % 2
    feats = torch.rand(2, 64, model.backbone.num_features)
    feats[:, labels == 1, :100] += 1.0
    history = train_head(model, feats, labels, epochs=15, batch_size=16, lr=1e-3)
    assert len(history) == 15
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["train_acc"] == 1.0
    assert all(torch.equal(v, backbone[k]) for k, v in model.backbone.state_dict().items())
    assert not model.head.training


def test_models_without_a_frozen_backbone_are_refused(images):
    for model in (create_model("cancernet"), create_model("resnet50", fine_tune=True)):
        with pytest.raises(IdcscopeError, match="frozen backbone"):
            extract_features(model, images, None, PREP)
    with pytest.raises(ValueError, match="views"):
        extract_features(create_model("resnet50"), images, None, PREP, views=4)
