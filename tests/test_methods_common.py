"""Every registered method: the defining behaviour of the baselines, and the budget contract for all.

The end-to-end test is parametrized over the registry, so a new method is covered the day it is
registered: it must run, end at exactly the budget, and export ONNX that matches torch.
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset

import hwprune
from hwprune.budget import Budget
from hwprune.budget.cost import count_flops, flops_model
from hwprune.data import load_dataset
from hwprune.graph import discover_groups
from hwprune.graph.groups import UnitIndex
from hwprune.models import build_model, list_models
from hwprune.training.pipeline import FitConfig
from hwprune.regularizers import REGISTRY, RegContext, build_regularizer
from hwprune.regularizers.baselines import near_zero_fraction
from hwprune.regularizers.scales import UnitScales
from hwprune.apply.slicing import slice_model
from hwprune.target import parse_target

from helpers_models import tiny_resnet

ONE = parse_target("name: one\ndevice: {name: cpu, arch: x86_64, local: true}\n"
                   "groups: {conv: {channels: 1}, linear: {neurons: 1}}\nruntime: {}\n")


def setup(model, x, target=ONE, keep=None, schedule=None):
    groups = discover_groups(model, x, target=target)
    index = UnitIndex(model, groups)
    ctx = RegContext(model, index, keep_units=keep or index.n_units // 2, schedule=schedule, total_steps=100)
    return groups, index, ctx


def test_uniform_keeps_the_same_fraction_everywhere_and_hits_flops():
    model = build_model("resnet20", in_channels=1, num_classes=10, input_size=16)
    x = torch.zeros(1, 1, 16, 16)
    groups, index, ctx = setup(model, x)
    reg = build_regularizer("uniform", ctx)
    cost = flops_model(model, (x,), groups)
    proj = reg.project(groups, Budget("flops", 0.5), cost)
    fractions = [len(proj.keep[g.name]) / g.size for g in groups if g.prunable]
    assert max(fractions) - min(fractions) <= 1 / 16 + 1e-9  # one unit of the narrowest group
    sliced = slice_model(copy.deepcopy(model), groups, proj.keep)
    assert count_flops(sliced, x) / count_flops(model, x) == pytest.approx(0.5, rel=0.01)


class _HandSet(nn.Module):
    """conv 1x1 (3 channels) -> BN -> ReLU -> mean -> fc1 (3 -> 2) -> ReLU -> fc2: two prunable groups (the
    conv's 3 channels, fc1's 2 neurons; fc2 is the output), every unit with 5 trainable entries, and
    weights chosen by hand so that each unit's root mean square is a whole number."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 3, 1, bias=False), nn.BatchNorm2d(3)
        self.fc1, self.fc2 = nn.Linear(3, 2), nn.Linear(2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 2.0, 1.0]).view(3, 1, 1, 1))
            self.bn.weight.copy_(torch.tensor([2.0, 6.0, 3.0]))
            self.bn.bias.copy_(torch.tensor([6.0, 9.0, 3.0]))
            self.bn.running_mean.fill_(100.0)  # statistics, not trainable entries: they must not count
            self.bn.running_var.fill_(100.0)
            self.fc1.weight.copy_(torch.tensor([[2.0, 0.0, 1.0], [0.0, 2.0, 0.0]]))
            self.fc1.bias.copy_(torch.tensor([6.0, 15.0]))
            self.fc2.weight.copy_(torch.tensor([[2.0, 4.0]]))
            self.fc2.bias.fill_(100.0)  # the output's own entries: in no unit

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


# Per unit: sqrt(sum of squares of its entries / 5), by hand.
#   channel 0: conv 1, bn 2 and 6, fc1 column (2, 0):  1 + 4 + 36 + 4 + 0 = 45  -> sqrt(9)  = 3
#   channel 1: conv 2, bn 6 and 9, fc1 column (0, 2):  4 + 36 + 81 + 0 + 4 = 125 -> sqrt(25) = 5
#   channel 2: conv 1, bn 3 and 3, fc1 column (1, 0):  1 + 9 + 9 + 1 + 0 = 20   -> sqrt(4)  = 2
#   neuron 0:  fc1 row (2, 0, 1), bias 6, fc2 2:       4 + 0 + 1 + 36 + 4 = 45  -> 3
#   neuron 1:  fc1 row (0, 2, 0), bias 15, fc2 4:      0 + 4 + 0 + 225 + 16 = 245 -> sqrt(49) = 7
HAND_SCORES = {"conv": [3.0, 5.0, 2.0], "fc1": [3.0, 7.0]}


def _by_group(index, scores):
    return {g.name: scores[a:b].tolist() for g, a, b in zip(index.groups, index.offsets[:-1], index.offsets[1:])}


def _approx(expected):
    return {name: pytest.approx(v, rel=1e-12) for name, v in expected.items()}


def test_magnitude_scores_are_the_root_mean_square_of_each_units_entries():
    model = _HandSet()
    groups, index, ctx = setup(model, torch.zeros(1, 1, 4, 4))
    reg = build_regularizer("magnitude", ctx)
    assert _by_group(index, reg.scores()) == _approx(HAND_SCORES)
    assert not reg.trains


def test_magnitude_mean_normalizer_divides_by_each_groups_mean():
    model = _HandSet()
    groups, index, ctx = setup(model, torch.zeros(1, 1, 4, 4))
    scaled = build_regularizer("magnitude", ctx, {"normalize": "mean"}).scores()
    # the channels' mean is (3 + 5 + 2) / 3 = 10/3, the neurons' (3 + 7) / 2 = 5 (of all five units: 4)
    assert _by_group(index, scaled) == _approx({"conv": [0.9, 1.5, 0.6], "fc1": [0.6, 1.4]})
    with pytest.raises(ValueError, match="normalize='max'.*none, mean"):
        build_regularizer("magnitude", ctx, {"normalize": "max"})


