"""Layers as model libraries write them (issue 14): subclasses with their own forward, functional
layers on a module's parameters, untraceable activations, split sizes in an attribute, channel
shuffles, pixel shuffles, and a reason for every layer that is not pruned.

Every model here is checked the way the topology tests check theirs: the sliced model computes exactly
what the masked model computes. The expected groups come from reading the model by hand.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwprune.apply.slicing import mask_model, slice_model
from hwprune.budget import Budget
from hwprune.budget.projection import check_budget
from hwprune.errors import BudgetError, ModelError
from hwprune.graph import discover_groups
from topologies import random_keep, randomize_bn


def _sliced_equals_masked(model, x, seed=0):
    model = randomize_bn(model.eval())
    groups = discover_groups(model, x)
    keep = random_keep(groups, seed)
    assert keep, "nothing to prune"
    sliced = slice_model(copy.deepcopy(model), groups, keep)
    masked = mask_model(copy.deepcopy(model), groups, keep)
    with torch.no_grad():
        torch.testing.assert_close(sliced(x), masked(x), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in model.parameters())
    return groups


def _group_of(groups, layer):
    return next(g for g in groups if any(m.module == layer and m.role != "consumer" for m in g.members))


# --- subclasses of standard layers with their own forward ----------------------------------------

class SameConv(nn.Conv2d):
    """efficientnet-pytorch's Conv2dStaticSamePadding in four lines."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride)


class DynamicSameConv(nn.Conv2d):
    """geffnet's Conv2dSame: the padding is computed from the input size (not traceable by fx)."""

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        pad_h = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pad_w = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class WSConv(nn.Conv2d):
    """Weight-standardised conv: each filter is normalised over its inputs and kernel."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_same_padding_conv_subclass_is_a_conv():
    # The reproduction: two such convs around a BatchNorm gave zero groups and no word of why.
    model = nn.Sequential(SameConv(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), SameConv(8, 4, 3))
    groups = _sliced_equals_masked(model, torch.randn(2, 3, 8, 8))
    g = _group_of(groups, "0")
    assert g.prunable and g.size == 8
    assert {m.key for m in g.members} >= {"0.weight:0", "1.weight:0", "3.weight:1"}


def test_data_dependent_padding_conv_and_depthwise_subclass():
    model = nn.Sequential(DynamicSameConv(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU6(),
                          DynamicSameConv(8, 8, 3, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
                          DynamicSameConv(8, 4, 1))
    groups = _sliced_equals_masked(model, torch.randn(2, 3, 9, 9))
    # the depthwise conv's channels are the stem's: one group of 8
    assert [g.size for g in groups if g.prunable] == [8]


def test_weight_standardised_conv_keeps_its_inputs_but_prunes_its_filters():
    # Removing an input channel of a WS conv changes every filter's mean and std: its inputs must stay.
    # Its own filters are normalised one by one: they can go.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), WSConv(8, 6, 3, padding=1),
                          nn.GroupNorm(6, 6), nn.ReLU(), nn.Conv2d(6, 4, 1))
    groups = _sliced_equals_masked(model, torch.randn(2, 3, 6, 6))
    stem, ws = _group_of(groups, "0"), _group_of(groups, "2")
    assert not stem.prunable and "removing its input channels" in stem.blocked and "'2'" in stem.blocked
    assert ws.prunable and ws.size == 6


# --- untraceable activations ---------------------------------------------------------------------

@torch.jit.script
def _hard_swish_jit(x):
    return x * (x + 3).clamp(min=0, max=6).div(6.0)


class HardSwishMe(nn.Module):
    """geffnet's jit-scripted activation: fx cannot pass a Proxy into a scripted function."""

    def forward(self, x):
        return _hard_swish_jit(x)


class _SwishFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        s = torch.sigmoid(x)
        return g * (s * (1 + x * (1 - s)))


class MemoryEfficientSwish(nn.Module):
    """efficientnet-pytorch's custom-autograd activation."""

    def forward(self, x):
        return _SwishFn.apply(x)


