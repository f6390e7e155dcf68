"""Moving scales and constants across layer boundaries, for Ye et al.'s ISTA (METHODS.md §4.3, §4.4).

* :func:`homogeneous_units`: which units reach every layer that reads them only through positively
  homogeneous ops (ReLU, leaky ReLU, pooling, flatten, residual adds of the same unit, ...). For those,
  multiplying the unit's producers (BN γ and β) by α and its consumers' input slices by 1/α leaves the
  function unchanged — the γ–W rescaling trick. ReLU6, hard-swish, sigmoid gates or a second BN on the
  way break it (f(αx) ≠ αf(x), or stale running statistics), and such units are left alone.
* :class:`InputRecorder`: keeps a few of the training inputs the model saw last, so that a method can
  run the model at finalize time without being handed data.
* :func:`fold_removed_constants`: before removed units are masked, measure with hooks on the layers
  that read them the value each removed channel carries (for a channel whose BN has γ = 0 it is the
  constant relu(β), the same for every sample and position), and add its contribution Σ_{u,v} W·c to
  the reading layer's bias, or subtract it from the running mean of the BN right after that layer.
  Exact for 1x1 convolutions and linear layers; a k×k convolution with zero padding sees fewer taps at
  the border, so there the fold is exact in the interior only. For a removed channel that is not
  constant (the budget removed a unit with γ ≠ 0) the fold replaces it by its mean over the recorded
  inputs, the best constant in the least-squares sense.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..graph.groups import CONSUMER, PRODUCER, UnitIndex

# Ops with f(αx) = α·f(x) for α > 0, channel by channel.
_HOMOGENEOUS_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_HOMOGENEOUS_FUNCTIONS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.leaky_relu, F.dropout, torch.flatten, torch.cat, torch.mean,
    torch.sum, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, operator.getitem, torch.add, operator.add, operator.iadd,
}
_HOMOGENEOUS_METHODS = {"relu", "relu_", "view", "reshape", "flatten", "mean", "sum", "contiguous", "add", "add_",
                        "squeeze", "unsqueeze"}
_ADDS = {torch.add, operator.add, operator.iadd, "add", "add_"}


def trace_graph(model: nn.Module) -> fx.Graph | None:
    """The model's fx graph with hwprune's leaves (library conv subclasses and untraceable activations
    included: :func:`hwprune.graph.trace.trace_graph`), or None if it cannot be traced; the caller then
    falls back to 'no unit qualifies'."""
    from ..graph.trace import trace_graph as _trace_graph

    return _trace_graph(model)


def _is_homogeneous(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(model.get_submodule(str(node.target)), _HOMOGENEOUS_MODULES)
    if node.op == "call_function":
        return node.target in _HOMOGENEOUS_FUNCTIONS
    if node.op == "call_method":
        return node.target in _HOMOGENEOUS_METHODS
    return False


def _node_args(node: fx.Node) -> list:
    flat: list = []
    fx.node.map_aggregate((node.args, node.kwargs), flat.append)
    return flat


def homogeneous_units(model: nn.Module, index: UnitIndex, graph: fx.Graph | None = None) -> torch.Tensor:
    """A boolean per unit: True where the γ–W rescaling is function-preserving.

    A unit qualifies when every path from the layers that produce it (its BNs, or the conv/linear that
    writes it where there is no BN) to the layers that read it (its consumers) goes only through
    positively homogeneous ops, and every residual add on the way adds two tensors of the same unit
    (both scaled by α). Decided per group: the units of a group share their layers.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
        >>> # with index = UnitIndex(net, groups): homogeneous_units(net, index) -> all True; with ReLU6: all False
    """
    graph = graph if graph is not None else trace_graph(model)
    ok_units = torch.zeros(index.n_units, dtype=torch.bool)
    if graph is None:
        return ok_units
    calls: dict[str, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    for g, off in zip(index.groups, index.offsets):
        producers = {m.module for m in g.members if m.role == PRODUCER and m.dim == 0}
        consumers = {m.module for m in g.members if m.role == CONSUMER}
        start = [n for p in producers for n in calls.get(p, [])]
        ok = bool(start)
        seen = set(start)
        queue = list(start)
        while queue and ok:
            n = queue.pop()
            for u in n.users:
                if u.op == "call_module" and str(u.target) in consumers and u.args and u.args[0] is n:
                    continue  # reached a reader: its input slice takes the 1/α
                if not _is_homogeneous(u, model):
                    ok = False
                    break
                if u not in seen:
                    seen.add(u)
                    queue.append(u)
        if ok:
            for n in seen:
                if n.target in _ADDS:
                    # every operand must carry the same α: tensors of this unit, no constants
                    if any(not isinstance(a, fx.Node) or a not in seen for a in _node_args(n)
                           if not isinstance(a, (str, type(None)))):
                        ok = False
        if ok:
            ok_units[int(off): int(off) + g.size] = True
    return ok_units


def bn_after(model: nn.Module, graph: fx.Graph | None = None) -> dict[str, str]:
    """``{layer: bn}`` for every conv/linear whose output goes only into a BatchNorm (fold target),
    library subclasses of those layers included; ``{}`` if the model cannot be traced.

    Example:
        >>> class SamePad(nn.Conv2d):                       # a library's conv with its own forward
        ...     def forward(self, x):
        ...         return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))
        >>> class Branchy(nn.Module):                       # data-dependent control flow: fx cannot trace it
        ...     def forward(self, x):
        ...         return x if x.shape[-1] > 2 else -x
        >>> bn_after(nn.Sequential(Branchy(), SamePad(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()))
        {'1': '2'}
    """
    graph = graph if graph is not None else trace_graph(model)
    out: dict[str, str] = {}
    if graph is None:
        return out
    for n in graph.nodes:
        if n.op != "call_module" or len(n.users) != 1:
            continue
        (u,) = n.users
        if u.op == "call_module" and isinstance(model.get_submodule(str(u.target)), nn.modules.batchnorm._BatchNorm):
            out[str(n.target)] = str(u.target)
    return out


class InputRecorder:
    """Keeps up to ``keep`` samples of the last batch the model saw in training mode.

    Evaluation passes (test accuracy) are not recorded: only training inputs feed the fold.

    Example:
        >>> net, x = nn.Sequential(nn.Linear(4, 2)), torch.randn(100, 4)
        >>> rec = InputRecorder(net)
        >>> rec.attach(); _ = net.train()(x)
        >>> rec.inputs.shape                    # the first 64 samples of the last training batch
        torch.Size([64, 4])
    """

    def __init__(self, model: nn.Module, keep: int = 64):
        self.model, self.keep = model, keep
        self.inputs: torch.Tensor | None = None
        self._hook = None

    def attach(self) -> None:
        if self._hook is None:
            self._hook = self.model.register_forward_pre_hook(self._record)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _record(self, module, args):
        if module.training and args and isinstance(args[0], torch.Tensor):
            self.inputs = args[0][: self.keep].detach().clone()

    def global_inputs(self) -> torch.Tensor | None:
        """The recorded inputs as one process would have recorded them: under torchrun each rank saw its
        contiguous share of the last global batch, so the shares are joined in rank order (every rank
        gets the same tensor, and the fold that uses it gives the same model on every rank)."""
        from ..training import distributed

        if not distributed.info().enabled:
            return self.inputs
        import torch.distributed as dist

        shares: list = [None] * distributed.info().world
        dist.all_gather_object(shares, self.inputs)
        parts = [t for t in shares if t is not None]
        return torch.cat(parts)[: self.keep] if parts else None


@dataclass
class FoldReport:
    """What :func:`fold_removed_constants` did: per reading layer, where the constants went."""

    folded: dict[str, str] = field(default_factory=dict)  # layer -> 'bias' | 'running_mean of BN'
    unfolded: list[str] = field(default_factory=list)  # layers with neither bias nor BN after them
    max_std: float = 0.0  # largest spread of a removed channel over the inputs (0: truly constant)


class ChannelMoments:
    """Per input channel of some layers, the running mean and variance of what they read, over any
    number of forward passes (dim 1 of a conv's input, the last dim of a linear's).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3))
        >>> with ChannelMoments(net, ["0"]) as moments:
        ...     _ = net(torch.tensor([[1.0, 2.0]])); _ = net(torch.tensor([[3.0, 2.0]]))
        >>> mean, std = moments.stats()["0"]                # per input feature, over both passes
        >>> mean, std
        (tensor([2., 2.], dtype=torch.float64), tensor([1., 0.], dtype=torch.float64))
    """

    def __init__(self, model: nn.Module, layers: list[str], outputs: bool = False):
        self.model, self.layers, self.outputs = model, list(layers), outputs
        self.sums: dict[str, list] = {}
        self.out_sums: dict[str, list] = {}
        self._hooks: list = []

    @staticmethod
    def _accumulate(table: dict, name: str, mod: nn.Module, x: torch.Tensor) -> None:
        x = x.detach().double()
        if isinstance(mod, nn.Linear):
            x, dims = x.reshape(-1, x.shape[-1]), (0,)
        else:
            dims = tuple(d for d in range(x.dim()) if d != 1)
        n = x.numel() / x.shape[-1 if isinstance(mod, nn.Linear) else 1]
        s, sq = x.sum(dims).cpu(), (x * x).sum(dims).cpu()
        acc = table.get(name)
        table[name] = [s, sq, n] if acc is None else [acc[0] + s, acc[1] + sq, acc[2] + n]

    def __enter__(self) -> "ChannelMoments":
        for name in self.layers:
            layer = self.model.get_submodule(name)
            self._hooks.append(layer.register_forward_pre_hook(
                lambda mod, args, name=name: self._accumulate(self.sums, name, mod, args[0])))
            if self.outputs:
                self._hooks.append(layer.register_forward_hook(
                    lambda mod, args, out, name=name: self._accumulate(self.out_sums, name, mod, out)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def stats(self, outputs: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(mean, std) per channel of what each layer read (``outputs``: wrote), in float64."""
        out = {}
        for name, (s, sq, n) in (self.out_sums if outputs else self.sums).items():
            mean = s / n
            out[name] = (mean, (sq / n - mean * mean).clamp_min(0).sqrt())
        return out


