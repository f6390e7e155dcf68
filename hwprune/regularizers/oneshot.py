"""One-shot baselines: no regularized training.

* ``magnitude``: prune the dense model by group norm (every trainable entry of a unit: the filters
  that write it, the BN, the input slices that read it, normalized by its size), then fine-tune.
  This is Torch-Pruning's group-norm criterion.
* ``uniform``: every group keeps the same fraction of its units (the ``uniform`` allocation: a width
  multiplier, rounded to the hardware multiples, solved so that the budget is met), and the thin model
  is trained from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..graph.groups import CONSUMER, NORMALIZED, PRODUCER
from .base import Regularizer, register


NORMALIZERS = ("none", "mean")


@dataclass
class MagnitudeConfig:
    """``normalize``: ``none`` ranks the per-entry group norms of all groups against each other;
    ``mean`` first divides each unit's norm by the mean norm of its group (Torch-Pruning's
    ``normalizer="mean"``), so that a group whose weights are small as a whole (a wide layer's
    fan-in shrinks its initial weights) is not cut first for that alone."""

    normalize: str = "none"

    def __post_init__(self):
        if self.normalize not in NORMALIZERS:
            raise ValueError(f"magnitude: normalize={self.normalize!r}; expected one of {', '.join(NORMALIZERS)}")


@register
class Magnitude(Regularizer):
    name = "magnitude"
    Config = MagnitudeConfig
    trains = False

    def scores(self) -> np.ndarray:
        roles = (PRODUCER, NORMALIZED, CONSUMER)
        sq = self.index.sq_norms(roles).double()
        norms = (sq / self.index.sizes(roles).clamp_min(1)).sqrt().cpu().numpy()
        if self.config.normalize == "mean":
            offsets = self.index.offsets
            for a, b in zip(offsets[:-1], offsets[1:]):
                norms[a:b] /= max(float(norms[a:b].mean()), 1e-30)
        return norms


@dataclass
class UniformConfig:
    """The uniform-width baseline has no settings."""


@register
class Uniform(Regularizer):
    name = "uniform"
    Config = UniformConfig
    trains = False
    from_scratch = True

    def scores(self) -> np.ndarray:
        # Unit i of a group of n scores 1 - (i + 0.5) / n: removing low scores first trims every group
        # by the same fraction (the last units go first; the weights are re-initialized anyway).
        return np.concatenate([1.0 - (np.arange(g.size) + 0.5) / g.size for g in self.index.groups]) \
            if self.index.groups else np.zeros(0)

    default_allocation = "uniform"
    allocation_fixed = True

    def project(self, groups, budget, cost=None, allocation=None, sensitivity=None, share_cost=None):
        # a width multiplier whatever --allocation says: that is what this baseline is
        return super().project(groups, budget, cost, allocation="uniform")

    def zero_fraction(self) -> float:
        return 0.0