@torch.jit.script
def _flip_channels(x):
    return x.flip(1)


class Flip(nn.Module):
    def forward(self, x):
        return _flip_channels(x)


@pytest.mark.parametrize("act, probed", [(HardSwishMe, True), (MemoryEfficientSwish, False)])
def test_library_activations_pass_channels(act, probed):
    """The jit-scripted one cannot be traced: it becomes a leaf and is probed. The custom autograd one is
    traced (fx records the ops of its forward)."""
    from hwprune.graph.trace import trace

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), act(), nn.Conv2d(8, 4, 1), act(),
                          nn.Flatten(), nn.Linear(4 * 36, 3))
    groups = _sliced_equals_masked(model, torch.randn(2, 3, 8, 8))
    assert [g.size for g in groups if g.prunable] == [8, 4]
    assert (act.__name__ in trace(model, (torch.randn(1, 3, 8, 8),)).meta["untraced"]) == probed


class BatchNormAct(nn.BatchNorm2d):
    """timm-style BatchNorm with its activation inside its forward."""

    def forward(self, x):
        return F.relu(super().forward(x))


def test_batchnorm_subclass_with_its_own_forward_is_a_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct(8), nn.Conv2d(8, 4, 1))
    groups = _sliced_equals_masked(model, torch.randn(2, 3, 8, 8))
    stem = _group_of(groups, "0")
    assert stem.prunable and {"1.weight:0", "1.running_mean:0", "2.weight:1"} <= {m.key for m in stem.members}


def test_untraceable_module_that_reorders_channels_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), Flip(), nn.Conv2d(8, 4, 1))
    with pytest.raises(ModelError) as e:
        discover_groups(model, torch.randn(1, 3, 8, 8))
    msg = str(e.value)
    assert "'1'" in msg and "reorders channels" in msg and "--exclude 1" in msg
    groups = discover_groups(model, torch.randn(1, 3, 8, 8), exclude=["1"])
    assert not _group_of(groups, "0").prunable


# --- functional layers on a module's parameters --------------------------------------------------

class FConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(cout))

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, 1, 1)


class FBatchNorm(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c))
        self.register_buffer("mean", torch.randn(c))
        self.register_buffer("var", torch.rand(c) + 0.5)

    def forward(self, x):
        return F.batch_norm(x, self.mean, self.var, self.weight, self.bias, False)


class FLinear(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.randn(cout, cin)), nn.Parameter(torch.randn(cout))

    def forward(self, x):
        return F.linear(x, self.w, self.b)


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = FConv(3, 8), FBatchNorm(8), FConv(8, 6)
        self.fc1, self.fc2 = FLinear(6, 10), FLinear(10, 2)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = F.relu(self.c2(x)).mean((2, 3))
        return self.fc2(F.relu(self.fc1(x)))


def test_functional_layers_on_parameters_are_followed():
    groups = _sliced_equals_masked(FunctionalNet(), torch.randn(2, 3, 8, 8))
    assert {g.name: g.size for g in groups if g.prunable} == {"c1": 8, "c2": 6, "fc1": 10}
    c1 = _group_of(groups, "c1")
    assert {m.key for m in c1.members} == {"c1.weight:0", "c1.bias:0", "bn.weight:0", "bn.bias:0", "bn.mean:0",
                                           "bn.var:0", "c2.weight:1"}


def test_functional_conv_on_a_computed_weight_names_the_layer():
    class Flipped(FConv):
        def forward(self, x):
            return F.conv2d(x, self.weight.flip(0), self.bias, 1, 1)

    with pytest.raises(ModelError) as e:
        discover_groups(nn.Sequential(Flipped(3, 8), nn.Conv2d(8, 2, 1)), torch.randn(1, 3, 8, 8))
    assert "layer '0'" in str(e.value) and "computed in the forward" in str(e.value)


# --- mixed-kernel convs: split sizes in a layer attribute ----------------------------------------

