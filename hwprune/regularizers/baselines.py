"""Training-time baselines (METHODS.md §5): group lasso, network slimming, DeepHoyer.

Each reaches the budget without a grid search: group lasso computes its per-step threshold from the
sparsity schedule (like WGSEF); slimming and DeepHoyer, whose strength steers sparsity only
indirectly, are steered by the trainer's StrengthController along the same schedule; all end with the
exact projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import HwpruneError
from .base import MinWidthGuard, RegContext, Regularizer, SeparationProgress, register
from .scales import UnitScales
from .wgsef import unit_weights


def near_zero_fraction(scores: np.ndarray, keep: int, rel: float = 0.05) -> float:
    """Fraction of units whose score is at most ``rel`` times the median score of the ``keep`` largest:
    'removed' for methods that drive units towards zero without reaching it exactly (subgradient L1,
    Hoyer). The reference is the units the budget keeps, so the measure neither depends on one outlier
    (the maximum) nor on the units being removed."""
    if len(scores) == 0:
        return 0.0
    keep = max(1, min(int(keep), len(scores)))
    ref = float(np.median(np.sort(scores)[-keep:]))
    return float(np.mean(scores <= rel * ref)) if ref > 0 else 1.0


def _positive_strength(method: str, strength: float) -> None:
    """A strength <= 0 turns the penalty off or into a reward for large units (the controller only
    multiplies it, so it never changes sign): refused, as every method's."""
    if not strength > 0:
        raise HwpruneError(f"{method} strength {strength}: expected a positive number")


def _progress(ctx: RegContext) -> SeparationProgress:
    target = ctx.schedule.target if ctx.schedule is not None else 0.0
    return SeparationProgress(target, ctx.keep_units)


@dataclass
class GroupLassoConfig:
    """Group lasso with its proximal operator (group soft-threshold, METHODS.md §5.2).

    ``adaptive``: each step the threshold is the smallest that leaves the scheduled number of units at
    zero, capped so the median surviving unit shrinks by at most ``max_shrink``; else ``strength``
    (λ) is fixed. Unit weights c_i ∝ √|G_i|.
    """

    strength: float = 1e-3
    adaptive: bool = True
    max_shrink: float = 0.05

    def __post_init__(self):
        _positive_strength("group-lasso", self.strength)
        if not 0 < self.max_shrink < 1:
            raise HwpruneError(f"group-lasso max_shrink {self.max_shrink}: expected a fraction in (0, 1)")


@register
class GroupLasso(Regularizer):
    name = "group-lasso"
    Config = GroupLassoConfig
    solves_strength = True

    def __init__(self, config, ctx: RegContext):
        super().__init__(config, ctx)
        self.c = unit_weights("size", ctx)
        self.protect = MinWidthGuard(ctx.index)

    @torch.no_grad()
    def after_step(self, lr: float, step: int) -> None:
        a = self.unit_norms().double()
        ratio = a / self.c
        free = ~self.protect.mask(ratio)
        schedule = self.ctx.schedule
        if self.config.adaptive and schedule is not None:
            wanted = int(round(schedule.wanted(step + 1) * self.index.n_units))
            if wanted == 0:
                return
            r = torch.sort(ratio[free]).values
            t = float(r[min(wanted, len(r)) - 1])  # zeroes exactly the `wanted` smallest free units
            survivors = r[r > t]
            if len(survivors):
                t = min(t, self.config.max_shrink * float(survivors.median()))
            self.strength = t / lr if lr > 0 else self.strength
        else:
            t = lr * self.strength
        factor = torch.where(free & (ratio > t), 1 - t / ratio.clamp_min(1e-300), torch.zeros_like(a))
        factor[~free] = 1.0
        self.index.scale_(factor)

    def scores(self) -> np.ndarray:
        return (self.unit_norms().double().cpu() / self.c).numpy()


@dataclass
class SlimmingConfig:
    """Network slimming (Liu et al. 2017): L1 on the BN scale factors, subgradient (METHODS.md §5.1).

    ``strength`` is the initial s (the paper's 1e-4 for VGG); with ``adaptive`` the trainer moves it
    along the sparsity schedule. Units without a BN get a gate (a scale factor of their own).
    """

    strength: float = 1e-4
    adaptive: bool = True

    def __post_init__(self):
        _positive_strength("slimming", self.strength)


@register
class Slimming(Regularizer):
    name = "slimming"
    Config = SlimmingConfig
    controller_max_step = 2.0  # steered by separation, which answers at once

    def __init__(self, config, ctx: RegContext):
        super().__init__(config, ctx)
        self.scales = UnitScales(ctx.model, ctx.index)
        self.progress = _progress(ctx)

    def attach(self, resumed: bool = False) -> None:
        self.scales.attach()

    def extra_parameters(self) -> list[dict]:
        return [{"params": [self.scales.gates], "weight_decay": 0.0}] if len(self.scales.gated_units) else []

    def penalty(self) -> torch.Tensor | None:
        v, _ = self.scales.values()
        return self.strength * v.abs().sum()

    def scores(self) -> np.ndarray:
        return self.scales.unit_scores("mean")

    def zero_fraction(self) -> float:
        return near_zero_fraction(self.scores(), self.ctx.keep_units)

    def control_value(self) -> float:
        return self.progress(self.scores())

    def finalize(self, groups, keep) -> None:
        self.scales.fold_gates()

    def state_dict(self) -> dict:
        return {"strength": self.strength, "gates": self.scales.gates.detach().clone(), "r0": self.progress.r0}

    def load_state_dict(self, state: dict) -> None:
        self.strength = float(state["strength"])
        self.scales.gates.data.copy_(state["gates"])
        self.progress.r0 = state.get("r0")


@dataclass
class DeepHoyerConfig:
    """DeepHoyer's Group-HS (Yang et al. 2020, METHODS.md §5.3): per group of units,
    (Σ_u ‖W_u‖)² / Σ_u ‖W_u‖², a scale-invariant sparsity measure, added to the loss with strength
    ``strength`` (the paper's decay 1e-3), adapted along the schedule when ``adaptive``."""

    strength: float = 1e-3
    adaptive: bool = True

    def __post_init__(self):
        _positive_strength("deephoyer", self.strength)


@register
class DeepHoyer(Regularizer):
    name = "deephoyer"
    Config = DeepHoyerConfig
    controller_max_step = 2.0  # steered by separation, which answers at once

    def __init__(self, config, ctx: RegContext):
        super().__init__(config, ctx)
        self.group_id = torch.as_tensor(ctx.index.group_of_unit(), dtype=torch.long)
        self.n_groups = len(ctx.index.groups)
        self.progress = _progress(ctx)

    def penalty(self) -> torch.Tensor | None:
        norms = (self.index.sq_norms_differentiable() + 1e-12).sqrt()
        gid = self.group_id.to(norms.device)
        s1 = torch.zeros(self.n_groups, dtype=norms.dtype, device=norms.device).index_add(0, gid, norms)
        s2 = torch.zeros(self.n_groups, dtype=norms.dtype, device=norms.device).index_add(0, gid, norms * norms)
        return self.strength * (s1 * s1 / s2.clamp_min(1e-12)).sum()  # guard ‖W‖ → 0 (METHODS.md §5.3)

    def zero_fraction(self) -> float:
        return near_zero_fraction(self.scores(), self.ctx.keep_units)

    def control_value(self) -> float:
        return self.progress(self.scores())

    def state_dict(self) -> dict:
        return {"strength": self.strength, "r0": self.progress.r0}

    def load_state_dict(self, state: dict) -> None:
        self.strength = float(state["strength"])
        self.progress.r0 = state.get("r0")
