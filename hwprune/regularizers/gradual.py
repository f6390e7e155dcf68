"""Gradual magnitude pruning of whole units: the cut made in small steps while the model trains.

One-shot magnitude pruning removes every planned unit at once; at 25% of the FLOPs that drops
ResNet-20 on Fashion-MNIST from 84% to 17% (docs/benchmarks.md, "acc. right after pruning"), and the
short fine-tune must then rebuild the function. Here the allocation's plan (each group's kept count,
fixed at the stage's start like WGSEF's) is reached along Zhu & Gupta's cubic schedule (2017, "To
prune, or not to prune"): after step ``t`` of ``T = end x`` the regularized steps, each group has
removed ``1 - (1 - t/T)^3`` of its planned cut, chosen by the current group norms (the same score as
``magnitude``), and the removed units are held at zero. The network adapts between cuts, so at the
end of the stage it already is the pruned network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import HwpruneError
from .base import RegContext, register
from .oneshot import Magnitude, MagnitudeConfig


@dataclass
class GradualConfig(MagnitudeConfig):
    """``end``: fraction of the regularized steps by which the whole planned cut is made (the rest of
    the stage trains the pruned network); ``every``: steps between two cuts."""

    end: float = 0.5
    every: int = 4

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.end <= 1.0:
            raise ValueError(f"end={self.end!r}; expected a fraction in (0, 1]")
        if int(self.every) != self.every or self.every < 1:
            raise ValueError(f"every={self.every!r}; expected a whole number of steps >= 1")


def cut_fraction(step: int, end_step: int) -> float:
    """Share of the planned cut made after ``step`` steps: Zhu & Gupta's cubic ramp, 1 from ``end_step``.

    Example:
        >>> [round(cut_fraction(t, 4), 4) for t in (0, 1, 2, 4, 9)]
        [0.0, 0.5781, 0.875, 1.0, 1.0]
    """
    if end_step <= 0:
        return 1.0
    return 1.0 - (1.0 - min(1.0, step / end_step)) ** 3


@register
class Gradual(Magnitude):
    """Hard gradual pruning toward the allocation's plan; ranks by the ``magnitude`` group norm."""

    name = "gradual"
    Config = GradualConfig
    trains = True

    def __init__(self, config: GradualConfig, ctx: RegContext):
        super().__init__(config, ctx)
        if ctx.planned_keep is None:
            raise HwpruneError("method 'gradual' needs the run's per-group plan: use --granularity channels")
        self.planned = [int(k) for k in ctx.planned_keep]
        self.end_step = max(1, round(config.end * ctx.total_steps))
        self.keep = torch.ones(ctx.index.n_units, dtype=torch.bool)  # the units not cut so far
        self._factors: torch.Tensor | None = None  # a cache: keep as mask_'s 0/1 factors (None: nothing cut)

    def no_weight_decay(self) -> list[torch.Tensor]:
        return []  # no penalty to fight: weight decay stays as in plain training

    def _select(self, fraction: float) -> None:
        scores = torch.as_tensor(self.scores())
        keep = torch.zeros_like(self.keep)
        for g, off, planned in zip(self.index.groups, self.index.offsets, self.planned):
            a, n = int(off), g.size
            count = n - round(fraction * (n - planned))
            order = torch.argsort(-scores[a : a + n], stable=True)  # cut units score 0: they stay cut
            keep[a + order[:count]] = True
        self._set_keep(keep)

    def _set_keep(self, keep: torch.Tensor) -> None:
        self.keep = keep
        self._factors = None if bool(keep.all()) else keep.to(torch.float32)

    @torch.no_grad()
    def after_step(self, lr: float, step: int) -> None:
        done = step + 1
        if done <= self.end_step and (done % self.config.every == 0 or done == self.end_step):
            self._select(cut_fraction(done, self.end_step))
        if self._factors is not None:  # hold the cut units at zero (SGD would move them again)
            self.index.mask_(self._factors)  # already float: no conversion per step

    def state_dict(self) -> dict:
        return {**super().state_dict(), "keep": self.keep.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._set_keep(state["keep"].clone().to(torch.bool))
