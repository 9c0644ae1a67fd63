import pytest
import torch
from safetensors.torch import save_file

from idcscope.errors import IdcscopeError, WeightsUnavailableError
from idcscope.models import create_model, list_models


@pytest.mark.parametrize("name", list_models())
def test_models_return_logits(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=2).eval()
    out = model(torch.randn(3, 3, 50, 50))
    assert out.shape == (3, 2)
    assert not torch.allclose(out.softmax(1).sum(1), out.sum(1))  # logits, not probabilities
    assert dict(model.named_modules()).get(model.cam_layer) is not None


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(IdcscopeError, match="cancernet"):
        create_model("no_such_net")


def test_any_timm_model_by_name():
    assert create_model("mobilenetv3_small_050")(torch.randn(2, 3, 50, 50)).shape == (2, 2)


def test_resnet50_head_and_freezing():
    frozen = create_model("resnet50")
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    assert all(p.requires_grad for p in frozen.head.parameters())
    frozen.train()
    assert not frozen.backbone.training and frozen.head.training  # BN statistics stay put
    kinds = [type(m).__name__ for m in frozen.head]
    assert kinds == ["AdaptiveAvgPool2d", "Flatten", "Linear", "ReLU", "Dropout", "Linear"]
    assert frozen.head[4].p == 0.5
    tuned = create_model("resnet50", fine_tune=True)
    assert all(p.requires_grad for p in tuned.parameters())


def test_pretrained_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    source = create_model("resnet18", num_classes=1000)
    path = tmp_path / "resnet18.safetensors"
    save_file(source.state_dict(), str(path))
    model = create_model("resnet18", num_classes=2, weights=str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 2  # the new head keeps its own initialisation
    pth = tmp_path / "backbone.pth"
    torch.save({"state_dict": create_model("resnet50", fine_tune=True).backbone.state_dict()}, pth)
    r50 = create_model("resnet50", weights=str(pth))
    assert r50.backbone.conv1.weight.abs().sum() > 0


def test_weights_errors_are_clear(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="not found"):
        create_model("resnet18", weights=str(tmp_path / "missing.safetensors"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage")
    with pytest.raises(WeightsUnavailableError, match=r"junk\.pth"):
        create_model("resnet18", weights=str(junk))


def test_hub_download_offline_gives_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    # What a machine without network meets, without waiting for connection timeouts.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError, match="--weights"):
        create_model("resnet18", pretrained=True)


@pytest.mark.parametrize("name", ["cancernet", "resnet18"])
def test_batchnorm_folding_keeps_the_outputs(name):
    from idcscope.models.runtime import fuse_for_inference

    torch.manual_seed(0)
    model = create_model(name)
    model.train()
    model(torch.rand(8, 3, 50, 50))  # non-trivial running statistics
    model.eval()
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.rand(4, 3, 50, 50)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-4, rtol=1e-4)
