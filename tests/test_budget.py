"""Cost models and the projection: exact budgets, hardware rounding, reachable ranges."""

import copy

import numpy as np
import pytest
import torch

from hwprune.budget import Budget, check_budget, project, reachable
from hwprune.budget.cost import count_flops, count_params, flops_model, params_model
from hwprune.errors import BudgetError
from hwprune.graph import discover_groups
from hwprune.models import build_model
from hwprune.apply.slicing import slice_model
from hwprune.target import parse_target

from topologies import TOPOLOGIES


def target(multiple):
    return parse_target(
        f"name: t\ndevice: {{name: x, arch: x86_64}}\ngroups: {{conv: {{channels: {multiple}}}, "
        f"linear: {{neurons: {multiple}}}}}\nruntime: {{}}\n"
    )


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_cost_models_predict_the_sliced_model(name):
    """FLOPs and params predicted from kept units equal the counts of the actually sliced model."""
    cls, shape = TOPOLOGIES[name]
    model = cls().eval()
    x = torch.randn(shape)
    groups = discover_groups(model, x)
    fm, pm = flops_model(model, (x,), groups), params_model(model, groups)
    n = fm.A.shape[1]
    assert fm(np.ones(n)) == pytest.approx(count_flops(model, x))
    assert pm(np.ones(n)) == pytest.approx(count_params(model))
    rng = np.random.default_rng(1)
    proj = project(groups, rng.random(n), Budget("sparsity", 0.3) if n > 3 else Budget("sparsity", 0.0))
    sliced = slice_model(copy.deepcopy(model), groups, proj.keep)
    assert fm(proj.keep_mask) == pytest.approx(count_flops(sliced, x))
    assert pm(proj.keep_mask) == pytest.approx(count_params(sliced))


def resnet_groups(multiple):
    model = build_model("resnet20", in_channels=3, num_classes=10, input_size=16)
    x = torch.zeros(1, 3, 16, 16)
    return model, x, discover_groups(model, x, target=target(multiple))


@pytest.mark.parametrize("s", [0.1, 0.33, 0.5, 0.7, 0.85])
def test_sparsity_is_exact_without_multiples(s):
    model, x, groups = resnet_groups(1)
    n = sum(g.size for g in groups if g.prunable)
    scores = np.random.default_rng(0).random(n)
    proj = project(groups, scores, Budget("sparsity", s))
    assert proj.removed_units == round(s * n)
    assert proj.achieved == round(s * n) / n


def test_sparsity_rounds_to_the_nearest_count_multiples_allow():
    model, x, groups = resnet_groups(8)
    prunable = [g for g in groups if g.prunable]
    n = sum(g.size for g in prunable)
    proj = project(groups, np.random.default_rng(0).random(n), Budget("sparsity", 0.7))
    for g in prunable:
        kept = len(proj.keep[g.name])
        assert kept % 8 == 0 or kept == g.size
        assert kept >= g.min_keep
    assert proj.removed_units % 8 == 0
    assert abs(proj.removed_units - 0.7 * n) <= 4  # the nearest multiple of 8


@pytest.mark.parametrize("policy", ["learned", "global", "uniform"])
def test_low_scores_go_first(policy):
    """Within a group the lowest scores go under every policy; under ``learned`` scores are also
    compared across groups (a global threshold)."""
    model, x, groups = resnet_groups(1)
    prunable = [g for g in groups if g.prunable]
    n = sum(g.size for g in prunable)
    scores = np.random.default_rng(5).random(n)
    proj = project(groups, scores, Budget("sparsity", 0.6), allocation=policy)
    offsets = np.cumsum([0] + [g.size for g in prunable])
    worst_removed = max(scores[~proj.keep_mask])
    for g, off in zip(prunable, offsets):
        s = scores[off: off + g.size]
        kept = np.zeros(g.size, bool)
        kept[proj.keep[g.name]] = True
        if (~kept).any():
            assert s[kept].min() >= s[~kept].max()  # within a group, the lowest scores go
        if kept.sum() > g.min_keep and policy == "learned":
            # a group above its minimum keeps nothing worse than what was removed anywhere
            assert s[kept].min() >= worst_removed


@pytest.mark.parametrize("f", [0.3, 0.5, 0.75])
def test_flops_budget_within_one_percent(f):
    model, x, groups = resnet_groups(1)
    fm = flops_model(model, (x,), groups)
    n = fm.A.shape[1]
    proj = project(groups, np.random.default_rng(2).random(n), Budget("flops", f), fm)
    sliced = slice_model(copy.deepcopy(model), groups, proj.keep)
    achieved = count_flops(sliced, x) / count_flops(model, x)
    assert abs(achieved - f) <= 0.01 * f
    assert proj.achieved == pytest.approx(achieved)


def test_params_budget():
    model, x, groups = resnet_groups(1)
    pm = params_model(model, groups)
    n = pm.A.shape[1]
    proj = project(groups, np.random.default_rng(3).random(n), Budget("params", 0.4), pm)
    sliced = slice_model(copy.deepcopy(model), groups, proj.keep)
    assert count_params(sliced) / count_params(model) == pytest.approx(0.4, rel=0.01)


def test_unreachable_budgets_are_rejected_with_the_range():
    model, x, groups = resnet_groups(8)
    fm = flops_model(model, (x,), groups)
    lo, hi = reachable(groups, Budget("sparsity", 0.5))
    with pytest.raises(BudgetError, match=r"Reachable range: \[0, 0\.\d+\]"):
        check_budget(groups, Budget("sparsity", min(0.999, hi + 0.01)))
    flo, _ = reachable(groups, Budget("flops", 0.5), fm)
    with pytest.raises(BudgetError, match="Reachable range"):
        check_budget(groups, Budget("flops", flo / 2), fm)


@pytest.mark.parametrize("kind, value", [("sparsity", 1.0), ("sparsity", -0.1), ("flops", 0.0), ("flops", 1.5),
                                         ("params", float("nan")), ("latency", -1.0), ("speed", 0.5)])
def test_invalid_budget_values(kind, value):
    with pytest.raises(BudgetError):
        Budget(kind, value)