class MixedConv(nn.Module):
    """geffnet's MixedConv2d: split the channels by ``self.splits``, one conv per piece, concatenate."""

    def __init__(self, channels, kernels=(3, 5)):
        super().__init__()
        self.splits = [channels - channels // 2 * (len(kernels) - 1)] + [channels // 2] * (len(kernels) - 1)
        self.convs = nn.ModuleList(nn.Conv2d(c, c, k, padding=k // 2, groups=c) for c, k in zip(self.splits, kernels))

    def forward(self, x):
        parts = torch.split(x, self.splits, 1)
        return torch.cat([conv(parts[i]) for i, conv in enumerate(self.convs)], 1)


def test_mixed_kernel_conv_prunes_each_piece_and_rewrites_the_split_sizes():
    model = nn.Sequential(nn.Conv2d(3, 10, 1), nn.BatchNorm2d(10), nn.ReLU(), MixedConv(10), nn.BatchNorm2d(10),
                          nn.ReLU(), nn.Conv2d(10, 4, 1))
    model = randomize_bn(model.eval())
    x = torch.randn(2, 3, 8, 8)
    groups = _sliced_equals_masked(model, x)
    # each piece (5 + 5 channels) is its own group: one piece can never lose all its channels
    assert sorted(g.size for g in groups if g.prunable) == [5, 5]
    keep = {g.name: [0, 2] for g in groups if g.prunable}
    sliced = slice_model(copy.deepcopy(model), groups, keep)
    assert sliced[3].splits == [2, 2] and sliced(x).shape == (2, 4, 8, 8)


def test_split_at_sizes_that_are_no_attribute_keeps_the_channels_and_says_why():
    class HardSplit(nn.Module):
        def forward(self, x):
            a, b = torch.split(x, [3, 5], 1)
            return torch.cat([a.relu(), b.sigmoid()], 1)

    groups = discover_groups(nn.Sequential(nn.Conv2d(3, 8, 1), HardSplit(), nn.Conv2d(8, 2, 1)), torch.randn(1, 3, 4, 4))
    assert "fixed sizes" in _group_of(groups, "0").blocked


# --- channel shuffles and pixel shuffles ---------------------------------------------------------

def test_channel_shuffle_couples_channel_k_of_both_halves():
    # ShuffleNet v2 with 2 groups interleaves [a_0, b_0, a_1, b_1, ...]. Pruning keeps 2 rows, so a
    # position k is dropped from both halves at once: a_k (stem channel k, and its partner k + 8 from
    # the chunk) lives or dies with b_k (the branch's output channel k).
    from topologies import ShuffleUnit

    groups = _sliced_equals_masked(ShuffleUnit(), torch.randn(2, 3, 8, 8))
    stem = _group_of(groups, "stem.0")
    assert stem.prunable and stem.size == 8
    assert {"stem.0.weight:0", "branch.5.weight:0", "branch.0.weight:1", "head.weight:1"} <= {m.key for m in stem.members}
    stem_units = next(m for m in stem.members if m.key == "stem.0.weight:0").unit_of
    assert list(stem_units[:8]) == list(stem_units[8:])  # channel k and k + 8 are one unit


def test_view_with_the_channel_count_as_a_constant_blocks_with_the_fix():
    class Hardcoded(nn.Module):
        def forward(self, x):
            return x.view(x.size(0), 8, -1).mean(-1)

    groups = discover_groups(nn.Sequential(nn.Conv2d(3, 8, 1), Hardcoded(), nn.Linear(8, 2)), torch.randn(1, 3, 4, 4))
    assert "as a constant (8)" in _group_of(groups, "0").blocked


@pytest.mark.parametrize("functional", [False, True])
def test_pixel_shuffle_prunes_whole_output_channels(functional):
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.shuffle = nn.PixelShuffle(2)
            self.out = nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = self.conv(x)
            y = F.pixel_shuffle(y, 2) if functional else self.shuffle(y)
            return self.out(y.relu())

    groups = _sliced_equals_masked(Up(), torch.randn(2, 3, 4, 4))
    conv = _group_of(groups, "conv")
    assert conv.size == 4  # 16 conv channels, 4 per output channel of the shuffle
    assert list(next(m for m in conv.members if m.key == "conv.weight:0").unit_of) == [u for u in range(4) for _ in range(4)]


def test_pixel_unshuffle_repeats_each_channel():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.PixelUnshuffle(2), nn.Conv2d(16, 2, 1))
    groups = _sliced_equals_masked(model, torch.randn(2, 3, 4, 4))
    assert _group_of(groups, "0").size == 4


# --- never silent ----------------------------------------------------------------------------------

def test_every_layer_that_keeps_its_width_has_a_reason():
    class Ein(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 3))

        def forward(self, x):
            return torch.einsum("bchw,oc->bohw", x, self.weight)

    model = nn.Sequential(Ein(), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 64, 10))
    groups = discover_groups(model, torch.randn(1, 3, 8, 8))
    assert "einsum" in groups.unpruned["0"] and "its parameter '0.weight'" in groups.unpruned["0"]
    assert groups.unpruned["4"] == "its output is the model output"
    assert "2" not in groups.unpruned  # the 1x1 conv is prunable


