"""Polarization (Zhuang et al., NeurIPS 2020): push every scale factor to 0 or to a (METHODS.md §2).

    R_s(γ) = t·‖γ‖₁ − ‖γ − γ̄·1‖₁,   γ ∈ [0, a]ⁿ,   γ̄ = mean of ALL factors of the network

added to the loss as λ·R_s (subgradients through autograd; the mean is not detached, as in the
official ``bn_sparsity``). After every optimizer step the factors are clamped to [0, a]. R_s is
concave: on its own it drives a fraction of the factors to exactly 0 and the rest to a, and the loss
decides which. The factors are the BN γ of every unit; a unit without a BatchNorm gets a gate
(``UnitScales``). Factors get no weight decay (it would shift t).

Where the method itself cuts: the first local minimum of the histogram of the unit scores on [0, a]
with 100 bins (paper §3.3, ``search_threshold(..., 'grad')``). The user's budget is met exactly by the
projection, which removes the units with the lowest scores; ``zero_fraction`` (reported as the
sparsity before projection) is the fraction at or below the histogram threshold.

λ is adapted along the sparsity schedule: the online form of the coarse stage of the paper's
Algorithm 1 (a search over λ with t fixed), without retraining per trial; t is set from the budget
(:func:`auto_t`), the fixed point of Algorithm 1's fine stage. The zero count answers λ late (a factor
must fall all the way first), so the method runs its own :class:`~hwprune.regularizers.pacing.PacedController`, which slows
λ down while the factors are falling fast (with the generic controller λ grew 16-fold
during the fall of the first factors, and every factor of the network collapsed to zero). The units a group must keep (its hardware minimum
width, the highest factors) are exempt from the penalty, as in every method here.

A unit of a residual stream has one factor per BN that writes it; each is a term of R_s and of the
mean, and the unit's score is the largest of them: the channel carries information as long as any
writer has a non-zero scale (``reduce='mean'`` is the alternative).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import HwpruneError
from .base import MinWidthGuard, RegContext, Regularizer, register
from .pacing import PacedController, SpeedMeter
from .scales import UnitScales

REDUCES = ("max", "mean")


def first_gap_threshold(values, upper: float = 1.0, bins: int = 100) -> float:
    """The paper's pruning threshold: histogram ``values`` on [0, upper] in ``bins`` bins and return the
    left edge of the bin after the first local minimum (the first ``i`` with Δh_i ≤ 0 ≤ Δh_{i+1}).
    Factors at or below it are pruned. If the histogram has no such point, the first bin edge
    (``upper/bins``: the paper's 'fixed' rule).

    Example:
        >>> first_gap_threshold([0.0] * 30 + [0.005] * 5 + [0.9] * 40 + [1.0] * 25)
        0.01
        >>> round(first_gap_threshold([0.0] * 30 + [0.015] * 10 + [0.9] * 40), 4)  # the tail in bin 1 goes too
        0.02
    """
    hist, edges = np.histogram(np.asarray(values, dtype=np.float64), bins=bins, range=(0.0, float(upper)))
    diff = np.diff(hist)
    for i in range(len(diff) - 1):
        if diff[i] <= 0 <= diff[i + 1]:
            return float(edges[i + 1])
    return float(edges[1])


def auto_t(target: float | None) -> float:
    """t for a target fraction s of units to remove: ``clip(2·s, 1, 2)`` (1.2 without a target).

    Why 2·s: under R_s alone, with clamping, the factors above the mean γ̄ are pushed down while their
    share ρ exceeds 1 − t/2 and up below it (∂R_s/∂γ_i = t − 1 + (n_above − n_below)/n for γ_i > γ̄), so
    the subgradient dynamics settle with a fraction t/2 at zero (measured: t = 1.2, 1.4, 1.6 leave
    0.64, 0.80, 0.95 at zero from a uniform start), not at Theorem 3.2's global optimum 1/2 + t/4. With
    t = 2·s the regularizer alone can reach the budget and no further; the loss keeps the units it
    needs, and λ sets the balance. This replaces the fine stage of Algorithm 1 (t ± 0.1 per retraining).

    Example:
        >>> auto_t(0.7), auto_t(0.3)
        (1.4, 1.0)
    """
    if target is None:
        return 1.2
    return float(min(2.0, max(1.0, round(2.0 * target, 6))))


@dataclass
class PolarizationConfig:
    """Polarization settings (paper defaults from the official ``main_train.py``).

    ``strength``: initial λ (2e-4), adapted along the schedule when ``adaptive``; ``t`` (1.2) sets how
    hard all factors are pushed down relative to the push apart; ``upper`` is a (1.0).
    ``gamma_init``: None keeps the trained factors (clamped into [0, a]); a number sets every factor to
    it at the start of the regularized stage (the paper's 0.5 is for training from scratch).
    ``reduce``: how a unit with several BNs turns its factors into one score.

    Example:
        >>> PolarizationConfig(t=1.4).t
        1.4
    """

    strength: float = 2e-4
    t: float | None = None
    upper: float = 1.0
    gamma_init: float | None = None
    adaptive: bool = True
    reduce: str = "max"

    def __post_init__(self):
        if not self.strength > 0:
            raise HwpruneError(f"polarization strength {self.strength}: expected a positive number")
        if self.t is not None and not (isinstance(self.t, (int, float)) and -2 <= self.t <= 2):
            raise HwpruneError(f"polarization t {self.t!r}: expected a number in [-2, 2], or none (set from the budget)")
        if not self.upper > 0:
            raise HwpruneError(f"polarization upper {self.upper}: expected a positive bound a for the factors")
        if self.gamma_init is not None and not 0 <= self.gamma_init <= self.upper:
            raise HwpruneError(f"polarization gamma_init {self.gamma_init}: expected a value in [0, upper={self.upper}] or none")
        if self.reduce not in REDUCES:
            raise HwpruneError(f"polarization reduce '{self.reduce}': expected one of {', '.join(REDUCES)}")


@register
class Polarization(Regularizer):
    """λ·(t‖γ‖₁ − ‖γ − γ̄‖₁) over every unit's scale factors, clamped to [0, a]."""

    name = "polarization"
    Config = PolarizationConfig
    solves_strength = True  # its own PacedController (see the module docstring)

    def __init__(self, config: PolarizationConfig, ctx: RegContext):
        super().__init__(config, ctx)
        self.scales = UnitScales(ctx.model, ctx.index)
        self.protect = MinWidthGuard(ctx.index)
        self.t = float(config.t) if config.t is not None else auto_t(ctx.schedule.target if ctx.schedule else None)
        self.controller = PacedController.for_schedule(ctx.schedule) if config.adaptive and ctx.schedule else None
        self.speed = SpeedMeter(scale=config.upper)

    def attach(self, resumed: bool = False) -> None:
        self.scales.attach()
        if not resumed:
            with torch.no_grad():
                if self.config.gamma_init is not None:
                    for t in self.scales.tensors():
                        t.fill_(self.config.gamma_init)
                self.scales.clamp_(0.0, self.config.upper)

    def extra_parameters(self) -> list[dict]:
        return [{"params": [self.scales.gates], "weight_decay": 0.0}] if len(self.scales.gated_units) else []

    def no_weight_decay(self) -> list[torch.Tensor]:
        return self.index.producer_tensors() + self.scales.tensors()

    def penalty(self) -> torch.Tensor | None:
        v, units = self.scales.values()
        if not len(v):
            return None
        mean = v.mean()  # global over the network, and differentiated through (the official code's)
        free = ~self.protect.mask(torch.as_tensor(self.scores()))[units]
        terms = self.t * v.abs() - (v - mean).abs()
        return self.strength * terms[free].sum()

    @torch.no_grad()
    def after_step(self, lr: float, step: int) -> None:
        self.scales.clamp_(0.0, self.config.upper)
        if self.controller is None:
            return
        v, _ = self.scales.values()
        speed = self.speed.update(v.detach(), alive_above=first_gap_threshold(v.detach().numpy(), self.config.upper))
        self.strength = self.controller.update(step + 1, self.zero_fraction(), self.strength, speed)

    def finalize(self, groups, keep) -> None:
        self.scales.fold_gates()

    # --- measurements --------------------------------------------------------------------------
    def scores(self) -> np.ndarray:
        return self.scales.unit_scores(self.config.reduce)

    def cut_threshold(self) -> float:
        """Where the method itself would cut: the first-gap threshold of the unit scores."""
        return first_gap_threshold(self.scores(), self.config.upper)

    def zero_fraction(self) -> float:
        s = self.scores()
        return float(np.mean(s <= first_gap_threshold(s, self.config.upper))) if len(s) else 0.0

    def state_dict(self) -> dict:
        return {"strength": self.strength, "gates": self.scales.gates.detach().clone(), "speed": self.speed.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.strength = float(state["strength"])
        self.scales.gates.data.copy_(state["gates"])
        self.speed.load_state_dict(state["speed"])
