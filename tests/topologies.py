"""One small model per topology, shared by the group, slicing and plan tests."""

import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    """Two residual blocks on one stream, a downsampling block with a 1x1 shortcut, a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.c1, self.b1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.d1, self.db1 = nn.Conv2d(16, 24, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(24)
        self.d2, self.db2 = nn.Conv2d(24, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24)
        self.short = nn.Sequential(nn.Conv2d(16, 24, 1, stride=2, bias=False), nn.BatchNorm2d(24))
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + x)
        x = F.relu(self.db2(self.d2(F.relu(self.db1(self.d1(x))))) + self.short(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Concat(nn.Module):
    """Inception-like: two branches concatenated on channels, then a conv, flatten into a linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.mix = nn.Conv2d(20, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 6)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        y = F.max_pool2d(F.relu(self.mix(y)), 2)
        return self.fc(y.flatten(1))


class Depthwise(nn.Module):
    """MobileNetV2 inverted residual: expand 1x1, depthwise 3x3, project 1x1, residual add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.expand = nn.Sequential(nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False), nn.BatchNorm2d(48), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(48, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.head(x.mean((2, 3)))


class Grouped(nn.Module):
    """ResNeXt-like grouped conv (4 groups of 4 in, 6 out) and a depthwise conv with multiplier 2."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.g = nn.Conv2d(16, 24, 3, padding=1, groups=4)
        self.bg = nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 48, 3, padding=1, groups=24)
        self.out = nn.Conv2d(48, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.bg(self.g(x)))
        x = F.relu(self.dw(x))
        x = self.out(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SqueezeExcite(nn.Module):
    """An SE gate multiplies the channels; a linear MLP head with two hidden layers."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.se1, self.se2 = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 7)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        s = torch.sigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(x, 1)))))
        x = (x * s).mean((2, 3))
        return self.fc3(F.gelu(self.fc2(F.relu(self.fc1(x)))))


class Shared(nn.Module):
    """One conv applied twice (weight sharing) and a chunk along channels (GLU-like gate)."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.c1 = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = F.relu(self.c0(x))
        x = F.relu(self.shared(F.relu(self.shared(x))))
        a, b = torch.chunk(self.c1(x), 2, dim=1)
        return self.fc((a * torch.sigmoid(b)).mean((2, 3)))


def channel_shuffle(x, groups: int):
    """ShuffleNet's shuffle: the channel axis viewed as (groups, C / groups), transposed, flattened."""
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    return torch.transpose(x, 1, 2).contiguous().view(b, -1, h, w)


class ShuffleUnit(nn.Module):
    """A ShuffleNet v2 unit (stride 1) between a stem and a head: split the stream in two, transform
    one half, concatenate, shuffle. The shuffle interleaves the halves, so it couples channel k of the
    untouched half with channel k of the branch's output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.branch = nn.Sequential(
            nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12), nn.ReLU(),
            nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12),
            nn.Conv2d(12, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
        )
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat((a, self.branch(b)), dim=1), 2)
        return self.head(x)


TOPOLOGIES = {
    "residual": (Residual, (2, 3, 8, 8)),
    "concat": (Concat, (2, 3, 8, 8)),
    "depthwise": (Depthwise, (2, 3, 8, 8)),
    "grouped": (Grouped, (2, 3, 8, 8)),
    "squeeze-excite": (SqueezeExcite, (2, 3, 8, 8)),
    "shared-and-split": (Shared, (2, 3, 8, 8)),
    "channel-shuffle": (ShuffleUnit, (2, 3, 8, 8)),
}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters, so masking is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model


def random_keep(groups, seed):
    """A random kept subset of every prunable group, from min_keep up to one unit fewer than its size."""
    import numpy as np

    rng = np.random.default_rng(seed)
    keep = {}
    for g in groups:
        if g.prunable:
            n = int(rng.integers(g.min_keep, g.size))  # always remove something
            keep[g.name] = np.sort(rng.choice(g.size, size=n, replace=False))
    return keep