def test_group_lasso_prox_is_the_group_soft_threshold():
    torch.manual_seed(0)
    model = tiny_resnet(1, 10, 8)
    groups, index, ctx = setup(model, torch.zeros(1, 1, 8, 8))
    reg = build_regularizer("group-lasso", ctx, {"adaptive": False, "strength": 2.0})
    with torch.no_grad():  # spread the norms so that some units fall under the threshold
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.mul_(torch.linspace(0.01, 2, m.num_features))
    a = reg.unit_norms().double()
    protected = reg.protect.mask(a / reg.c)
    reg.after_step(lr=0.05, step=0)
    t = 0.05 * 2.0
    expected = torch.where(protected, a, (a - t * reg.c).clamp_min(0))
    torch.testing.assert_close(reg.unit_norms().double(), expected, rtol=1e-5, atol=1e-6)
    assert (reg.unit_norms()[~protected] == 0).any()


def test_slimming_penalty_is_l1_on_bn_scales():
    torch.manual_seed(0)
    model = tiny_resnet(1, 10, 8)
    groups, index, ctx = setup(model, torch.zeros(1, 1, 8, 8))
    reg = build_regularizer("slimming", ctx, {"strength": 0.01})
    reg.attach()
    model.zero_grad()
    reg.penalty().backward()
    bn = model.stem[1]
    torch.testing.assert_close(bn.weight.grad, 0.01 * torch.sign(bn.weight.detach()))


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_gates_where_units_have_no_bn_fold_into_the_weights():
    torch.manual_seed(0)
    model = _MLP()
    x = torch.randn(4, 6)
    groups, index, ctx = setup(model, x)
    scales = UnitScales(model, index)
    assert len(scales.gated_units) == index.n_units  # no BN anywhere: every unit is gated
    scales.attach()
    with torch.no_grad():
        scales.gates.copy_(torch.rand(len(scales.gates)) + 0.5)
        gated = model(x)
    scales.fold_gates()
    with torch.no_grad():
        torch.testing.assert_close(model(x), gated)  # same function, gates now inside the weights


def test_deephoyer_penalty_is_scale_invariant():
    torch.manual_seed(0)
    model = _MLP()
    groups, index, ctx = setup(model, torch.randn(2, 6))
    reg = build_regularizer("deephoyer", ctx, {"strength": 1.0})
    before = float(reg.penalty().detach())
    with torch.no_grad():
        for p in index.producer_tensors():
            p.mul_(7.0)
    assert float(reg.penalty().detach()) == pytest.approx(before, rel=1e-5)
    # a sparser network has a lower Group-HS
    with torch.no_grad():
        model.a.weight[:6] = 0
        model.a.bias[:6] = 0
    assert float(reg.penalty().detach()) < before


def test_near_zero_fraction():
    scores = np.array([0.0, 0.01, 0.02, 1.0, 1.2, 0.9])
    assert near_zero_fraction(scores, keep=3) == pytest.approx(0.5)
    assert near_zero_fraction(scores, keep=3, rel=0.001) == pytest.approx(1 / 6)


@pytest.fixture(scope="module")
def small_digits():
    data = load_dataset("digits")
    return Subset(data.train, list(range(320))), Subset(data.test, list(range(120)))


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_meets_the_budget_and_exports(method, small_digits, tmp_path):
    train, test = small_digits
    torch.manual_seed(0)
    cfg = FitConfig(budget=Budget("sparsity", 0.5), method=method, epochs_dense=1, epochs_regularize=1,
                    epochs_finetune=1, latency_repeats=5)
    res = hwprune.fit(tiny_resnet(1, 10, 8), train, test_data=test, target="host-cpu", config=cfg,
                      out_dir=tmp_path / "run", progress=None, measure=False)
    # 32 units (two groups of 16), multiples of 8: exactly 16 removed
    assert res.report.get("achieved.sparsity") == 0.5 and res.report.get("projection.removed_units") == 16
    assert res.report.get("onnx.max_abs_diff") < 1e-4
    assert res.report.get("params.pruned") < res.report.get("params.dense")


@pytest.mark.slow
@pytest.mark.parametrize("model_name", list_models())
@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_on_every_builtin_model(method, model_name, small_digits, tmp_path):
    train, test = small_digits
    torch.manual_seed(0)
    net = build_model(model_name, in_channels=1, num_classes=10, input_size=8, width=0.25)
    for budget in (Budget("flops", 0.5), Budget("params", 0.5)):
        cfg = FitConfig(budget=budget, method=method, epochs_dense=1, epochs_regularize=1, epochs_finetune=1)
        res = hwprune.fit(copy.deepcopy(net), train, test_data=test, target=ONE, config=cfg,
                          out_dir=tmp_path / budget.kind, progress=None, measure=False)
        assert abs(res.report.get(f"achieved.{budget.kind}") - 0.5) <= 0.02
        # float32 rounding grows with the logits' size (a briefly trained VGG's reach the hundreds)
        x = torch.stack([torch.as_tensor(test[i][0]) for i in range(64)])
        with torch.no_grad():
            scale = float(res.model.eval()(x).abs().max())
        assert res.report.get("onnx.max_abs_diff") < 1e-5 * max(10.0, scale)
