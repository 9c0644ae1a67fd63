"""CancerNet: the small custom CNN of the original study, for 50x50 RGB patches.

Depthwise-separable convolution blocks (32, 64x2, 128x3 channels), each with BatchNorm and
ReLU, closed by max pooling and dropout, then a dense head. About 1.2M parameters, most in
the first dense layer. The stages drop whole channels (``Dropout2d``): element-wise dropout
on full-resolution activations costs more than the convolutions on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..data import PATCH_SIZE
from ._registry import register_model
from .pretrained import load_backbone_weights


class SeparableConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


def _stage(cin: int, cout: int, depth: int, drop: float) -> nn.Sequential:
    convs = [SeparableConv(cin if i == 0 else cout, cout) for i in range(depth)]
    return nn.Sequential(*convs, nn.MaxPool2d(2), nn.Dropout2d(drop))


class CancerNet(nn.Module):
    cam_layer = "features.2"  # last conv stage: Grad-CAM's default target
    # The head flattens the feature map into a dense layer, so Grad-CAM's averaged gradient
    # weights cancel out; HiResCAM (activation x gradient per position) stays faithful.
    cam_method = "hirescam"

    def __init__(
        self,
        num_classes: int = 2,
        width: int = 32,
        hidden: int = 256,
        drop: float = 0.1,
        head_drop: float = 0.5,
        in_size: int = PATCH_SIZE,
        in_chans: int = 3,
    ):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _stage(in_chans, w, 1, drop), _stage(w, 2 * w, 2, drop), _stage(2 * w, 4 * w, 3, drop)
        )
        side = in_size // 8
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * w * side * side, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(head_drop),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model
def cancernet(
    num_classes: int = 2, pretrained: bool = False, weights: str | None = None, **kwargs
) -> CancerNet:
    if pretrained:
        raise ValueError("cancernet has no pretrained weights; train it or pass weights=")
    model = CancerNet(num_classes=num_classes, **kwargs)
    if weights:
        load_backbone_weights(model, weights, strict=True)
    return model
