"""Ye et al. (2018): ISTA on BN γ with per-layer penalties, the γ–W rescaling, folding constant channels."""

import copy

import pytest
import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.graph import discover_groups
from hwprune.graph.groups import UnitIndex
from hwprune.models import build_model
from hwprune.regularizers import make_config
from hwprune.regularizers.fold import bn_after, fold_removed_constants, homogeneous_units
from hwprune.apply.slicing import mask_model, slice_model
from hwprune.training.loop import TrainSettings, make_optimizer

from helpers_models import tiny_resnet
from methods_helpers import randomize_bn, regularizer


def _reader_net(k, bias, bn_after_reader):
    """conv3x3 -> BN -> ReLU -> conv kxk (the reader) [-> BN] -> ReLU -> pool -> linear."""
    layers = [nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
              nn.Conv2d(6, 5, k, padding=k // 2, bias=bias)]
    layers += [nn.BatchNorm2d(5)] if bn_after_reader else []
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)]
    return randomize_bn(nn.Sequential(*layers))


def _remove_constant_channels(net, x):
    """γ = 0 on channels 1 and 4 (constant relu(β) outputs), fold, mask: returns (before, after, groups, keep)."""
    with torch.no_grad():
        net[1].weight[[1, 4]] = 0.0
        net[1].bias[1], net[1].bias[4] = 0.7, -0.3  # relu(β): 0.7 and 0
    net.eval()
    groups = discover_groups(net, x[:1])
    index = UnitIndex(net, groups)
    group = next(g for g in groups if g.prunable and g.name == "0")
    before = net(x).detach()
    removed = torch.zeros(index.n_units, dtype=torch.bool)
    removed[[1, 4]] = True
    report = fold_removed_constants(net, index, removed, x, bn_after(net))
    keep = {group.name: [0, 2, 3, 5]}
    mask_model(net, groups, keep)
    return before, net(x).detach(), groups, keep, report


@pytest.mark.parametrize("bias, bn_next, where", [(True, False, "bias"), (False, True, "running_mean of 4")])
def test_folding_a_constant_channel_into_a_1x1_reader_leaves_the_output_unchanged(bias, bn_next, where):
    torch.manual_seed(0)
    net = _reader_net(1, bias, bn_next)
    unfolded = copy.deepcopy(net)
    x = torch.randn(8, 2, 6, 6)
    before, after, groups, keep, report = _remove_constant_channels(net, x)
    assert report.folded == {"3": where} and report.unfolded == [] and report.max_std == 0.0
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    sliced = copy.deepcopy(net)
    slice_model(sliced, groups, keep)
    assert sliced[3].in_channels == 4
    torch.testing.assert_close(sliced(x), before, rtol=0, atol=1e-6)
    # without the fold the constant relu(0.7) of channel 1 is lost
    with torch.no_grad():
        unfolded[1].weight[[1, 4]] = 0.0
        unfolded[1].bias[1], unfolded[1].bias[4] = 0.7, -0.3
    mask_model(unfolded.eval(), groups, keep)
    assert float((unfolded(x).detach() - before).abs().max()) > 1e-3


def test_folding_into_a_3x3_reader_is_exact_inside_and_approximate_at_the_zero_padded_border():
    torch.manual_seed(0)
    net = _reader_net(3, True, False)
    x = torch.randn(8, 2, 6, 6)
    with torch.no_grad():
        net[1].weight[[1, 4]] = 0.0
        net[1].bias[1] = 0.7
    net.eval()
    ref = net[:4](x).detach()  # the reader's output
    groups = discover_groups(net, x[:1])
    index = UnitIndex(net, groups)
    removed = torch.zeros(index.n_units, dtype=torch.bool)
    removed[[1, 4]] = True
    fold_removed_constants(net, index, removed, x, bn_after(net))
    mask_model(net, groups, {"0": [0, 2, 3, 5]})
    out = net[:4](x).detach()
    torch.testing.assert_close(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], rtol=0, atol=1e-5)
    assert float((out - ref).abs().max()) > 1e-3  # the border taps saw zero padding, not 0.7


