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
from hwprune.apply.slicing import mask_model, slice_model
from hwprune.training.loop import TrainSettings, make_optimizer

from methods_helpers import assert_exact_budget_and_onnx, conv_bn_net, fit_tiny, randomize_bn, regularizer
from topologies import TOPOLOGIES
from topologies import randomize_bn as topo_randomize_bn


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _reference_m_grad(net, x, y, m, ste, slope):
    """g_m by hand: the BN with ŵ = γ·h as a leaf (β is not gated), then Σ_unit g_ŵ·sign(w)·STE′(m)."""
    conv, bn, rest = net[0], net[1], net[2:]
    h = (m > 0).float()
    gamma = (bn.weight.detach() * h).requires_grad_()
    out = rest(F.batch_norm(conv(x), None, None, gamma, bn.bias.detach(), True, 0.0, bn.eps))
    F.cross_entropy(out, y).backward()
    return gamma.grad * torch.sign(bn.weight.detach()) * ste_grad(m, ste, slope)


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
    held = []  # while masked, channel 1's weight must stay at its stored value
    first, last, m_trace = _train_channel(net, reg, x, target, 40, lambda: held.append(
        float(net[1].weight[1].detach()) == float(stored[1])))
    assert all(held), held  # held until it comes back
    assert m_trace[0] > -0.2 and m_trace[-1] > 0, m_trace  # it climbed back and switched on
    assert last < 0.2 * first  # and it helps: the stored weights came back


def _train_channel(net, reg, x, target, steps, while_masked=None):
    """SGD on a loss that only channel 1 can lower, with the regularizer's penalty and step; returns
    (loss before, loss after, channel 1's mask after every step). ``while_masked()`` runs after each
    step for as long as the mask has never been above 0."""
    opt = torch.optim.SGD(net.parameters(), lr=0.01)

    def loss_fn():
        return F.mse_loss(net(x)[:, 0], target)

    first = float(loss_fn().detach())
    m_trace = []
    for step in range(steps):
        loss = loss_fn() + reg.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        reg.after_step(0.01, step)
        m_trace.append(float(reg.m[1].detach()))
        if while_masked is not None and max(m_trace) <= 0:
            while_masked()
    return first, float(loss_fn().detach()), m_trace


def _relu_head_net(channels=4):
    """conv3x3 -> BN -> ReLU -> pool -> linear: every unit is a BN -> ReLU unit."""
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 1))


def test_a_masked_bn_relu_unit_comes_back_when_the_loss_wants_it():
    # The unit's BN output goes straight into a ReLU, in training mode (batch statistics), as in the
    # inner layers of small-resnet. Gating β as well would park it at relu(0) with relu'(0) = 0: no loss
    # gradient, and λ alone would keep it down. Gating γ alone leaves it at relu(β) = 0.5, where the ReLU
    # is active and the loss reaches its mask.
    torch.manual_seed(0)
    teacher = _relu_head_net()
    with torch.no_grad():
        teacher[1].weight.fill_(1.0)
        teacher[1].bias.copy_(torch.tensor([0.3, 0.5, 0.3, 0.3]))
        teacher[5].weight.copy_(torch.tensor([[0.2, 3.0, 0.2, 0.2]]))  # the output depends mostly on channel 1
        teacher[5].bias.zero_()
    x = torch.randn(64, 1, 6, 6)
    teacher.train()
    target = teacher(x).detach()[:, 0]
    net = copy.deepcopy(teacher)
    with torch.no_grad():
        net[1].weight[1] = 0.5  # the target wants channel 1 at twice the scale the student stores
    reg, _, _ = regularizer(net, x[:1], "autoprune", {"strength": 1e-4, "adaptive": False, "m_lr": 0.05})
    reg.attach()
    with torch.no_grad():
        reg.m.copy_(torch.tensor([0.5, -0.2, 0.5, 0.5]))  # channel 1 switched off
    first, last, m_trace = _train_channel(net, reg, x, target, 30)
    assert m_trace[0] > -0.2 and m_trace[-1] > 0, m_trace  # it climbed back and switched on
    assert last < 0.1 * first  # with the stored weights: the teacher's function