def test_no_prunable_groups_names_each_layer_and_its_cause():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1))
    groups = discover_groups(model, torch.randn(1, 3, 8, 8), exclude=["2"])
    with pytest.raises(BudgetError) as e:
        check_budget(groups, Budget("sparsity", 0.5))
    msg = str(e.value)
    assert "- 0: excluded layer '2'" in msg and "- 4: its output is the model output" in msg
    assert "- 2: excluded with --exclude" in msg  # the user's own choice is listed too, not only its effect


# --- latency profiles of library convs ---------------------------------------------------------------

@pytest.mark.parametrize("side, stride", [(9, 2), (8, 2), (8, 1)])
def test_profile_shape_of_a_conv_that_pads_in_its_forward(side, stride):
    """The latency profile times a plain conv per layer shape. A same-padding conv's `padding` attribute
    is 0 (it pads in its forward), so the shape must come from what it computes: a plain conv with the
    recorded kernel, stride, padding and input size gives the library conv's output size. (By hand:
    9 -> 5 at stride 2 pads 1 each side; 8 -> 4 pads 0 + 1, profiled as a 9x9 input without padding.)"""
    from hwprune.latency.shapes import layer_uses

    model = nn.Sequential(DynamicSameConv(3, 8, 3, stride=stride), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(1, 3, side, side)
    groups = discover_groups(model, x)
    use = next(u for u in layer_uses(model, x, groups)[0] if u.name == "0")
    expected = {(9, 2): ([1, 1], [9, 9]), (8, 2): ([0, 0], [9, 9]), (8, 1): ([1, 1], [8, 8])}[(side, stride)]
    assert (use.shape["padding"], use.shape["input_hw"]) == expected
    plain = nn.Conv2d(3, 8, 3, stride=stride, padding=tuple(use.shape["padding"]))
    assert plain(torch.zeros(1, 3, *use.shape["input_hw"])).shape == model[0](x).shape


def test_indexing_a_split_channel_axis_keeps_those_channels():
    """view(B, 2, C/2, H, W)[:, 0] picks half the channels through a split axis: hwprune does not follow
    it, so the channels are kept (blocked, with the op named), never silently lost."""
    class Half(nn.Module):
        def forward(self, x):
            b, c, h, w = x.size()
            return x.view(b, 2, c // 2, h, w)[:, 0]

    model = nn.Sequential(nn.Conv2d(3, 8, 1), Half(), nn.Conv2d(4, 2, 1))
    groups = discover_groups(model, torch.randn(1, 3, 4, 4))
    stem = _group_of(groups, "0")
    assert not stem.prunable and "getitem" in stem.blocked


def test_a_model_output_with_its_channel_axis_split_keeps_its_channels():
    class Grouped(nn.Module):
        def forward(self, x):
            b, c, h, w = x.size()
            return x.view(b, 2, c // 2, h, w)

    groups = discover_groups(nn.Sequential(nn.Conv2d(3, 8, 1), Grouped()), torch.randn(1, 3, 4, 4))
    assert _group_of(groups, "0").blocked == "model output"
