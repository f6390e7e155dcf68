"""Group discovery and slicing: for every topology, the sliced model equals the masked model."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from hwprune.errors import ModelError
from hwprune.graph import discover_groups
from hwprune.apply.slicing import mask_model, slice_model
from hwprune.target import parse_target

from topologies import TOPOLOGIES, Residual, random_keep, randomize_bn


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
@pytest.mark.parametrize("seed", [0, 1])
def test_sliced_equals_masked(name, seed):
    cls, shape = TOPOLOGIES[name]
    torch.manual_seed(seed)
    model = randomize_bn(cls(), seed).eval()
    x = torch.randn(shape)
    groups = discover_groups(model, x)
    assert any(g.prunable for g in groups), "every topology has something to prune"
    keep = random_keep(groups, seed)
    masked = mask_model(copy.deepcopy(model), groups, keep)
    sliced = slice_model(copy.deepcopy(model), groups, keep)
    n_masked = sum(p.numel() for p in masked.parameters())
    n_sliced = sum(p.numel() for p in sliced.parameters())
    assert n_sliced < n_masked
    with torch.no_grad():
        torch.testing.assert_close(sliced(x), masked(x), rtol=1e-5, atol=1e-5)
    # Masking really changed the function (so the comparison above is not vacuous).
    with torch.no_grad():
        assert not torch.allclose(model(x), masked(x), atol=1e-4)


def _group(groups, name):
    return next(g for g in groups if g.name == name)


def test_residual_stream_is_one_group():
    model = Residual()
    groups = discover_groups(model, torch.zeros(1, 3, 8, 8))
    stream = _group(groups, "stem")
    keys = set(stream.signature)
    # the stem, the block's second conv and BN write the stream; the first conv of both blocks reads it
    assert {"stem.weight:0", "bn.weight:0", "c2.weight:0", "b2.bias:0", "c1.weight:1", "d1.weight:1", "short.0.weight:1"} <= keys
    stage2 = _group(groups, "d2")
    assert {"d2.weight:0", "short.0.weight:0", "short.1.weight:0", "fc.weight:1"} <= set(stage2.signature)
    assert _group(groups, "fc").blocked == "model output"
    assert not _group(groups, "fc").prunable


def test_depthwise_joins_its_producer():
    cls, shape = TOPOLOGIES["depthwise"]
    groups = discover_groups(cls(), torch.zeros(shape))
    expand = _group(groups, "expand.0")
    assert {"dw.0.weight:0", "dw.1.weight:0", "project.0.weight:1"} <= set(expand.signature)


def test_grouped_conv_units_are_whole_conv_groups():
    cls, shape = TOPOLOGIES["grouped"]
    groups = discover_groups(cls(), torch.zeros(shape))
    # 4 conv groups: each unit of the c1 stream is 4 input channels of g and its 6 outputs
    c1 = _group(groups, "c1")
    assert c1.size == 4
    g_out = next(m for m in c1.members if m.key == "g.weight:0")
    assert np.bincount(g_out.unit_of).tolist() == [6, 6, 6, 6]


def test_flatten_repeats_channels_into_linear_inputs():
    cls, shape = TOPOLOGIES["concat"]
    groups = discover_groups(cls(), torch.zeros(shape))
    mix = _group(groups, "mix")
    fc_in = next(m for m in mix.members if m.key == "fc.weight:1")
    assert np.array_equal(fc_in.unit_of, np.repeat(np.arange(16), 16))
    # the two concatenated branches stay separate groups, each also feeding mix
    a, b = _group(groups, "a.0"), _group(groups, "b.0")
    assert (a.size, b.size) == (8, 12)
    assert "mix.weight:1" in a.signature and "mix.weight:1" in b.signature


def test_target_sets_multiples_and_rounding():
    target = parse_target(
        "name: t\ndevice: {name: x, arch: x86_64}\ngroups: {conv: {channels: 8}, linear: {neurons: 4}}\nruntime: {}\n"
    )
    cls, shape = TOPOLOGIES["squeeze-excite"]
    groups = discover_groups(cls(), torch.zeros(shape), target=target)
    conv = _group(groups, "conv")
    assert conv.multiple == 8 and conv.allowed_keep_counts() == [8, 16]
    fc1 = _group(groups, "fc1")
    assert fc1.multiple == 4 and fc1.allowed_keep_counts() == [4, 8, 12, 16, 20, 24, 28, 32]
    assert fc1.round_keep(13.9) == 12 and fc1.round_keep(14) == 16 and fc1.min_keep == 4


def test_exclude_keeps_layers_and_reports_every_miss():
    model = Residual()
    x = torch.zeros(1, 3, 8, 8)
    groups = discover_groups(model, x, exclude=["c1"])
    assert "c1" in _group(groups, "b1").blocked  # c1 is a black box: its BN names the group
    assert "c1" in _group(groups, "stem").blocked  # c1 reads the stream: it keeps its inputs too
    with pytest.raises(ModelError) as e:
        discover_groups(model, x, exclude=["nope", "c*", "also_nope"])
    assert "nope" in str(e.value) and "also_nope" in str(e.value) and "c*" not in str(e.value).split("match")[0]


class _Roll(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.inner = nn.Sequential(nn.Conv2d(8, 8, 1))

    def forward(self, x):
        return torch.roll(self.inner(self.conv(x)), 1, dims=1)


class _Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _RollBlock()
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.block(x))


class _RollBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return torch.roll(self.conv(x), 1, dims=1)


def test_unsupported_op_names_module_and_op_and_exclude_fixes_it():
    with pytest.raises(ModelError) as e:
        discover_groups(_Wrapper(), torch.zeros(1, 3, 8, 8))
    msg = str(e.value)
    assert "block" in msg and "roll" in msg and "--exclude block" in msg
    groups = discover_groups(_Wrapper(), torch.zeros(1, 3, 8, 8), exclude=["block"])
    assert all(not g.prunable for g in groups)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _Branchy()

    def forward(self, x):
        return self.body(x)


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return self.conv(-x)


def test_untraceable_control_flow_names_the_module():
    with pytest.raises(ModelError) as e:
        discover_groups(_Untraceable(), torch.zeros(1, 3, 4, 4))
    assert "'body'" in str(e.value) and "--exclude body" in str(e.value)
    groups = discover_groups(_Untraceable(), torch.zeros(1, 3, 4, 4), exclude=["body"])
    assert groups == [] or all(not g.prunable for g in groups)


class _BranchesInItsOwnForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return y * 2 if y.sum() > 0 else y


def test_untraceable_forward_of_the_model_itself_says_what_to_do():
    """No layer to exclude there: the advice is to move the branch into a submodule (which becomes a leaf)."""
    with pytest.raises(ModelError) as e:
        discover_groups(_BranchesInItsOwnForward(), torch.zeros(1, 3, 4, 4))
    assert "the model's own forward (_BranchesInItsOwnForward)" in str(e.value)
    assert "--exclude" not in str(e.value) and "submodule" in str(e.value)


def test_unknown_builtin_layer_is_an_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(2), nn.LSTM(16, 8))
    with pytest.raises(ModelError) as e:
        discover_groups(model, torch.zeros(1, 3, 4, 4))
    assert "LSTM" in str(e.value)


def test_layernorm_over_channels_blocks_pruning():
    model = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    groups = discover_groups(model, torch.zeros(2, 4))
    assert "LayerNorm" in _group(groups, "0").blocked
    assert _group(groups, "2").prunable


class _FixedSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 12, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        a, b = torch.split(self.c(x), 6, dim=1)
        return self.fc((a + b).mean((2, 3)))


def test_split_at_fixed_sizes_blocks_the_channels():
    groups = discover_groups(_FixedSplit(), torch.zeros(1, 3, 4, 4))
    assert "fixed sizes" in _group(groups, "c").blocked
