"""A new user's own model and data: the layers other pruning tools trip on, and the mistakes a user makes.

The model below has them all (Hardswish/SiLU, cat of branches, a depthwise and a grouped conv, an SE gate,
a learnable per-channel scale read in forward, a block that returns a tuple, a module called twice, a
one-channel spatial attention map, nn.Identity, view): it must be found, pruned, sliced exactly and
exported. Each bad input must end in one clear error, never a traceback.
"""

import copy
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import one_line_error
from hwprune.apply.slicing import mask_model, slice_model
from hwprune.errors import DataError, ModelError
from hwprune.graph import discover_groups
from hwprune.target import parse_target

from topologies import random_keep, randomize_bn

TARGET = parse_target("name: t\ndevice: {name: x, arch: x86_64}\ngroups: {conv: {channels: 8}, linear: {neurons: 8}}\n"
                      "runtime: {}\n")


class Scale(nn.Module):
    """A learnable per-channel scale used directly in forward (a layer scale)."""

    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)

    def forward(self, x):
        return x * self.gamma


class SE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class TupleBlock(nn.Module):
    """Returns a tuple; its caller drops the statistic."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        y = F.hardswish(self.bn(self.conv(x)))
        return y, y.mean()


def _cbr(i, o, k=3, groups=1, act=nn.ReLU):
    return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(o), act())


class Walkthrough(nn.Module):
    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.stem = _cbr(in_channels, 32, act=nn.Hardswish)
        self.b1, self.b2 = _cbr(32, 16, 1, act=nn.SiLU), _cbr(32, 16)
        self.dw = _cbr(32, 32, groups=32, act=nn.Hardswish)
        self.se = SE(32)
        self.pw = _cbr(32, 48, 1)
        self.gc = _cbr(48, 48, groups=4)
        self.scale = Scale(48)
        self.tb = TupleBlock(48)
        self.shared = _cbr(48, 48)
        self.attn = nn.Conv2d(48, 1, 1)
        self.idn = nn.Identity()
        self.fc1, self.act, self.head = nn.Linear(48 * 4, 64), nn.Hardswish(), nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x)], dim=1)
        x = self.se(self.dw(x)) + x
        x = self.scale(self.gc(self.pw(x)))
        x, _ = self.tb(x)
        x = self.shared(x)
        x = self.shared(x) + x
        x = self.idn(x * torch.sigmoid(self.attn(x)))
        x = F.adaptive_avg_pool2d(x, 2)
        return self.head(self.act(self.fc1(x.view(x.size(0), -1))))


def _group_of(groups, layer):
    return next(g for g in groups if any(m.module == layer and m.role in ("producer", "normalized") for m in g.members))


def _sliced_equals_masked(model, x, groups, seed=0):
    keep = random_keep(groups, seed)
    masked = mask_model(copy.deepcopy(model), groups, keep)
    sliced = slice_model(copy.deepcopy(model), groups, keep)
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(sliced(x), masked(x), rtol=1e-5, atol=1e-5)
    return sliced, keep


def test_the_walkthrough_model_is_pruned_sliced_exactly_and_exports(tmp_path):
    from hwprune.runtimes.onnxruntime import export_onnx, onnx_max_abs_diff

    torch.manual_seed(0)
    model = randomize_bn(Walkthrough()).eval()
    x = torch.randn(4, 1, 8, 8)
    groups = discover_groups(model, x[:1], target=TARGET)
    # every layer keeps its width only for a reason that cannot be helped
    assert set(groups.unpruned) == {"se.fc1", "attn", "head"}, groups.unpruned
    sliced, keep = _sliced_equals_masked(model, x, groups)
    path = export_onnx(sliced, x[:1], tmp_path / "m.onnx")
    assert onnx_max_abs_diff(path, sliced, x) < 1e-4


def test_a_one_channel_map_broadcast_over_the_channels_couples_none_of_them():
    """``x * sigmoid(conv_to_1_channel(x))``: the map's one channel was unioned with all 48, making them one unit."""
    model = randomize_bn(Walkthrough()).eval()
    groups = discover_groups(model, torch.zeros(1, 1, 8, 8), target=TARGET)
    g = _group_of(groups, "shared.0")
    assert g.size == 48 and g.prunable and "attn.weight:1" in g.signature
    assert _group_of(groups, "attn").size == 1


