"""AutoPrune (Xiao et al. 2019): step masks, the sign(w) update, the STE variants, recoverability."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwprune.data import load_dataset
from hwprune.errors import HwpruneError
from hwprune.regularizers import make_config
from hwprune.regularizers.autoprune import ste_grad
from hwprune.train import TrainSettings, make_optimizer

from methods_helpers import assert_exact_budget_and_onnx, conv_bn_net, fit_tiny, randomize_bn, regularizer


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _reference_m_grad(net, x, y, m, ste, slope):
    """g_m by hand: the BN with ŵ = (γ·h, β·h) as leaves, then Σ_unit g_ŵ·sign(w)·STE′(m)."""
    conv, bn, rest = net[0], net[1], net[2:]
    h = (m > 0).float()
    gamma = (bn.weight.detach() * h).requires_grad_()
    beta = (bn.bias.detach() * h).requires_grad_()
    out = rest(F.batch_norm(conv(x), None, None, gamma, beta, True, 0.0, bn.eps))
    F.cross_entropy(out, y).backward()
    s = gamma.grad * torch.sign(bn.weight.detach()) + beta.grad * torch.sign(bn.bias.detach())
    return s * ste_grad(m, ste, slope)


@pytest.mark.parametrize("ste", ["linear", "leaky", "softplus"])
def test_the_mask_gradient_is_the_sign_rule_with_the_chosen_ste(ste):
    torch.manual_seed(0)
    net = randomize_bn(conv_bn_net(channels=6))
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    reg, _, _ = regularizer(net, x[:1], "autoprune", {"ste": ste, "slope": 0.2, "strength": 1e-9})
    reg.attach()
    with torch.no_grad():
        reg.m.copy_(torch.tensor([0.5, -0.3, 1.2, -1.5, 0.1, 0.8]))
    net.train()
    F.cross_entropy(net(x), y).backward()
    expected = _reference_m_grad(copy.deepcopy(net), x, y, reg.m.detach(), ste, 0.2)
    torch.testing.assert_close(reg.m.grad, expected)
    # only unmasked weights get the loss gradient
    assert bool((net[1].weight.grad[[1, 3]] == 0).all()) and bool((net[1].weight.grad[[0, 2]] != 0).all())


def test_the_ste_variants_differ_as_specified():
    m = torch.tensor([-2.0, -0.5, 0.5, 2.0])
    torch.testing.assert_close(ste_grad(m, "linear", 0.1), torch.ones(4))
    torch.testing.assert_close(ste_grad(m, "leaky", 0.1), torch.tensor([0.1, 0.1, 1.0, 1.0]))
    torch.testing.assert_close(ste_grad(m, "softplus", 0.1), torch.sigmoid(m))
    # the penalty R_a = Σ h(m) goes through the same STE: λ·STE′(m) per mask
    net = conv_bn_net(channels=4)
    reg, _, _ = regularizer(net, torch.zeros(1, 1, 6, 6), "autoprune", {"ste": "leaky", "slope": 0.1, "strength": 0.5})
    with torch.no_grad():
        reg.m.copy_(m)
    pen = reg.penalty()
    assert float(pen.detach()) == pytest.approx(0.5 * 2)  # two units on
    pen.backward()
    torch.testing.assert_close(reg.m.grad, 0.5 * torch.tensor([0.1, 0.1, 1.0, 1.0]))


def test_weights_of_masked_units_do_not_move():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    randomize_bn(net)
    x, y = torch.randn(32, 1, 6, 6), torch.randint(0, 3, (32,))
    reg, _, _ = regularizer(net, x[:1], "autoprune", {"strength": 1e-9, "adaptive": False})
    reg.attach()
    with torch.no_grad():
        reg.m[2] = -0.5  # unit 2 of the first group: BN 1 channel 2, conv 0 row 2, conv 3 column 2
    before = copy.deepcopy(net.state_dict())
    # SGD with momentum and weight decay, as the trainer builds it: both would move stored weights
    opt = make_optimizer(net, TrainSettings(lr=0.1), reg.no_weight_decay(), reg.extra_parameters(), reg.param_groups())
    for step in range(20):
        loss = F.cross_entropy(net(x), y) + reg.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        reg.after_step(0.1, step)
    assert float(reg.m[2].detach()) <= 0  # still masked (the loss has no use for it here)
    after = net.state_dict()
    for key, sl in [("1.weight", (2,)), ("1.bias", (2,)), ("0.weight", (2,)), ("3.weight", (slice(None), 2))]:
        torch.testing.assert_close(after[key][sl], before[key][sl], rtol=0, atol=0)
    assert not torch.equal(after["0.weight"][3], before["0.weight"][3])  # the others trained
    assert not torch.equal(after["1.weight"][0], before["1.weight"][0])


def _bn_head_net():
    """conv1x1 -> BN -> pool -> linear: the BN output reaches the loss without a ReLU kink."""
    return nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2, 1))


def test_a_masked_unit_comes_back_when_the_loss_wants_it():
    torch.manual_seed(0)
    teacher = randomize_bn(_bn_head_net())
    with torch.no_grad():
        teacher[4].weight.copy_(torch.tensor([[0.2, 3.0]]))  # the output depends mostly on channel 1
        teacher[4].bias.zero_()
    x = torch.randn(64, 1, 4, 4)
    teacher.eval()
    target = teacher(x).detach()[:, 0]
    net = copy.deepcopy(teacher)
    net.eval()  # running statistics: the unit's contribution is a constant the head can use
    reg, _, _ = regularizer(net, x[:1], "autoprune", {"strength": 1e-6, "adaptive": False, "m_lr": 0.05})
    reg.attach()
    with torch.no_grad():
        reg.m.copy_(torch.tensor([0.5, -0.2]))  # channel 1 switched off, its weights stored
    stored = net[1].weight.detach().clone()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def loss_fn():
        return F.mse_loss(net(x)[:, 0], target)

    first = float(loss_fn().detach())
    m_trace = []
    for step in range(40):
        loss = loss_fn() + reg.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        reg.after_step(0.01, step)
        m_trace.append(float(reg.m[1].detach()))
        if max(m_trace) <= 0:
            assert float(net[1].weight[1].detach()) == float(stored[1])  # held until it comes back
    assert m_trace[0] > -0.2 and m_trace[-1] > 0, m_trace  # it climbed back and switched on
    assert float(loss_fn().detach()) < 0.2 * first  # and it helps: the stored weights came back


def test_a_unit_masked_right_before_a_relu_gets_no_loss_gradient():
    # The documented limit of recoverability: a masked BN -> ReLU channel sits at the kink (relu'(0) = 0
    # in PyTorch), so its mask feels only λ. Units in a residual stream or read without a ReLU recover.
    torch.manual_seed(0)
    net = randomize_bn(conv_bn_net(channels=3))
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    reg, _, _ = regularizer(net, x[:1], "autoprune", {"strength": 1e-9})
    reg.attach()
    with torch.no_grad():
        reg.m.copy_(torch.tensor([0.5, -0.3, 0.4]))
    F.cross_entropy(net(x), y).backward()
    assert float(reg.m.grad[1]) == 0.0 and float(reg.m.grad[0]) != 0.0


def test_finalize_makes_the_mask_permanent_and_removes_the_hooks():
    torch.manual_seed(0)
    net = randomize_bn(conv_bn_net(channels=6))
    x = torch.randn(8, 1, 6, 6)
    reg, groups, _ = regularizer(net, x[:1], "autoprune")
    reg.attach()
    with torch.no_grad():
        reg.m.copy_(torch.tensor([0.5, -0.3, 1.2, -1.5, 0.1, 0.8]))
    net.eval()
    masked = net(x).detach()
    assert reg.zero_fraction() == pytest.approx(2 / 6)
    assert list(reg.scores().argsort()[:2]) == [3, 1]  # the natural removal set goes first
    reg.finalize(groups, {})
    assert not net[1]._forward_hooks
    torch.testing.assert_close(net(x), masked)
    assert float(net[1].weight[1].detach()) == 0 and float(net[1].bias[3].detach()) == 0


def test_layers_it_cannot_gate_are_named():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.PReLU(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(HwpruneError, match=r"1 \(PReLU\)"):
        regularizer(net, torch.zeros(1, 1, 6, 6), "autoprune")


@pytest.mark.parametrize("options, message", [
    ({"ste": "cubic"}, "autoprune ste 'cubic': expected one of leaky, softplus, linear"),
    ({"m_optimizer": "rmsprop"}, "autoprune m_optimizer 'rmsprop': expected one of adam, sgd"),
    ({"slope": 0}, "autoprune slope 0: expected a number in"),
    ({"m_init": -1}, "autoprune m_init -1: expected a positive start value"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(HwpruneError, match=message.replace("(", r"\(")):
        make_config("autoprune", options)


def test_fit_end_to_end_meets_the_budget_exactly(digits, tmp_path):
    result, report = fit_tiny("autoprune", {}, tmp_path / "run", digits)
    assert_exact_budget_and_onnx(report)