def test_a_masked_unit_before_a_relu_feels_the_loss_while_its_beta_is_positive():
    # What is left of the kink limit: a masked BN -> ReLU unit with β ≤ 0 outputs relu(β) = 0 and gets
    # no loss gradient (relu'(0) = 0 in PyTorch; for β < 0 the ReLU is off); with β > 0 it does.
    torch.manual_seed(0)
    net = randomize_bn(conv_bn_net(channels=3))
    with torch.no_grad():
        net[1].bias.copy_(torch.tensor([0.2, 0.4, -0.3]))
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))
    reg, _, _ = regularizer(net, x[:1], "autoprune", {"strength": 1e-9})
    reg.attach()
    with torch.no_grad():
        reg.m.copy_(torch.tensor([0.5, -0.3, -0.3]))
    net.train()
    F.cross_entropy(net(x), y).backward()
    assert float(reg.m.grad[1]) != 0.0 and float(reg.m.grad[0]) != 0.0
    assert float(reg.m.grad[2]) == 0.0


def _finalized(net, x, m, keep):
    """Attach AutoPrune with masks ``m``, record one training batch, finalize with ``keep``.

    Returns (gated output in evaluation mode before finalize, the weights then, groups, regularizer)."""
    reg, groups, index = regularizer(net, x[:1], "autoprune")
    reg.attach()
    with torch.no_grad():
        reg.m.copy_(m)
    net.train()
    with torch.no_grad():
        net(x)  # a training batch: what the fold measures the constants on
    net.eval()
    gated = net(x).detach()
    weights = copy.deepcopy(net.state_dict())  # the gate never writes into them
    reg.finalize(groups, keep)
    return gated, weights, groups, reg


def test_finalize_keeps_a_unit_the_projection_keeps_even_with_its_mask_below_zero():
    torch.manual_seed(0)
    net = randomize_bn(conv_bn_net(channels=6))
    x = torch.randn(8, 1, 6, 6)
    # units 1 and 3 are masked; the projection keeps 1 (say, for a hardware multiple) and removes 3 and 5
    keep = {"0": [0, 1, 2, 4]}
    _, weights, groups, reg = _finalized(net, x, torch.tensor([0.5, -0.3, 1.2, -1.5, 0.1, 0.8]), keep)
    assert reg.zero_fraction() == pytest.approx(2 / 6)
    assert list(reg.scores().argsort()[:2]) == [3, 1]  # the natural removal set goes first
    ungated = conv_bn_net(channels=6)  # a fresh model without hooks, with the weights the gated one had
    ungated.load_state_dict(weights)
    ungated.eval()
    assert not net[1]._forward_hooks
    bn_out, ref = net[:2](x).detach(), ungated[:2](x).detach()
    # the kept unit 1 comes back with its weights (ŵ = w): its channel is the un-gated layer's
    torch.testing.assert_close(bn_out[:, 1], ref[:, 1], rtol=0, atol=0)
    assert float(ref[:, 1].std()) > 0.1  # and that is not a constant
    # the removed masked unit 3 outputs its constant β, the one it had while masked
    torch.testing.assert_close(bn_out[:, 3], torch.full_like(bn_out[:, 3], float(ungated[1].bias[3].detach())))
    # the removed unmasked unit 5 is left as it was: the fold replaces it by its mean
    torch.testing.assert_close(bn_out[:, 5], ref[:, 5], rtol=0, atol=0)
    assert reg.fold_report.folded == {"5": "bias"}


def _one_by_one_net():
    """conv3x3 -> BN -> ReLU -> conv1x1 (no bias) -> BN -> ReLU -> pool -> linear.

    The first group is read by the 1x1 conv, whose BN takes the constant in its running mean; the
    second by the linear layer after the pooling, whose bias takes it: both folds are exact."""
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 5, 1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))


