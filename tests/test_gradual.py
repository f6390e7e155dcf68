"""Gradual magnitude pruning: the cubic schedule of Zhu & Gupta (2017), cuts chosen by the group norm,
and the cut units held at zero. Expected values are worked by hand on test_methods_common's _HandSet
(unit scores conv 3, 5, 2 and fc1 3, 7)."""

import pytest
import torch

from hwprune.errors import HwpruneError
from hwprune.graph import discover_groups
from hwprune.graph.groups import UnitIndex
from hwprune.regularizers import RegContext, build_regularizer

from test_methods_common import ONE, _HandSet


def _gradual(planned_keep, total_steps=8, **options):
    model = _HandSet()
    groups = discover_groups(model, torch.zeros(1, 1, 4, 4), target=ONE)
    index = UnitIndex(model, groups)
    ctx = RegContext(model, index, keep_units=sum(planned_keep or [0]), total_steps=total_steps,
                     planned_keep=planned_keep)
    return model, build_regularizer("gradual", ctx, options)


def _zero_units(model):
    """Units whose every trainable entry is zero, read from the layers (not from the index)."""
    conv = [c for c in range(3) if model.conv.weight[c].abs().sum() == 0 and model.bn.weight[c] == 0
            and model.bn.bias[c] == 0 and model.fc1.weight[:, c].abs().sum() == 0]
    fc1 = [n for n in range(2) if model.fc1.weight[n].abs().sum() == 0 and model.fc1.bias[n] == 0
           and model.fc2.weight[0, n] == 0]
    return {"conv": conv, "fc1": fc1}


def test_the_cut_follows_the_cubic_schedule_lowest_norms_first():
    # planned: conv keeps 1 of 3, fc1 keeps 1 of 2; the whole cut by step 8, a cut every 2 steps
    model, reg = _gradual([1, 1], total_steps=8, end=1.0, every=2)
    reg.after_step(lr=0.1, step=0)  # 1 step done: not a cut step
    assert _zero_units(model) == {"conv": [], "fc1": []}
    # 2 of 8 steps: 1 - (3/4)^3 = 0.578 of the cut. conv: 3 - round(0.578 * 2) = 2 kept, the score-2 channel
    # goes; fc1: 2 - round(0.578 * 1) = 1 kept, the score-3 neuron goes.
    reg.after_step(lr=0.1, step=1)
    assert _zero_units(model) == {"conv": [2], "fc1": [0]}
    # 4 of 8: 1 - (1/2)^3 = 0.875: conv keeps 3 - round(1.75) = 1, its best channel (score 5)
    reg.after_step(lr=0.1, step=3)
    assert _zero_units(model) == {"conv": [0, 2], "fc1": [0]}


def test_cut_units_stay_zero_after_the_optimizer_moves_them():
    model, reg = _gradual([1, 1], total_steps=4, end=0.5, every=1)
    reg.after_step(lr=0.1, step=1)  # step 2 of 2: the whole cut
    assert _zero_units(model) == {"conv": [0, 2], "fc1": [0]}
    with torch.no_grad():  # what an SGD step with weight decay and momentum would do to them
        for p in model.parameters():
            p.add_(0.01)
    reg.after_step(lr=0.1, step=2)
    assert _zero_units(model) == {"conv": [0, 2], "fc1": [0]}
    state = reg.state_dict()
    model2, reg2 = _gradual([1, 1], total_steps=4, end=0.5, every=1)
    reg2.load_state_dict(state)
    reg2.after_step(lr=0.1, step=2)  # a resumed run holds the same cut without re-choosing it
    assert _zero_units(model2) == {"conv": [0, 2], "fc1": [0]}


def test_settings_and_missing_plan_are_clear_errors():
    with pytest.raises(HwpruneError, match="end=1.5; expected a fraction"):
        _gradual([1, 1], end=1.5)
    with pytest.raises(HwpruneError, match="every=0"):
        _gradual([1, 1], every=0)
    with pytest.raises(HwpruneError, match="needs the run's per-group plan"):
        _gradual(None)
