"""Registered ImageNet backbones through timm: the study's ResNet-50 with its new head."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ._registry import register_model
from .zoo import backbone, create_timm_model, last_feature_module

logger = logging.getLogger(__name__)


class FrozenBackboneNet(nn.Module):
    """A backbone (optionally frozen) and the study's head: avg pool, flatten, dense ReLU,
    dropout 0.5, dense. A frozen backbone stays in eval mode, so its BatchNorm statistics
    keep their ImageNet values while the head trains."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 2,
        hidden: int = 256,
        drop: float = 0.5,
        freeze: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(backbone.num_features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(drop),
            nn.Linear(hidden, num_classes),
        )
        self.frozen = freeze
        self.backbone.requires_grad_(not freeze)
        self.cam_layer = "backbone." + last_feature_module(backbone)

    def train(self, mode: bool = True) -> FrozenBackboneNet:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@register_model
def resnet50(
    num_classes: int = 2,
    pretrained: bool = False,
    weights: str | None = None,
    fine_tune: bool = False,
    **kwargs,
) -> FrozenBackboneNet:
    """The study's ResNet-50: ImageNet backbone, frozen unless ``fine_tune``, new dense head."""
    body = backbone("resnet50", pretrained, weights, num_classes=0, global_pool="", **kwargs)
    return FrozenBackboneNet(body, num_classes, freeze=not fine_tune)


@register_model
def resnet18(
    num_classes: int = 2, pretrained: bool = False, weights: str | None = None, **kwargs
) -> nn.Module:
    return create_timm_model("resnet18", num_classes, pretrained, weights, **kwargs)


@register_model
def efficientnet_b0(
    num_classes: int = 2, pretrained: bool = False, weights: str | None = None, **kwargs
) -> nn.Module:
    return create_timm_model("efficientnet_b0", num_classes, pretrained, weights, **kwargs)
