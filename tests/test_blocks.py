"""Weight blocks as units: geometry and edge blocks, the index WGSEF and the projection use, block plans."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from hwprune.graph.blocks import BlockGroup, BlockIndex, block_groups, mask_blocks
from hwprune.budget.allocation import POLICIES, build_problem, solve_units
from hwprune.budget import Budget, project
from hwprune.budget.projection import _target_and_cost, _unit_steps
from hwprune.errors import BudgetError, ModelError, PlanError
from hwprune.training.pipeline import FitConfig
from hwprune.apply.plan import Plan, apply_plan
from hwprune.regularizers import RegContext, SparsitySchedule, build_regularizer
from hwprune.target import parse_target

from helpers_models import sparse_net


def block_target(rows, cols, conv=True):
    conv_line = f"conv: {{channels: 1, blocks: [{rows}, {cols}]}}, " if conv else "conv: {channels: 1}, "
    return parse_target(f"name: blk\ndevice: {{name: cpu, arch: x86_64, local: true}}\ngroups: {{{conv_line}"
                        f"linear: {{neurons: 1, blocks: [{rows}, {cols}]}}}}\nruntime: {{}}\n")


def net_and_groups(rows=4, cols=3, **kw):
    torch.manual_seed(0)
    model = sparse_net(3, 5, 8)
    groups, skipped = block_groups(model, torch.zeros(1, 3, 8, 8), block_target(rows, cols), **kw)
    return model, groups, skipped


def test_layers_and_edge_blocks():
    model, groups, skipped = net_and_groups(4, 3)
    by = {g.name: g for g in groups}
    # conv 3x3 as its im2col matrix (24, 3*9); 24 rows = 6 block rows; 27 cols = 9 block cols
    assert by["conv"].matrix == (24, 27) and by["conv"].grid == (6, 9)
    # fc1: 30 rows -> 8 block rows, the last one holds 2 rows; 160 cols, the last block col 1 col
    fc1 = by["fc1"]
    assert fc1.matrix == (30, 160) and fc1.grid == (8, 54)
    sizes = fc1.block_sizes().reshape(fc1.grid)
    assert sizes[0, 0] == 12 and sizes[-1, 0] == 2 * 3 and sizes[0, -1] == 4 * 1 and sizes[-1, -1] == 2
    assert sizes.sum() == 30 * 160  # every weight is in exactly one block
    assert skipped == {"head": "writes the model output"}
    # the classifier comes back on request, and excluded layers stay dense
    _, groups2, skipped2 = net_and_groups(4, 3, include_output=True, exclude=["pw"])
    assert "head" in {g.name for g in groups2} and skipped2 == {"pw": "excluded"}


def test_grouped_convs_and_undeclared_kinds_stay_dense():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 36, 3))
    groups, skipped = block_groups(model, torch.zeros(1, 4, 8, 8), block_target(4, 1, conv=True))
    assert [g.name for g in groups] == ["1"] and "grouped" in skipped["0"]
    with pytest.raises(ModelError, match="no layer can be cut into weight blocks"):
        block_groups(model, torch.zeros(1, 4, 8, 8), block_target(4, 1, conv=False), exclude=["1"])


def test_index_norms_scaling_and_masks_match_the_weights():
    model, groups, _ = net_and_groups(4, 3)
    index = BlockIndex(model, groups)
    assert index.n_units == sum(g.size for g in groups)
    norms = index.sq_norms()
    for g, (a, b) in zip(index.groups, zip(index.offsets[:-1], index.offsets[1:])):
        (o, k), (r, c) = g.matrix, g.block
        w = model.get_submodule(g.name).weight.detach().reshape(o, k)
        for u in [0, g.size // 2, g.size - 1]:  # first, middle, last (an edge block)
            i, j = divmod(u, g.grid[1])
            torch.testing.assert_close(norms[a + u], w[i * r:(i + 1) * r, j * c:(j + 1) * c].pow(2).sum())
    assert index.sizes().sum() == sum(np.prod(g.matrix) for g in groups)
    keep = torch.rand(index.n_units) < 0.5
    index.mask_(keep)
    after = index.sq_norms()
    assert (after[~keep] == 0).all() and torch.allclose(after[keep], norms[keep])


def test_wgsef_prox_zeroes_whole_blocks_and_projection_is_exact():
    model, groups, _ = net_and_groups(4, 3)
    index = BlockIndex(model, groups)
    n = index.n_units
    proj0 = project(groups, index.sq_norms().sqrt().double().numpy(), Budget("sparsity", 0.7))
    schedule = SparsitySchedule(proj0.removed_units / n, 10, ramp=0.5)
    ctx = RegContext(model, index, keep_units=n - proj0.removed_units, total_steps=10, schedule=schedule)
    # a fixed, strong λ: the prox alone (no training) must zero whole blocks, never more than n - k
    reg = build_regularizer("wgsef", ctx, {"adaptive": False, "strength": 20.0})
    before = index.sq_norms()
    for step in range(10):
        reg.after_step(0.05, step)
    after = index.sq_norms()
    zero = after == 0
    assert 0.3 < zero.double().mean() and int(zero.sum()) <= n - reg.k
    assert (after <= before + 1e-6).all()  # a prox only shrinks
    # whole blocks are zero: every weight of a zero block is exactly 0
    for g, a in zip(index.groups, index.offsets):
        w = model.get_submodule(g.name).weight.detach()
        mask = g.expand(zero[a:a + g.size].to(w.dtype)).bool()
        assert (w[mask] == 0).all()
    proj = project(groups, reg.scores(), Budget("sparsity", 0.7))
    assert proj.removed_units == round(0.7 * n) and proj.achieved == round(0.7 * n) / n
    for g in groups:
        assert len(proj.keep[g.name]) >= 1  # no layer disappears


@pytest.mark.parametrize("ties", [False, True])
def test_fast_projection_equals_the_exact_programme(ties):
    """The one-sort path for blocks (multiple 1, ``learned``) removes the same number of units and keeps
    the same total score as the exact dynamic programme over every group's kept count."""
    rng = np.random.default_rng(int(ties))
    for _ in range(60):
        gs = [BlockGroup(f"g{i}", (int(rng.integers(1, 30)), int(rng.integers(1, 20))),
                         (int(rng.integers(1, 5)), int(rng.integers(1, 4))), "linear") for i in range(rng.integers(1, 5))]
        gs = [g for g in gs if g.prunable]
        if not gs:
            continue
        offsets = np.concatenate([[0], np.cumsum([g.size for g in gs])])
        n = int(offsets[-1])
        scores = rng.integers(0, 4, n).astype(float) if ties else rng.random(n)
        s = float(rng.choice([0.1, 0.33, 0.5, 0.7, 0.9]))
        reach = 1 - sum(g.min_keep for g in gs) / n
        if s > reach:
            continue
        target, cost = _target_and_cost(Budget("sparsity", s), n, None)
        problem = build_problem(gs, scores, "sparsity", target, cost)
        counts, status, _ = solve_units(problem, POLICIES["learned"].values(problem, None), target)
        fast = _unit_steps(gs, offsets, scores, target)
        assert status == "exact"
        assert n - fast[0].sum() == n - sum(counts)
        slow_kept = sum(np.sort(scores[offsets[i]:offsets[i + 1]])[::-1][:c].sum() for i, c in enumerate(counts))
        assert scores[fast[0].astype(bool)].sum() == pytest.approx(slow_kept)


