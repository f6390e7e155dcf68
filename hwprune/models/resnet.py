"""Residual CNNs: the small default for 8x8 digits and the CIFAR ResNets of He et al. (2016).

All are plain ``nn.Module`` code (convs, BN, ``F.relu``, ``+``, ``torch.flatten``) so that
``torch.fx.symbolic_trace`` works and the residual streams show up as coupled channel groups.
Shortcuts are option B: identity when the shape is kept, 1x1 conv (stride s) + BN when it changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import check_args, kaiming_init, scaled


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU.

        >>> BasicBlock(16, 32, stride=2)(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Sequential()  # identity; traced as a no-op

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv3x3 + BN + ReLU, stages of ``BasicBlock``s, global average pool, Linear.

    ``stages`` is a sequence of ``(channels, blocks, stride)``; the first block of a stage carries the
    stride (and the 1x1 shortcut when the shape changes).

        >>> m = ResNet(1, 10, stem=16, stages=[(16, 1, 1), (32, 1, 2)])
        >>> m(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int, num_classes: int, *, stem: int, stages):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        layers = []
        planes = stem
        for channels, blocks, stride in stages:
            blocks_here = []
            for i in range(blocks):
                blocks_here.append(BasicBlock(planes, channels, stride if i == 0 else 1))
                planes = channels
            layers.append(nn.Sequential(*blocks_here))
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        kaiming_init(self)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = self.pool(x)
        return self.fc(torch.flatten(x, 1))


def _stride(size: int, stride: int) -> tuple[int, int]:
    """Downsample only while the map is at least 4 pixels wide, so nothing shrinks below 2x2."""
    if stride > 1 and size >= 4:
        return stride, (size + 1) // 2
    return 1, size


def small_resnet(*, in_channels: int, num_classes: int, input_size: int, width: float = 1.0) -> ResNet:
    """The default model for 8x8 scikit-learn digits: a small residual CNN (about 0.48M params at width 1).

    stem conv3x3(80) + BN + ReLU, one 80-channel basic block, one downsampling basic block to 160
    channels with a 1x1 conv + BN shortcut, global average pool, Linear. About 13M MACs on 8x8 input.

    Why 80/160: the model has 4 coupled groups of 80, 80, 160 and 160 channels, 480 prunable units.
    On a target whose channel counts go in multiples of 8, a sparsity s is met exactly when s·480 is a
    multiple of 8, which holds for s = 0.1, 0.2, ..., 0.9 (0.7 removes exactly 336 units).

        >>> m = small_resnet(in_channels=1, num_classes=10, input_size=8)
        >>> m(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    check_args("small-resnet", in_channels=in_channels, num_classes=num_classes, input_size=input_size, width=width)
    s2, _ = _stride(input_size, 2)
    c1, c2 = scaled(80, width), scaled(160, width)
    return ResNet(in_channels, num_classes, stem=c1, stages=[(c1, 1, 1), (c2, 1, s2)])


def _cifar_resnet(name: str, depth: int, *, in_channels, num_classes, input_size, width) -> ResNet:
    check_args(name, in_channels=in_channels, num_classes=num_classes, input_size=input_size, width=width)
    n = (depth - 2) // 6
    size = input_size
    stages = []
    for channels, stride in ((16, 1), (32, 2), (64, 2)):
        s, size = _stride(size, stride)
        stages.append((scaled(channels, width), n, s))
    return ResNet(in_channels, num_classes, stem=scaled(16, width), stages=stages)


def resnet20(*, in_channels: int, num_classes: int, input_size: int, width: float = 1.0) -> ResNet:
    """CIFAR ResNet-20 (He et al. 2016): 16/32/64 channels, 3 stages of 3 basic blocks, option-B shortcuts.

    About 0.27M params at width 1. Strides that would shrink a map below 2x2 are dropped (8x8 input).

        >>> m = resnet20(in_channels=3, num_classes=10, input_size=32)
        >>> m(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    return _cifar_resnet("resnet20", 20, in_channels=in_channels, num_classes=num_classes,
                         input_size=input_size, width=width)


def resnet56(*, in_channels: int, num_classes: int, input_size: int, width: float = 1.0) -> ResNet:
    """CIFAR ResNet-56 (He et al. 2016): 16/32/64 channels, 3 stages of 9 basic blocks, option-B shortcuts.

    About 0.86M params at width 1.

        >>> m = resnet56(in_channels=3, num_classes=10, input_size=32, width=0.5)
        >>> m(torch.randn(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    return _cifar_resnet("resnet56", 56, in_channels=in_channels, num_classes=num_classes,
                         input_size=input_size, width=width)