def test_a_per_channel_parameter_read_in_forward_is_sliced_with_its_channels():
    model = randomize_bn(nn.Sequential(_cbr(1, 16), Scale(16), nn.Conv2d(16, 4, 1))).eval()
    x = torch.randn(2, 1, 8, 8)
    groups = discover_groups(model, x[:1])
    g = _group_of(groups, "0.0")
    assert g.prunable and "1.gamma:1" in g.signature, (g.blocked, g.signature)
    sliced, keep = _sliced_equals_masked(model, x, groups)
    assert sliced[1].gamma.shape == (1, len(keep[g.name]), 1, 1)


class _Stat(nn.Module):
    def __init__(self, use: str):
        super().__init__()
        self.use = use
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        m = y.mean(1, keepdim=True)
        if self.use == "in place":
            y.div_(m + 10)
        elif self.use == "output":
            y = y + m
        return self.b(y)


def test_a_statistic_the_output_never_uses_blocks_nothing():
    """A reduction over the channels blocks them only when the output depends on it (also through an in-place op)."""
    model = randomize_bn(Walkthrough()).eval()
    assert _group_of(discover_groups(model, torch.zeros(1, 1, 8, 8)), "tb.conv").prunable  # `x, _ = self.tb(x)`
    assert _group_of(discover_groups(_Stat("dropped"), torch.zeros(1, 1, 8, 8)), "a").prunable
    for use in ("in place", "output"):
        g = _group_of(discover_groups(_Stat(use), torch.zeros(1, 1, 8, 8)), "a")
        assert not g.prunable and "reduces over the channel axis" in g.blocked


def test_a_grouped_conv_keeps_whole_conv_groups_in_the_hardware_multiple():
    """48 channels in 4 conv groups of 12: the target's multiple 8 means an even number of conv groups (24
    channels), not 8 conv groups (96 channels, more than there are: nothing could be pruned)."""
    model = randomize_bn(nn.Sequential(_cbr(1, 48, 1), _cbr(48, 48, groups=4), nn.Conv2d(48, 4, 1))).eval()
    x = torch.randn(2, 1, 8, 8)
    groups = discover_groups(model, x[:1], target=TARGET)
    g = _group_of(groups, "0.0")
    assert g.size == 4 and g.multiple == 2 and g.allowed_keep_counts() == [2, 4]
    sliced = slice_model(copy.deepcopy(model), groups, {g.name: [0, 3]})
    assert sliced[1][0].out_channels == 24 and sliced[1][0].groups == 2
    masked = mask_model(copy.deepcopy(model), groups, {g.name: [0, 3]})
    with torch.no_grad():
        torch.testing.assert_close(sliced(x), masked(x), rtol=1e-5, atol=1e-5)


def test_a_forward_that_fails_on_the_data_names_the_layer_and_prints_no_traceback(capfd):
    model = Walkthrough(in_channels=3)
    with pytest.raises(ModelError) as e:
        discover_groups(model, torch.zeros(1, 1, 8, 8))
    msg = str(e.value)
    assert "layer 'stem.0' (Conv2d)" in msg and "(1, 1, 8, 8)" in msg and "to have 3 channels" in msg, msg
    assert "While executing" not in msg and "ShapeProp" not in msg
    assert "Traceback" not in capfd.readouterr().err


def test_an_unknown_layer_is_named_with_its_class_and_the_exclude_that_keeps_it():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ChannelShuffle(2), nn.Conv2d(8, 4, 1))
    with pytest.raises(ModelError) as e:
        discover_groups(model, torch.zeros(1, 1, 8, 8))
    assert "layer '1' (ChannelShuffle) is not supported" in str(e.value) and "--exclude 1" in str(e.value)


MODELS = """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, in_channels, classes, out="tensor"):
            super().__init__()
            self.out = out
            self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
            self.fc = nn.Linear(8, classes)

        def forward(self, x):
            y = self.fc(self.conv(x).mean((2, 3)))
            return {"logits": y, "aux": y.sum()} if self.out == "dict" else (y, y.sum()) if self.out == "tuple" else y

    def returns_dict(in_channels, num_classes):
        return Net(in_channels, num_classes, "dict")

    def returns_tuple(in_channels, num_classes):
        return Net(in_channels, num_classes, "tuple")

    def rgb_only(num_classes):
        return Net(3, num_classes)

    def ignores_num_classes(in_channels, num_classes):
        return Net(in_channels, 5)
"""


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    (tmp_path / "net.py").write_text(textwrap.dedent(MODELS))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _fit(fn):
    return ["fit", "--target", "host-cpu", "--flops", "0.5", "--model", f"./net.py:{fn}", "--data", "digits",
            "--epochs", "1", "1", "1", "--no-latency", "--quiet", "--out", f"runs/{fn}"]


