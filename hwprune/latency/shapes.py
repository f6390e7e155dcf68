"""The conv and linear layers of a model as *shapes*, and the width variables that set their widths.

A latency profile is measured per layer shape (everything but the widths: kernel, stride, padding,
dilation, input size), and a latency cost model needs, for each layer call, which kept counts give its
input and output widths. Both come from here. Widths follow the cost variables of
:mod:`hwprune.budget.cost` (``count = fixed + A @ keep``), so the latency model and the FLOPs model agree on
what "kept" means.

Example:
    >>> import torch
    >>> from hwprune.graph import discover_groups
    >>> from hwprune.target import load_target
    >>> net, x = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 4, 1)), torch.zeros(1, 1, 8, 8)
    >>> uses, A, fixed = layer_uses(net, x, discover_groups(net, x, target=load_target("host-cpu")))
    >>> uses[0].key, uses[0].grids                # (input widths, output widths): channels in multiples of 8
    ('conv2d k3x3 s1x1 p1x1 d1x1 in8x8', ((1,), (8, 16, 24, 32)))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from ..budget.cost import layer_calls, width_variables
from ..errors import ProfileError
from ..graph.groups import Group
from ..graph.leaves import overrides_forward


@dataclass(frozen=True)
class LayerUse:
    """One conv / linear call of a model. Per axis (``cin, cout`` or ``channels``): its cost variable
    (-1 when the width never changes), its dense width and the widths the hardware multiples allow."""

    name: str
    op: str
    key: str
    shape: dict
    vars: tuple[int, ...]
    full: tuple[int, ...]
    grids: tuple[tuple[int, ...], ...]


def layer_key(op: str, shape: dict) -> str:
    """The profile key of a layer shape.

    Example:
        >>> layer_key("conv2d", {"kernel": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "input_hw": [8, 8]})
        'conv2d k3x3 s1x1 p1x1 d1x1 in8x8'
        >>> layer_key("linear", {})
        'linear'
    """
    if op == "linear":
        return "linear"
    k, s, p, d, hw = (shape[n] for n in ("kernel", "stride", "padding", "dilation", "input_hw"))
    return f"{op} k{k[0]}x{k[1]} s{s[0]}x{s[1]} p{p[0]}x{p[1]} d{d[0]}x{d[1]} in{hw[0]}x{hw[1]}"


def _achievable(v: int, A, fixed: np.ndarray, groups: list[Group]) -> tuple[int, ...]:
    """Widths variable ``v`` can take: ``fixed`` plus, per group touching it, per-unit indices x kept count."""
    prunable = [g for g in groups if g.prunable]
    offsets = np.concatenate([[0], np.cumsum([g.size for g in prunable])]).astype(np.int64)
    row = A.getrow(v)
    sums = {int(round(fixed[v]))}
    for i, g in enumerate(prunable):
        lo, hi = offsets[i], offsets[i + 1]
        contrib = row[:, lo:hi].toarray().ravel()
        if not contrib.any():
            continue
        per_unit = contrib[contrib > 0]
        if not np.allclose(per_unit, per_unit[0]) or (contrib > 0).sum() != g.size:
            raise ProfileError(f"cannot profile: the units of group '{g.name}' feed a layer unevenly")
        step = int(round(per_unit[0]))
        sums = {s + step * n for s in sums for n in g.allowed_keep_counts()}
    return tuple(sorted(sums))


def _effective_padding(m: nn.Conv2d, ins, outs) -> dict:
    """The zero padding a conv subclass applied inside its ``forward`` (efficientnet-pytorch's
    ``Conv2dStaticSamePadding``, geffnet's ``Conv2dSame``), read off its input and output sizes: the same
    padding on both sides when the total is even, else the input grown by the total and no padding
    (TF's "same" pads one more at the end). Either way the profiled conv computes the same output size.

    Example:
        >>> conv = nn.Conv2d(4, 4, 3, stride=2)                    # pads (0, 1) inside its forward: 8 -> 4
        >>> _effective_padding(conv, (1, 4, 8, 8), (1, 4, 4, 4))
        {'padding': [0, 0], 'input_hw': [9, 9]}
    """
    pads, hw = [], []
    for i in range(2):
        k, st, d = m.kernel_size[i], m.stride[i], m.dilation[i]
        total = max((int(outs[2 + i]) - 1) * st + d * (k - 1) + 1 - int(ins[2 + i]), 0)
        pads.append(total // 2 if total % 2 == 0 else 0)
        hw.append(int(ins[2 + i]) + (0 if total % 2 == 0 else total))
    return {"padding": pads, "input_hw": hw}


def layer_uses(model: nn.Module, example, groups: list[Group]):
    """Every conv / linear call of ``model`` on ``example`` as a :class:`LayerUse`; also ``(A, fixed)``.

    Grouped convolutions other than depthwise have no profile op and are an error naming the layer.
    """
    example = example if isinstance(example, tuple) else (example,)
    var_index, A, fixed, full = width_variables(groups)
    full_counts = fixed + np.asarray(A.sum(axis=1)).ravel()
    uses = []
    for name, m, ins, outs in layer_calls(model, example):
        if isinstance(m, nn.Linear):
            op, shape, dims = "linear", {}, (1, 0)
            widths = (m.in_features, m.out_features)
        elif isinstance(m, nn.Conv2d):
            shape = {"kernel": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
                     "dilation": list(m.dilation), "input_hw": [int(ins[2]), int(ins[3])]}
            if overrides_forward(m):  # a library conv that pads inside its own forward (same padding)
                shape.update(_effective_padding(m, ins, outs))
            elif isinstance(m.padding, str) or m.padding_mode != "zeros":
                raise ProfileError(f"layer '{name}': padding {m.padding!r} / mode {m.padding_mode!r} is not profiled "
                                   "(only numeric zero padding)")
            if m.groups == 1:
                op, dims, widths = "conv2d", (1, 0), (m.in_channels, m.out_channels)
            elif m.groups == m.in_channels == m.out_channels:
                op, dims, widths = "depthwise", (0,), (m.out_channels,)
            else:
                raise ProfileError(f"layer '{name}': grouped convolution (groups={m.groups}) has no latency profile op; "
                                   "only dense and depthwise convolutions are profiled")
        else:
            raise ProfileError(f"layer '{name}' ({type(m).__name__}): only Conv2d and Linear layers are profiled")
        vs, grids = [], []
        for d, w in zip(dims, widths):
            v = var_index.get((name, "weight", d), -1)
            if v >= 0 and int(round(full_counts[v])) != w:
                v = -1  # a dimension the groups do not describe one-to-one: keep it at its width
            vs.append(v)
            grids.append(_achievable(v, A, fixed, groups) if v >= 0 else (w,))
        uses.append(LayerUse(name, op, layer_key(op, shape), shape, tuple(vs), tuple(widths), tuple(grids)))
    return uses, A, fixed
