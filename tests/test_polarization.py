"""Polarization (Zhuang et al. 2020): factors go to 0 or a, the first-gap threshold, the global mean."""

import numpy as np
import pytest
import torch
from torch import nn

from hwprune.errors import HwpruneError
from hwprune.regularizers import make_config
from hwprune.regularizers.pacing import PacedController, SpeedMeter
from hwprune.regularizers.polarization import auto_t, first_gap_threshold

from methods_helpers import conv_bn_net, randomize_bn, regularizer


def test_first_gap_threshold_follows_the_official_rule():
    rng = np.random.default_rng(0)
    low = np.abs(rng.normal(0.0, 0.004, 300))  # polarized to ~0, a few stragglers in bin 1
    high = rng.uniform(0.75, 1.0, 200)
    thr = first_gap_threshold(np.r_[low, high])
    assert low.max() <= thr < high.min()
    assert thr <= 0.05
    # first local minimum of the histogram, left edge of the next bin: bins 0 and 1 hold 30 and 10
    assert first_gap_threshold([0.0] * 30 + [0.015] * 10 + [0.9] * 40) == pytest.approx(0.02)
    # the bins follow a: factors in [0, 2]
    assert first_gap_threshold([0.0] * 30 + [1.8] * 40, upper=2.0) == pytest.approx(0.02)
    # no local minimum (strictly decreasing histogram): the first bin edge, the paper's 'fixed' rule
    assert first_gap_threshold(np.repeat(np.arange(100) / 100 + 0.005, np.arange(100, 0, -1))) == pytest.approx(0.01)


def test_polarization_pushes_every_factor_to_zero_or_a_and_the_loss_chooses_which():
    # t = 0.6: the factors above the mean share ρ ≈ 0.6 < 1 - t/2, so R_s pushes them up to a and the
    # rest down to 0 (with t near 2ρ the group above the mean stalls in between: see auto_t)
    torch.manual_seed(0)
    net = conv_bn_net(channels=64)
    reg, groups, index = regularizer(net, torch.zeros(1, 1, 6, 6), "polarization",
                                     {"t": 0.6, "strength": 0.01, "adaptive": False}, schedule=False)
    reg.attach()
    bn = net[1]
    with torch.no_grad():
        bn.weight.uniform_(0.2, 0.9)  # a spread start (the paper trains from scratch)
    defended = torch.arange(0, 64, 8)  # the 'loss' wants these eight channels more than R_s pushes them down
    opt = torch.optim.SGD([bn.weight], lr=0.01, momentum=0.9)
    for step in range(3000):
        loss = -0.05 * bn.weight[defended].sum() + reg.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        reg.after_step(0.01, step)
    g = bn.weight.detach()
    at_zero, at_a = g == 0, g == 1.0
    assert bool((at_zero | at_a).all()), g  # exactly the two poles, by the clamp
    assert bool(at_a[defended].all())
    assert 0.25 <= float(at_zero.double().mean()) <= 0.75
    hist = np.histogram(g.numpy(), bins=100, range=(0, 1))[0]
    assert hist[0] + hist[-1] == 64  # bimodal: nothing between the poles
    thr = reg.cut_threshold()
    assert float(g[at_zero].max()) <= thr < float(g[at_a].min())
    assert reg.zero_fraction() == pytest.approx(float(at_zero.double().mean()))


def test_penalty_uses_the_global_mean_and_its_gradient():
    torch.manual_seed(0)
    net = randomize_bn(conv_bn_net(channels=6))
    reg, _, index = regularizer(net, torch.zeros(1, 1, 6, 6), "polarization", {"t": 1.2, "strength": 0.5}, schedule=False)
    reg.attach()
    v, units = reg.scales.values()
    free = ~reg.protect.mask(torch.as_tensor(reg.scores()))[units]  # the top unit is the hardware minimum
    g = v.detach()
    mean = g.mean()
    expected = 0.5 * (1.2 * free.double() * torch.sign(g) - free.double() * torch.sign(g - mean)
                      + (free.double() * torch.sign(g - mean)).sum() / len(g))
    net.zero_grad()
    reg.penalty().backward()
    torch.testing.assert_close(net[1].weight.grad.double(), expected.double())
    value = 0.5 * ((1.2 * g.abs() - (g - mean).abs())[free]).sum()
    assert float(reg.penalty().detach()) == pytest.approx(float(value), rel=1e-6)