def test_the_sliced_model_computes_what_the_masked_model_computed():
    torch.manual_seed(0)
    net = randomize_bn(_one_by_one_net())
    with torch.no_grad():
        net[1].bias.copy_(torch.tensor([0.1, 0.7, -0.2, 0.4, 0.6, 0.3]))  # masked: relu(β) = 0.7, 0.6
        net[4].bias.copy_(torch.tensor([0.5, 0.2, 0.8, -0.1, 0.3]))  # masked: relu(β) = 0.8
    x = torch.randn(16, 2, 6, 6)
    m = torch.tensor([0.5, -0.3, 0.2, 0.4, -0.6, 0.3] + [0.5, 0.6, -0.1, 0.2, 0.4])
    keep = {"0": [0, 2, 3, 5], "3": [0, 1, 3, 4]}  # exactly the units with m > 0
    gated, _, groups, reg = _finalized(net, x, m, keep)
    assert reg.fold_report.folded == {"3": "running_mean of 4", "8": "bias"}
    mask_model(net, groups, keep)
    masked = net(x).detach()
    # the masked units' constants went into the readers: the pruned model is the trained one
    torch.testing.assert_close(masked, gated, rtol=0, atol=1e-5)
    sliced = copy.deepcopy(net)
    slice_model(sliced, groups, keep)
    assert (sliced[3].in_channels, sliced[8].in_features) == (4, 4)
    torch.testing.assert_close(sliced(x), gated, rtol=0, atol=1e-5)


def test_a_removed_active_unit_is_replaced_by_its_mean_under_fresh_batch_statistics():
    # The kept unit 1 of the first group comes back on at finalize, so the running averages of the BN
    # after the 1x1 conv (here: random ones) do not describe the model any more. The removed unit 2 of
    # the second group is still active (m > 0); the fold replaces it by its mean, which must be measured
    # as the model will run once its BN statistics are re-estimated. A linear reader after the pooling
    # then keeps the mean of the output over the batch exactly.
    torch.manual_seed(0)
    net = randomize_bn(_one_by_one_net())
    x = torch.randn(32, 2, 6, 6)
    m = torch.tensor([0.5, -0.3, 0.2, 0.4, 0.6, 0.3] + [0.5, 0.6, 0.1, 0.2, 0.4])
    keep = {"0": list(range(6)), "3": [0, 1, 3, 4]}
    _, weights, groups, reg = _finalized(net, x, m, keep)
    assert reg.fold_report.folded == {"8": "bias"} and reg.fold_report.max_std > 0.01
    for key in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var", "4.num_batches_tracked"):
        assert torch.equal(net.state_dict()[key], weights[key]), key  # measuring left the averages alone
    unpruned = _one_by_one_net()  # the kept-on model without the fold: every unit with its weights
    unpruned.load_state_dict(weights)
    mask_model(net, groups, keep)
    with torch.no_grad():
        expected, pruned = unpruned.train()(x).mean(0), net.train()(x).mean(0)
    torch.testing.assert_close(pruned, expected, rtol=0, atol=1e-5)


# Where every reader of a removed unit is a 1x1 conv, a linear layer or the unit's own depthwise
# channel, the fold is exact and the pruned model is the trained masked one; a k x k reader with zero
# padding (residual, concat; the shared conv of the last one is also read twice) sees padding instead
# of the constant at the border. Sliced and masked agree everywhere.
@pytest.mark.parametrize("topology, exact", [
    ("residual", False), ("concat", False), ("depthwise", True), ("grouped", True), ("squeeze-excite", True),
    ("shared-and-split", False),
])
def test_after_finalize_slicing_equals_masking_on_every_topology(topology, exact):
    torch.manual_seed(0)
    cls, shape = TOPOLOGIES[topology]
    net = topo_randomize_bn(cls())
    x = torch.randn(*shape) * 2
    reg, groups, index = regularizer(net, x[:1], "autoprune")
    m = torch.where(torch.arange(index.n_units) % 3 == 1, -0.3, 0.4)  # a third of the units masked
    keep = {name: torch.nonzero(part > 0).flatten().tolist() for name, part in index.split(m).items()}
    reg.attach()
    with torch.no_grad():
        reg.m.copy_(m)
        net.train()
        net(x)  # a training batch for the fold
    net.eval()
    gated = net(x).detach()
    reg.finalize(groups, keep)
    assert reg.fold_report.folded and not reg.fold_report.unfolded
    mask_model(net, groups, keep)
    masked = net(x).detach()
    if exact:
        torch.testing.assert_close(masked, gated, rtol=0, atol=1e-5)
    sliced = copy.deepcopy(net)
    slice_model(sliced, groups, keep)
    torch.testing.assert_close(sliced(x), masked, rtol=1e-5, atol=1e-5)


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