@pytest.mark.parametrize("model", ["tiny", "small-resnet", "vgg16-bn"])
def test_gamma_w_rescaling_preserves_the_function_and_is_undone(model):
    torch.manual_seed(0)
    net = tiny_resnet(1, 10, 8) if model == "tiny" else build_model(model, in_channels=1, num_classes=10, input_size=8)
    randomize_bn(net).eval()
    x = torch.randn(4, 1, 8, 8)
    ref = net(x).detach()
    original = copy.deepcopy(net.state_dict())
    reg, groups, index = regularizer(net, x[:1], "ista-bn", {"alpha": 0.3})
    assert bool(reg.rescaled.all())  # ReLU networks: every unit qualifies
    reg.attach()
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert float(bn.weight.detach().abs().max()) < 0.3 * 1.6  # γ really were scaled
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
    reg.attach(resumed=True)  # a resumed run must not scale again
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)
    reg.finalize(groups, {})
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, original[k], rtol=1e-6, atol=1e-6)


def test_rescaling_skips_units_behind_a_non_homogeneous_activation():
    torch.manual_seed(0)
    net = build_model("mobilenetv2", in_channels=1, num_classes=10, input_size=8)
    randomize_bn(net).eval()
    x = torch.randn(2, 1, 8, 8)
    groups = discover_groups(net, x[:1])
    index = UnitIndex(net, groups)
    ok = index.split(homogeneous_units(net, index))
    # expansion channels pass ReLU6 (and a depthwise conv + BN) before their reader: left alone
    assert not bool(ok["blocks.1.conv.0"].any())
    # the linear bottleneck streams reach their readers through adds only: rescaled
    assert bool(ok["blocks.1.conv.6"].all())
    ref = net(x).detach()
    reg, _, _ = regularizer(net, x[:1], "ista-bn", {"alpha": 0.5})
    reg.attach()
    torch.testing.assert_close(net(x), ref, rtol=1e-5, atol=1e-5)


def test_ista_step_soft_thresholds_with_the_official_layer_penalties_and_no_momentum():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 5, 1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    randomize_bn(net)
    x = torch.randn(4, 2, 6, 6)
    reg, _, _ = regularizer(net, x[:1], "ista-bn", {"strength": 0.5, "adaptive": False})
    reg.attach()
    (group,) = reg.param_groups()
    assert group["momentum"] == 0.0 and group["weight_decay"] == 0.0
    assert {id(p) for p in group["params"]} == {id(net[1].weight), id(net[4].weight)}
    opt = make_optimizer(net, TrainSettings(), reg.no_weight_decay(), reg.extra_parameters(), reg.param_groups())
    assert any(g["momentum"] == 0.0 and net[1].weight in g["params"] for g in opt.param_groups)
    net.train()
    net(x)  # the first forward records the geometry
    g1, g4 = net[1].weight.detach().clone(), net[4].weight.detach().clone()
    reg.after_step(0.1, 0)
    # λ_l = (H·W + k·k·c_in) / (input H·W): (36 + 9·2)/36 = 1.5 and (36 + 1·4)/36 = 10/9, then mean 1
    lam = torch.tensor([1.5] * 4 + [10 / 9] * 5, dtype=torch.float64)
    lam = lam / lam.mean()
    torch.testing.assert_close(reg.layer_penalty, lam)
    thr = 0.1 * 0.5 * lam
    expected = torch.cat([g1, g4]).double()
    expected = torch.sign(expected) * (expected.abs() - thr).clamp_min(0)
    protected = reg.protect.mask(torch.as_tensor(reg.scores()))  # the top unit of each group is kept as is
    expected[protected] = torch.cat([g1, g4]).double()[protected]
    torch.testing.assert_close(torch.cat([net[1].weight, net[4].weight]).detach().double(), expected)


def test_finalize_folds_the_constants_of_the_removed_units():
    torch.manual_seed(0)
    net = _reader_net(1, True, False)
    x = torch.randn(8, 2, 6, 6)
    reg, groups, index = regularizer(net, x[:1], "ista-bn", {"alpha": 0.5})
    reg.attach()
    net.train()
    net(x)  # a training batch: what the fold measures the constants on
    with torch.no_grad():
        net[1].weight[[1, 4]] = 0.0
        net[1].bias[1] = 0.35  # after the α rescaling: relu(0.35 / 0.5) = 0.7 once undone
    net.eval()
    ref = net(x).detach()
    keep = {"0": [0, 2, 3, 5], "3": list(range(5))}
    reg.finalize(groups, keep)
    assert reg.fold_report.folded == {"3": "bias"}
    mask_model(net, groups, keep)
    torch.testing.assert_close(net(x), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("options, message", [
    ({"alpha": 0}, "ista-bn alpha 0: expected a positive number"),
    ({"strength": -1}, "ista-bn strength -1: expected a positive number"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(HwpruneError, match=message):
        make_config("ista-bn", options)
