"""Per-group sensitivity curves: how much the loss rises when one group alone is cut to each width.

The ``sensitivity`` allocation (:mod:`hwprune.budget.allocation`) spends the budget where the measured loss
increase is smallest. For every prunable group, a few of its allowed widths are probed (the group's
lowest-scoring units masked, everything else intact) and the loss measured on a fixed sample of
training inputs; the other allowed widths are interpolated. Curves are made non-increasing in the
kept count (keeping more never costs more loss): one probe's noise must not invert the ranking.

There is no validation split in a run, so the probes use training inputs; that measures how much a
cut disturbs what the network computes, which is what the allocation needs, not generalisation.

Example:
    >>> from hwprune.graph import discover_groups
    >>> net, x = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 1)), torch.randn(4, 3, 8, 8)
    >>> curves = measure_curves(net, discover_groups(net, x), np.arange(16.0), lambda m: m(x).pow(2).mean().item())
    >>> len(curves), len(curves[0]), float(curves[0][-1])    # one group; kept counts 1..16; nothing lost at 16
    (1, 16, 0.0)
    >>> bool(np.all(np.diff(curves[0]) <= 0))                 # keeping more never costs more
    True
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import HwpruneError
from ..graph.groups import UnitIndex

PROBES = 6  # widths measured per group; ResNet-20 (12 groups): about 70 loss evaluations


def measure_curves(model: nn.Module, groups, scores: np.ndarray, loss_fn: Callable[[nn.Module], float],
                   probes: int = PROBES) -> list[np.ndarray]:
    """Loss increase of each prunable group at each of its allowed kept counts (ascending), in the
    order of the prunable groups; ``scores`` as for :func:`hwprune.budget.project`."""
    from ..graph.blocks import BlockGroup

    if any(isinstance(g, BlockGroup) for g in groups):
        raise HwpruneError("--allocation sensitivity works on channels, neurons and heads, not weight blocks; "
                           "use --allocation learned or global with --granularity blocks")
    index = UnitIndex(model, groups)
    scores = np.asarray(scores, dtype=np.float64)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = float(loss_fn(model))
    curves = []
    try:
        for g, off in zip(index.groups, index.offsets):
            allowed = np.asarray(g.allowed_keep_counts())
            picks = np.unique(np.linspace(0, len(allowed) - 1, min(probes, len(allowed))).round().astype(int))
            order = np.argsort(-scores[off : off + g.size], kind="stable")  # best first, as the projection keeps
            losses = []
            for c in allowed[picks]:
                if c == g.size:
                    losses.append(base)
                    continue
                keep = torch.ones(index.n_units, dtype=torch.bool)
                keep[torch.as_tensor(off + order[c:], dtype=torch.long)] = False
                index.mask_(keep)
                losses.append(float(loss_fn(model)))
                model.load_state_dict(saved)
            curve = np.interp(allowed, allowed[picks], losses) - base
            curves.append(np.maximum.accumulate(curve[::-1])[::-1])  # non-increasing in the kept count
    finally:
        model.load_state_dict(saved)
    return curves
