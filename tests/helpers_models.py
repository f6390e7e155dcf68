"""Model functions for the ``package.module:function`` form of ``build_model`` (used by test_models.py)."""

from torch import nn


def tiny_net(in_channels, num_classes, input_size):
    """Takes the three builder arguments."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * input_size * input_size, num_classes))


def fixed_net():
    """Takes no arguments."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def wide_net(*, num_classes, width=1.0, **rest):
    """Takes width and swallows the rest."""
    return nn.Sequential(nn.Flatten(), nn.LazyLinear(max(1, round(8 * width))), nn.ReLU(), nn.Linear(max(1, round(8 * width)), num_classes))


def needs_depth(depth, num_classes):
    """Has a required argument hwprune cannot supply."""
    return nn.Linear(depth, num_classes)


def not_a_model(**kwargs):
    """Returns something that is not an nn.Module."""
    return {"weight": 1}


def broken(**kwargs):
    """Raises inside the user's code."""
    raise RuntimeError("boom inside the user's model function")


NOT_CALLABLE = 3


class _TinyResNet(nn.Module):
    def __init__(self, in_channels, num_classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.c1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = nn.functional.relu(self.c2(self.c1(x)) + x)
        return self.head(x.mean((2, 3)))


def tiny_resnet(in_channels, num_classes, input_size):
    """A residual CNN small enough for end-to-end CLI tests (a few seconds per run)."""
    return _TinyResNet(in_channels, num_classes)


class _SparseNet(nn.Module):
    """Every layer kind the block export handles: a 3x3 conv (+BN), a 1x1 conv with bias, two linear
    layers with sizes that are not multiples of the usual blocks, and the classifier."""

    def __init__(self, in_channels, num_classes, input_size):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 24, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(24)
        self.pw = nn.Conv2d(24, 40, 1)
        self.pool = nn.AvgPool2d(2)
        side = input_size // 2
        self.fc1 = nn.Linear(40 * (side // 2) ** 2 if side >= 2 else 40, 30)
        self.head = nn.Linear(30, num_classes)
        self.side = side

    def forward(self, x):
        x = nn.functional.relu(self.bn(self.conv(x)))
        x = self.pool(nn.functional.relu(self.pw(x)))
        if self.side >= 2:
            x = nn.functional.avg_pool2d(x, 2)
        return self.head(nn.functional.relu(self.fc1(x.flatten(1))))


def sparse_net(in_channels, num_classes, input_size):
    """A small net for block-sparse export tests (3x3 conv, BN, 1x1 conv, two linear layers)."""
    return _SparseNet(in_channels, num_classes, input_size)


def channel_run_folder(folder):
    """A finished channel run's folder written by hand (what hwprune export reads): plan.json and pruned.pt
    of small-resnet (digits, 8x8) with every prunable group at half width. Returns the dense model."""
    import numpy as np
    import torch

    from hwprune.apply.plan import Plan, apply_plan
    from hwprune.graph import discover_groups
    from hwprune.models import build_model

    model = build_model("small-resnet", in_channels=1, num_classes=10, input_size=8)
    groups = [g for g in discover_groups(model, torch.zeros(1, 1, 8, 8)) if g.prunable]
    plan = Plan.from_groups(groups, {g.name: np.arange(max(1, g.size // 2)) for g in groups}, (1, 1, 8, 8),
                            meta={"model": "small-resnet", "target": "host-cpu",
                                  "model_args": {"in_channels": 1, "num_classes": 10, "input_size": 8}})
    plan.save(folder / "plan.json")
    torch.save({"state_dict": apply_plan(model, plan).state_dict()}, folder / "pruned.pt")
    return model