def test_block_plan_round_trips_and_replays_as_a_mask(tmp_path):
    model, groups, _ = net_and_groups(4, 3)
    index = BlockIndex(model, groups)
    proj = project(groups, np.random.default_rng(0).random(index.n_units), Budget("sparsity", 0.6))
    plan = Plan.from_groups(groups, proj.keep, (1, 3, 8, 8), meta={"note": "test"})
    assert plan.granularity == "blocks" and plan.groups[0].block == [4, 3]
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.to_dict() == plan.to_dict() and json.loads((tmp_path / "plan.json").read_text())["granularity"] == "blocks"
    masked = mask_blocks(copy.deepcopy(model), groups, proj.keep)
    replayed = apply_plan(copy.deepcopy(model), loaded)
    for name, p in masked.state_dict().items():
        torch.testing.assert_close(replayed.state_dict()[name], p)  # same zeros, same shapes
    w = replayed.fc1.weight
    assert w.shape == model.fc1.weight.shape and (w == 0).float().mean() > 0.3
    # a plan for other blocks or another model is refused with every problem named
    bad = Plan.from_dict(json.loads((tmp_path / "plan.json").read_text().replace("[\n        4,\n        3\n      ]", "[8, 1]")))
    with pytest.raises(PlanError, match="blocks of 8x1 in the model"):
        apply_plan(copy.deepcopy(model), bad)
    with pytest.raises(PlanError, match="layer 'fc1' is not in the model"):
        apply_plan(nn.Sequential(nn.Conv2d(3, 24, 3)), loaded)


def test_block_runs_take_a_sparsity_budget():
    with pytest.raises(BudgetError, match="block run takes --sparsity"):
        FitConfig(budget=Budget("flops", 0.5), granularity="blocks")
    with pytest.raises(Exception, match="granularity 'rows'"):
        FitConfig(budget=Budget("sparsity", 0.5), granularity="rows")
