"""CIFAR-style MobileNetV2 (Sandler et al. 2018): inverted residuals, depthwise 3x3, linear bottlenecks."""

from __future__ import annotations

import torch
from torch import nn

from ._common import check_args, kaiming_init, scaled

# (expansion t, output channels c, blocks n, stride s). The CIFAR variant uses stride 1 in the stem and in
# the second row (ImageNet: 2 and 2), so a 32x32 input ends at 4x4.
MOBILENETV2_CFG = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Expand 1x1 (skipped when t=1) -> depthwise 3x3 -> linear 1x1 projection; residual when stride 1, same width.

        >>> InvertedResidual(16, 16, stride=1, expansion=6)(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 16, 8, 8])
    """

    def __init__(self, in_planes: int, planes: int, *, stride: int, expansion: int):
        super().__init__()
        hidden = max(1, int(round(in_planes * expansion)))
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(in_planes, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_planes == planes

    def forward(self, x):
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """Stem conv3x3(32) + BN + ReLU6, inverted residual blocks, conv1x1(1280) + BN + ReLU6, pool, Linear.

        >>> m = MobileNetV2(in_channels=3, num_classes=10, input_size=32, width=0.25)
        >>> m(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    def __init__(self, *, in_channels: int, num_classes: int, input_size: int, width: float = 1.0):
        super().__init__()
        stem = scaled(32, width)
        last = scaled(1280, width)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(stem),
            nn.ReLU6(inplace=True),
        )
        blocks: list[nn.Module] = []
        planes, size = stem, input_size
        for t, c, n, s in MOBILENETV2_CFG:
            out = scaled(c, width)
            for i in range(n):
                stride = s if i == 0 else 1
                if stride > 1 and size < 4:  # keep at least 2x2: small inputs drop the late strides
                    stride = 1
                if stride > 1:
                    size = (size + 1) // 2
                blocks.append(InvertedResidual(planes, out, stride=stride, expansion=t))
                planes = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(planes, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        kaiming_init(self)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


def mobilenetv2(*, in_channels: int, num_classes: int, input_size: int, width: float = 1.0) -> MobileNetV2:
    """CIFAR-style MobileNetV2 (about 2.2M params at width 1); every channel count, the 1280 head included,
    is ``max(1, round(c * width))``.

        >>> m = mobilenetv2(in_channels=1, num_classes=10, input_size=8, width=0.5)
        >>> m(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    check_args("mobilenetv2", in_channels=in_channels, num_classes=num_classes, input_size=input_size, width=width)
    return MobileNetV2(in_channels=in_channels, num_classes=num_classes, input_size=input_size, width=width)
