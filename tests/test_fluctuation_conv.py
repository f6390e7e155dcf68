"""``fluctuation`` on CNNs and its ``standardize`` option: scores against a hand computation, and bias
compensation for removed conv channels checked on the *sliced* model against a hand computation (into
the reading conv's bias, or the running mean of the BatchNorm after a conv without one, also for a
library conv subclass with its own ``forward``)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hwprune.budget import Budget
from hwprune.apply.slicing import slice_model

from test_fluctuation import fluctuation


def two_layer_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_standardize_is_the_papers_per_layer_z_score_of_the_scores():
    """FLAP: (s − mean) / std over each layer's units (torch.std: the sample std), computed here by hand
    from the relative score of each hidden layer."""
    net = two_layer_mlp()
    x = torch.randn(300, 4, generator=torch.Generator().manual_seed(1))
    groups, index, reg = fluctuation(net, x[:1], standardize=True)
    reg.calibrate(lambda n: net(x[:n]))
    with torch.no_grad():
        h1 = torch.relu(net[0](x)).double()
        y1 = net[2](h1.float()).double()
        h2 = torch.relu(y1)
        y2 = net[4](h2.float()).double()
    raw = {}
    for h, y, layer in ((h1, y1, net[2]), (h2, y2, net[4])):
        w = layer.weight.detach().double()
        s = (h.var(0, unbiased=False)[None, :] * w**2 / y.var(0, unbiased=False)[:, None]).sum(0)
        raw[h.shape[1]] = s
    by_hand = {k: ((s - s.mean()) / s.std(unbiased=True)).numpy() for k, s in raw.items()}
    got = reg.scores()
    for g, off in zip(index.groups, index.offsets):
        np.testing.assert_allclose(got[off: off + g.size], by_hand[g.size], rtol=1e-6, atol=1e-9)
        assert abs(got[off: off + g.size].mean()) < 1e-9 and abs(got[off: off + g.size].std(ddof=1) - 1) < 1e-9
    _, _, plain = fluctuation(net, x[:1])
    plain.calibrate(lambda n: net(x[:n]))
    np.testing.assert_allclose(plain.scores(), np.concatenate([raw[g.size].numpy() for g in index.groups]), rtol=1e-6)


def test_standardize_is_a_method_option_from_the_command_line_form():
    from hwprune.cli.cmd_fit import _parse_options

    net = two_layer_mlp()
    _, _, reg = fluctuation(net, torch.zeros(1, 4), **_parse_options(["standardize=true"]))
    assert reg.config.standardize is True
    _, _, reg = fluctuation(net, torch.zeros(1, 4))
    assert reg.config.standardize is False  # off by default


def test_standardize_refuses_an_allocation_that_cannot_weigh_z_scores():
    from hwprune.errors import HwpruneError

    net = two_layer_mlp()
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    groups, _, reg = fluctuation(net, x[:1], standardize=True)
    reg.calibrate(lambda n: net(x[:n]))
    with pytest.raises(HwpruneError, match="standardize=true with --allocation global: .* use --allocation learned"):
        reg.project(groups, Budget("sparsity", 0.5), allocation="global")
    keep = reg.project(groups, Budget("sparsity", 4 / 11), allocation="learned").keep
    # learned: the lowest z-scores across both layers go, as the paper's global threshold does
    z = reg.scores()
    removed = [u for g, off in zip(groups, (0, 6)) for u in range(g.size) if u not in keep[g.name]]
    assert sorted(z[[off + u for g, off in zip(groups, (0, 6)) for u in range(g.size) if u not in keep[g.name]]]) \
        == sorted(np.sort(z)[:4]) and len(removed) == 4


class SamePadConv(nn.Conv2d):
    """A conv as efficientnet-pytorch writes it: an nn.Conv2d subclass with its own forward."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 0, 0, 0)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def conv_net(k: int, reader_bias: bool, reader_cls=nn.Conv2d):
    """conv -> BN -> ReLU (6 channels, the pruned group) -> a k x k reader without padding (4 out) [-> BN] -> pool -> linear."""
    torch.manual_seed(3)
    layers = [nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), reader_cls(6, 4, k, bias=reader_bias)]
    if not reader_bias:
        layers.append(nn.BatchNorm2d(4))
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))  # no ReLU: no dead output
    with torch.no_grad():  # channels 0 and 3 carry the constants relu(0.7) and relu(0.2): zero fluctuation
        net[1].weight[[0, 3]] = 0.0
        net[1].bias[0], net[1].bias[3] = 0.7, 0.2
        for bn in (m for m in net if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.3, 0.3)
            bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("k, reader_bias, reader_cls", [
    (1, True, nn.Conv2d),       # 1x1 conv with a bias: the fold goes into the bias
    (3, True, nn.Conv2d),       # 3x3 conv, no padding: every output sees the whole kernel, exact too
    (1, False, SamePadConv),    # a library subclass without a bias: into the BN after it (running mean)
    (3, False, nn.Conv2d),
])
def test_conv_compensation_on_the_sliced_model_matches_a_hand_computation(k, reader_bias, reader_cls):
    net = conv_net(k, reader_bias, reader_cls)
    x = torch.randn(48, 2, 9, 9, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = net(x)
        reader = net[3]
        w = reader.weight.detach().double().clone()
        # by hand: the removed channels' constant c times the reader's weights summed over the kernel
        delta = w[:, 0].sum(dim=(1, 2)) * 0.7 + w[:, 3].sum(dim=(1, 2)) * 0.2
        bias0 = reader.bias.detach().double().clone() if reader_bias else None
        mean0 = None if reader_bias else net[4].running_mean.detach().double().clone()
    groups, index, reg = fluctuation(net, x[:1])
    reg.calibrate(lambda n: net(x[:n]))
    scores = reg.scores()
    assert scores[[0, 3]].max() < 1e-12 and (np.delete(scores[:6], [0, 3]) > 1e-6).all()
    proj = reg.project(groups, Budget("sparsity", 2 / index.n_units))  # the two constant channels, nothing else
    first = next(g for g in groups if g.size == 6)
    assert sorted(proj.keep[first.name].tolist()) == [1, 2, 4, 5]
    reg.finalize(groups, proj.keep)
    assert reg.fold_report.unfolded == []
    slice_model(net, groups, proj.keep)
    assert net[3].in_channels == 4 and net[3].weight.shape[1] == 4
    with torch.no_grad():
        if reader_bias:
            assert reg.fold_report.folded == {"3": "bias"}
            torch.testing.assert_close(net[3].bias.double(), bias0 + delta, rtol=1e-6, atol=1e-6)
        else:
            assert reg.fold_report.folded == {"3": "running_mean of 4"}
            torch.testing.assert_close(net[4].running_mean.double(), mean0 - delta, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)  # the sliced model computes the same


def test_a_padded_kxk_reader_is_exact_in_the_interior_only():
    """With zero padding a border output sees fewer taps than the fold assumes: exact inside, not at the edge."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1)).eval()
    with torch.no_grad():
        net[1].weight[[0, 3]] = 0.0
        net[1].bias[0], net[1].bias[3] = 0.7, 0.2
    x = torch.randn(16, 2, 8, 8, generator=torch.Generator().manual_seed(6))
    before = net(x).detach()
    groups, index, reg = fluctuation(net, x[:1])
    reg.calibrate(lambda n: net(x[:n]))
    proj = reg.project(groups, Budget("sparsity", 2 / index.n_units))
    first = next(g for g in groups if g.size == 6)
    assert sorted(proj.keep[first.name].tolist()) == [1, 2, 4, 5]
    reg.finalize(groups, proj.keep)
    slice_model(net, groups, proj.keep)
    after = net(x).detach()
    torch.testing.assert_close(after[..., 1:-1, 1:-1], before[..., 1:-1, 1:-1], rtol=1e-5, atol=1e-5)
    assert (after[..., 0, :] - before[..., 0, :]).abs().max() > 1e-3