def test_units_without_batchnorm_get_gates_without_weight_decay_folded_at_the_end():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    reg, groups, index = regularizer(net, torch.zeros(1, 1, 4, 4), "polarization", {"strength": 0.1}, schedule=False)
    assert len(reg.scales.gated_units) == 8
    reg.attach()
    (group,) = reg.extra_parameters()
    assert group["params"][0] is reg.scales.gates and group["weight_decay"] == 0.0
    assert any(t is reg.scales.gates for t in reg.no_weight_decay())
    with torch.no_grad():
        reg.scales.gates.uniform_(0.0, 1.0)
    x = torch.randn(5, 1, 4, 4)
    gated = net(x).detach()
    reg.finalize(groups, {})
    torch.testing.assert_close(net(x), gated)  # the gates live on in the weights
    assert not net[1]._forward_hooks


def test_trained_factors_are_kept_and_clamped_unless_an_init_is_asked():
    net = randomize_bn(conv_bn_net(channels=6))
    with torch.no_grad():
        net[1].weight[0] = -0.3
        net[1].weight[1] = 1.7
    before = net[1].weight.detach().clone()
    reg, _, _ = regularizer(net, torch.zeros(1, 1, 6, 6), "polarization", schedule=False)
    reg.attach()
    torch.testing.assert_close(net[1].weight.detach(), before.clamp(0, 1))
    reg, _, _ = regularizer(net, torch.zeros(1, 1, 6, 6), "polarization", {"gamma_init": 0.5}, schedule=False)
    reg.attach()
    assert bool((net[1].weight == 0.5).all())
    reg.attach(resumed=True)  # a resumed run keeps what it trained
    with torch.no_grad():
        net[1].weight[2] = 0.9
    reg.attach(resumed=True)
    assert float(net[1].weight[2].detach()) == pytest.approx(0.9)


def test_t_from_the_budget_and_the_paced_controller():
    assert auto_t(0.7) == pytest.approx(1.4)
    assert auto_t(0.2) == 1.0 and auto_t(0.95) == pytest.approx(1.9) and auto_t(None) == 1.2
    net = conv_bn_net(channels=8)
    reg, _, _ = regularizer(net, torch.zeros(1, 1, 6, 6), "polarization", keep_fraction=0.25)
    assert reg.t == pytest.approx(1.5)
    reg, _, _ = regularizer(net, torch.zeros(1, 1, 6, 6), "polarization", {"t": 1.1}, keep_fraction=0.25)
    assert reg.t == pytest.approx(1.1)
    from hwprune.regularizers import SparsitySchedule

    c = PacedController(SparsitySchedule(0.5, 100), max_speed=0.01)
    assert c.update(10, 0.0, 1.0) > 1.0  # behind, factors still: raise
    assert c.update(10, 0.5, 1.0) < 1.0  # ahead of the ramp (wanted 0.083): lower
    assert c.update(10, 0.0, 1.0, speed=0.04) == 0.5  # falling four times too fast: halve
    assert c.update(11, 0.0, 1.0) == 1.0  # only every `interval` steps
    meter = SpeedMeter(scale=2.0, smoothing=1.0)
    meter.update(torch.tensor([1.0, 2.0, 0.0]))
    assert meter.update(torch.tensor([0.8, 1.8, 0.5])) == pytest.approx(0.1)  # dead factors do not count


@pytest.mark.parametrize("options, message", [
    ({"reduce": "sum"}, "polarization reduce 'sum': expected one of max, mean"),
    ({"t": 3}, "polarization t 3: expected a number in [-2, 2]"),
    ({"gamma_init": 2.0}, "polarization gamma_init 2.0: expected a value in [0, upper=1.0]"),
    ({"upper": 0}, "polarization upper 0"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(HwpruneError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_config("polarization", options)
