"""Plans: JSON round trip, replay onto a fresh model, clear errors when they do not fit."""

import copy
import json

import pytest
import torch

from hwprune.errors import PlanError
from hwprune.graph import discover_groups
from hwprune.apply.plan import Plan, apply_plan
from hwprune.apply.slicing import slice_model

from topologies import TOPOLOGIES, randomize_bn
from test_groups import random_keep


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_plan_replays_onto_a_fresh_model(name, tmp_path):
    cls, shape = TOPOLOGIES[name]
    torch.manual_seed(0)
    model = randomize_bn(cls()).eval()
    x = torch.randn(shape)
    groups = discover_groups(model, x)
    keep = random_keep(groups, 3)
    plan = Plan.from_groups(groups, keep, x.shape, meta={"model": name})
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.to_dict() == plan.to_dict()
    sliced = slice_model(copy.deepcopy(model), groups, keep)
    replayed = apply_plan(copy.deepcopy(model), loaded)
    assert [p.shape for p in replayed.parameters()] == [p.shape for p in sliced.parameters()]
    with torch.no_grad():
        torch.testing.assert_close(replayed(x), sliced(x))
    # the sliced model's state dict loads into the replayed architecture: save/load just works
    replayed.load_state_dict(sliced.state_dict())


def test_plan_for_another_model_is_rejected():
    a_cls, shape = TOPOLOGIES["residual"]
    b_cls, _ = TOPOLOGIES["concat"]
    x = torch.zeros(shape)
    groups = discover_groups(a_cls(), x)
    plan = Plan.from_groups(groups, random_keep(groups, 0), x.shape)
    with pytest.raises(PlanError, match="does not fit this model"):
        apply_plan(b_cls(), plan)


def test_malformed_plans(tmp_path):
    p = tmp_path / "plan.json"
    p.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(p)
    p.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(PlanError, match="not an hwprune plan"):
        Plan.load(p)
    p.write_text(json.dumps({"format": "hwprune-plan", "version": 1, "groups": [{"name": "x"}], "input_shape": [1]}))
    with pytest.raises(PlanError, match="malformed"):
        Plan.load(p)
    with pytest.raises(PlanError, match="cannot read"):
        Plan.load(tmp_path / "missing.json")