@torch.no_grad()
def channel_stats(model: nn.Module, layers: list[str], inputs: torch.Tensor,
                  batch_statistics: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(mean, std) of each input channel of ``layers`` (dim 1 for convs, the last dim for linears) over
    ``inputs`` in evaluation mode.

    ``batch_statistics``: the BatchNorms normalize with the statistics of ``inputs`` instead of their
    running averages (what re-estimating those averages would give), and their buffers are restored
    afterwards. For a model whose running averages are stale (units switched back on at finalize)."""
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if batch_statistics else []
    saved = [(m, [(b, b.clone()) for b in m.buffers(recurse=False)]) for m in bns]
    for m in bns:
        m.train()
    try:
        with ChannelMoments(model, layers) as moments:
            model(inputs)
    finally:
        for _, buffers in saved:
            for b, before in buffers:
                b.copy_(before)
        for m, t in was:
            m.train(t)
    return moments.stats()


@torch.no_grad()
def fold_removed_constants(model: nn.Module, index: UnitIndex, removed: torch.Tensor, inputs: torch.Tensor | None,
                           bn_of: dict[str, str] | None = None,
                           stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                           batch_statistics: bool = False) -> FoldReport:
    """Fold what the removed units carry into the layers that read them (METHODS.md §4.4).

    ``removed``: a boolean per unit. For each reading layer (a consumer: conv with ``groups == 1`` or
    linear), ``delta[o] = Σ_{c removed} (Σ_{u,v} W[o, c, u, v]) · mean_c`` goes into its bias, or out of
    the running mean of the BatchNorm right after it (``bn_of``, see :func:`bn_after`). Call it before
    the removed units are masked; afterwards the masked model computes what the model computed before
    (exactly for 1x1 convs and linear layers when the removed channels are constant). The channel
    means come from ``inputs`` (run through the model; ``batch_statistics``: see :func:`channel_stats`),
    or from ``stats`` measured beforehand (:class:`ChannelMoments`).

    Example:
        >>> from hwprune.graph import discover_groups
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).eval()
        >>> x = torch.randn(32, 4)
        >>> index = UnitIndex(net, discover_groups(net, x))
        >>> net[1].weight.data[:3], net[1].bias.data[:3] = 0.0, 0.5     # units 0-2 carry the constant relu(0.5)
        >>> before, removed = net(x), torch.arange(6) < 3
        >>> report = fold_removed_constants(net, index, removed, x, bn_after(net))
        >>> report.folded, report.unfolded
        ({'3': 'bias'}, [])
        >>> index.mask_(~removed)
        >>> bool((net(x) - before).abs().max() < 1e-5)                  # masked, the model computes the same
        True
    """
    report = FoldReport()
    if not bool(removed.any()):
        return report
    bn_of = bn_after(model) if bn_of is None else bn_of
    flag = torch.cat([removed.to(torch.bool).cpu(), torch.zeros(1, dtype=torch.bool)])
    readers = {}
    for (module, param, dim), gid in index.entries(CONSUMER).items():
        if param != "weight" or dim != 1:
            continue
        sel = flag[gid.cpu()]
        if bool(sel.any()):
            readers[module] = sel
    if stats is None:
        stats = channel_stats(model, list(readers), inputs, batch_statistics)
    for module, sel in readers.items():
        layer = model.get_submodule(module)
        if getattr(layer, "groups", 1) != 1 or module not in stats:
            report.unfolded.append(module)
            continue
        mean, std = (t.detach().double().cpu() for t in stats[module])
        report.max_std = max(report.max_std, float(std[sel].max()))
        w = layer.weight.detach().double().cpu()
        wsum = w.sum(dim=tuple(range(2, w.dim()))) if w.dim() > 2 else w  # (out, in)
        delta = (wsum[:, sel] @ mean[sel]).to(device=layer.weight.device, dtype=layer.weight.dtype)
        if getattr(layer, "bias", None) is not None:
            layer.bias.add_(delta)
            report.folded[module] = "bias"
        elif module in bn_of and model.get_submodule(bn_of[module]).running_mean is not None:
            bn = model.get_submodule(bn_of[module])
            bn.running_mean.sub_(delta.to(bn.running_mean.dtype))
            report.folded[module] = f"running_mean of {bn_of[module]}"
        else:
            report.unfolded.append(module)
    return report
