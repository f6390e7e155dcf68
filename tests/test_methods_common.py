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
from hwprune.cost import count_flops, flops_model
from hwprune.data import load_dataset
from hwprune.graph import discover_groups
from hwprune.groups import CONSUMER, NORMALIZED, PRODUCER, UnitIndex
from hwprune.models import build_model, list_models
from hwprune.pipeline import FitConfig
from hwprune.regularizers import REGISTRY, RegContext, SparsitySchedule, build_regularizer
from hwprune.regularizers.baselines import near_zero_fraction
from hwprune.regularizers.scales import UnitScales
from hwprune.slicing import slice_model
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


def test_magnitude_scores_are_group_norms_per_entry():
    torch.manual_seed(0)
    model = tiny_resnet(1, 10, 8)
    groups, index, ctx = setup(model, torch.zeros(1, 1, 8, 8))
    reg = build_regularizer("magnitude", ctx)
    roles = (PRODUCER, NORMALIZED, CONSUMER)
    expected = (index.sq_norms(roles) / index.sizes(roles)).sqrt().double().numpy()
    np.testing.assert_allclose(reg.scores(), expected)
    assert not reg.trains


def test_magnitude_mean_normalizer_divides_by_each_groups_mean():
    torch.manual_seed(0)
    model = tiny_resnet(1, 10, 8)
    groups, index, ctx = setup(model, torch.zeros(1, 1, 8, 8))
    raw = build_regularizer("magnitude", ctx).scores()
    scaled = build_regularizer("magnitude", ctx, {"normalize": "mean"}).scores()
    for a, b in zip(index.offsets[:-1], index.offsets[1:]):
        np.testing.assert_allclose(scaled[a:b], raw[a:b] / raw[a:b].mean())
    assert len(index.offsets) > 2 and not np.allclose(scaled, raw)  # several groups, and it changed them
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
    assert res.report.get("achieved.sparsity") == 0.5  # 48 units, multiples of 8: exactly 24 removed
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
