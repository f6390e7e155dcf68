"""CIFAR-style VGG-16 with batch norm, with max-pools skipped where a map would fall below 1x1."""

from __future__ import annotations

import torch
from torch import nn

from ._common import check_args, kaiming_init, scaled

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """Conv3x3-BN-ReLU layers from a cfg (ints = channels, ``"M"`` = 2x2 max-pool), global average pool, Linear.

        >>> m = VGG([8, "M", 16], in_channels=1, num_classes=3, input_size=8)
        >>> m(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 3])
    """

    def __init__(self, cfg, *, in_channels: int, num_classes: int, input_size: int):
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_channels, input_size
        for v in cfg:
            if v == "M":
                if size // 2 >= 1:  # a pool that would leave less than 1x1 is skipped
                    layers.append(nn.MaxPool2d(2, 2))
                    size //= 2
                continue
            layers += [nn.Conv2d(channels, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            channels = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.final_size = size
        kaiming_init(self)

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg16_bn(*, in_channels: int, num_classes: int, input_size: int, width: float = 1.0) -> VGG:
    """CIFAR VGG-16-BN: cfg 64,64,M,128,128,M,256x3,M,512x3,M,512x3,M, global average pool, Linear(512, classes).

    About 14.7M params at width 1. On 8x8 input only the first three pools are kept (8->4->2->1), on
    28x28 the first four (28->14->7->3->1).

        >>> m = vgg16_bn(in_channels=1, num_classes=10, input_size=8, width=0.25)
        >>> m(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    check_args("vgg16-bn", in_channels=in_channels, num_classes=num_classes, input_size=input_size, width=width)
    cfg = [v if v == "M" else scaled(v, width) for v in VGG16_CFG]
    return VGG(cfg, in_channels=in_channels, num_classes=num_classes, input_size=input_size)