@pytest.mark.parametrize("fn, needles", [
    ("returns_dict", ["returns a dict with keys 'logits', 'aux'", "one tensor of logits, shape (N, 10)"]),
    ("returns_tuple", ["returns a tuple of 2 items", "Return the logits from forward"]),
    ("ignores_num_classes", ["shape (2, 5)", "expected (2, 10)", "num_classes outputs"]),
])
def test_a_model_that_does_not_return_logits_for_the_data_is_one_error(user_dir, capsys, fn, needles):
    one_line_error(capsys, _fit(fn), "net.py:" + fn, *needles)


def test_the_python_api_refuses_a_model_that_returns_a_dict_before_training(user_dir):
    """hwprune.fit on a model of one's own (no model function, so no check when it is built) crashed in the
    first training step with torch's cross_entropy traceback."""
    import hwprune
    from hwprune.data import load_dataset

    data = load_dataset("digits")
    user_code: dict = {}
    exec(textwrap.dedent(MODELS), user_code)
    net = user_code["Net"](1, 10, "dict")
    with pytest.raises(ModelError, match="returns a dict with keys 'logits', 'aux'; a classifier must return one tensor"):
        hwprune.fit(net, data.train, test_data=data.test, target="host-cpu", flops=0.5, out_dir=str(user_dir / "api"))
    assert not (user_dir / "api" / "checkpoint.pt").exists()


def test_a_model_that_fails_on_the_datas_images_names_the_layer_and_the_users_line(user_dir, capsys):
    from hwprune.cli.main import main

    assert main(_fit("rgb_only")) == 2
    err = capsys.readouterr().err
    assert err.startswith("hwprune: error: ") and err.count("hwprune: error") == 1, err
    assert "at layer 'conv' (Conv2d)" in err and "to have 3 channels" in err and "inputs of shape (1, 8, 8)" in err
    assert "net.py\", line" in err and "site-packages" not in err and "Traceback" not in err, err


def test_an_image_folder_with_too_few_images_in_a_class_names_the_class_folder(tmp_path):
    from PIL import Image

    from hwprune.data import load_dataset

    for cls, n in (("cat", 4), ("dog", 1)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    with pytest.raises(DataError, match="class 'dog' has 1"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_a_budget_the_model_cannot_meet_names_the_layers_that_keep_their_width():
    """"--flops 0.5 cannot be met ... keeps 0.92" said nothing of why: the layers that stay, and their causes,
    are what the user can change."""
    from hwprune.budget import Budget
    from hwprune.budget.cost import flops_model
    from hwprune.budget.projection import check_budget
    from hwprune.errors import BudgetError

    class Stat(nn.Module):  # reads its input's channel mean into the output: the stem's channels cannot go
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(1, 32, 3, padding=1)
            self.body = nn.Conv2d(32, 32, 3, padding=1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            y = self.stem(x)
            y = y + y.mean(1, keepdim=True)
            return self.fc(self.body(y).mean((2, 3)))

    net = Stat()
    target = parse_target("name: t\ndevice: {name: cpu, arch: x86_64, local: true}\n"
                          "groups: {conv: {channels: 8}, linear: {neurons: 8}}\nruntime: {onnxruntime: {}}\n")
    x = torch.zeros(1, 1, 8, 8)
    groups = discover_groups(net, (x,), target=target)
    with pytest.raises(BudgetError) as err:
        check_budget(groups, Budget("flops", 0.05), flops_model(net, (x,), groups))
    text = str(err.value)
    assert "cannot be met" in text and "These layers keep their output width:" in text
    assert "  - stem: " in text and "reduces over the channel axis" in text
    assert "  - fc:" not in text  # the classifier's output is the model's in every model: not worth naming


def test_a_model_onnx_cannot_hold_is_refused_before_training(tmp_path, capsys):
    """A model with an op ONNX lacks (nn.ChannelShuffle) trained every stage and failed only at the final
    export; the run ends with model.onnx, so the dense model is exported once before any training."""
    from hwprune.cli.main import main

    (tmp_path / "shuffle.py").write_text(textwrap.dedent("""
        from torch import nn

        def make(in_channels, num_classes):
            return nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),        # prunable
                                 nn.Conv2d(32, 16, 3, padding=1), nn.ChannelShuffle(2), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
    """))
    out = tmp_path / "run"
    assert main(["fit", "--target", "host-cpu", "--sparsity", "0.5", "--model", f"{tmp_path / 'shuffle.py'}:make",
                 "--exclude", "3", "--no-latency", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "checked before training: ONNX export failed" in captured.err and "aten::channel_shuffle" in captured.err
    assert "epoch" not in captured.out and not (out / "checkpoint.pt").exists()
