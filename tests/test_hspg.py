"""WGSEF + HSPG (METHODS.md §1.8): the WGSEF gradient on the support and the half-space step."""

import pytest
import torch

from hwprune.errors import HwpruneError
from hwprune.regularizers import make_config
from hwprune.regularizers.base import MinWidthGuard
from hwprune.regularizers.hspg import HalfSpaceStep, wgsef_grad_coeff
from hwprune.regularizers.wgsef_math import wgsef_value

from methods_helpers import conv_bn_net, randomize_bn, regularizer


@pytest.mark.parametrize("seed", range(6))
def test_the_wgsef_gradient_matches_finite_differences(seed):
    g = torch.Generator().manual_seed(seed)
    m, k = 9, 1 + seed % 4
    a = torch.rand(m, generator=g, dtype=torch.float64) * 3 + 0.1
    w = torch.rand(m, generator=g, dtype=torch.float64) + 0.5
    c = wgsef_grad_coeff(a, w, k)
    # d/da_i of WGSEF(a) (= c_i·a_i, the gradient's norm along θ_i/‖θ_i‖), by central differences
    h = 1e-6
    for i in range(m):
        e = torch.zeros(m, dtype=torch.float64)
        e[i] = h
        fd = (wgsef_value(a + e, w, k) - wgsef_value(a - e, w, k)) / (2 * h)
        assert float(c[i] * a[i]) == pytest.approx(float(fd), rel=1e-5, abs=1e-7)


def test_the_half_space_step_zeroes_groups_that_leave_their_half_space_and_keeps_zeros_at_zero():
    torch.manual_seed(0)
    net = randomize_bn(conv_bn_net(channels=6))
    reg, groups, index = regularizer(net, torch.zeros(1, 1, 6, 6), "wgsef", {"hspg": True})
    bn = net[1]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 0.8, 0.0, 0.6, 0.9, 1.2]))
        bn.bias.copy_(torch.tensor([0.5, -0.2, 0.0, 0.1, 0.3, 0.4]))
    guard = MinWidthGuard(index)
    hs = HalfSpaceStep(index, torch.ones(6, dtype=torch.float64), k=6, guard=guard, epsilon=0.5)
    hs.remember()  # θ_t: unit 2 is a zero group
    prev_w, prev_b = bn.weight.detach().clone(), bn.bias.detach().clone()
    with torch.no_grad():  # what an optimizer step could do
        bn.weight[2], bn.bias[2] = 0.3, -0.1  # the zero group moved: must go back to zero
        bn.weight[1], bn.bias[1] = 0.1, 0.3  # ⟨θ̃, θ⟩ = 0.08 - 0.06 < 0.5·‖θ‖² = 0.34: leaves its half-space
        bn.weight[3] += 0.05  # an ordinary step
    lr, lam = 0.1, 0.2
    cur_w, cur_b = bn.weight.detach().clone(), bn.bias.detach().clone()
    assert hs.step(lr, lam)
    # k ≥ number of groups: every group is 'full', ∇WGSEF = w²·θ_t; unit 5, the largest, is the
    # group's hardware minimum width: no regularizer acts on it (as in the proximal stage)
    exp_w = cur_w - lr * lam * prev_w
    exp_b = cur_b - lr * lam * prev_b
    exp_w[5], exp_b[5] = cur_w[5], cur_b[5]
    exp_w[[1, 2]] = 0
    exp_b[[1, 2]] = 0
    torch.testing.assert_close(bn.weight.detach(), exp_w)
    torch.testing.assert_close(bn.bias.detach(), exp_b)
    assert hs.last_zeroed == 1
    # zero groups stay zero on the next step too
    with torch.no_grad():
        bn.weight[[1, 2]] = 0.4
    hs.step(lr, lam)
    assert float(bn.weight[1].detach()) == 0 and float(bn.weight[2].detach()) == 0


def test_the_protected_unit_of_a_group_is_never_zeroed():
    net = randomize_bn(conv_bn_net(channels=3))
    reg, groups, index = regularizer(net, torch.zeros(1, 1, 6, 6), "wgsef", {"hspg": True})
    bn = net[1]
    hs = HalfSpaceStep(index, torch.ones(3, dtype=torch.float64), k=3, guard=MinWidthGuard(index), epsilon=0.99)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, 0.5, 0.4]))
        bn.bias.zero_()
    hs.remember()
    with torch.no_grad():
        bn.weight.mul_(0.5)  # every group shrinks: all leave the ε = 0.99 half-space
    hs.step(0.0, 0.0)
    assert bn.weight.detach().tolist() == [1.0, 0.0, 0.0]  # the widest unit is the group's minimum width


def test_wgsef_switches_to_the_half_space_stage_at_the_switch_point():
    torch.manual_seed(0)
    net = randomize_bn(conv_bn_net(channels=8))
    reg, groups, index = regularizer(net, torch.zeros(1, 1, 6, 6), "wgsef", {"hspg": True, "hspg_switch": 0.5},
                                     total_steps=10)
    assert reg.hspg_start == 5
    calls = []
    real = reg.halfspace.step
    reg.halfspace.step = lambda lr, lam: calls.append(lam) or real(lr, lam)
    for step in range(10):
        with torch.no_grad():
            net[1].weight.mul_(0.97)
        reg.after_step(0.05, step)
    assert len(calls) == 5  # steps 5..9, with λ frozen at the prox stage's last value
    assert len(set(calls)) == 1


@pytest.mark.parametrize("options, message", [
    ({"hspg": "yes"}, "wgsef hspg 'yes': expected true or false"),
    ({"hspg_switch": 1.5}, "wgsef hspg_switch 1.5: expected the fraction of regularized steps in"),
    ({"hspg_epsilon": 1.0}, "wgsef hspg_epsilon 1.0: expected a value in"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(HwpruneError, match=message):
        make_config("wgsef", options)
