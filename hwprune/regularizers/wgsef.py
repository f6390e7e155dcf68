"""WGSEF: the weighted group sparse envelope function, trained by proximal SGD (METHODS.md §1).

After every optimizer step the parameters of all units go through the prox of ``lr·λ·WGSEF_k``:
units whose norm per unit weight is below a threshold τ become exactly zero, the largest ``k`` are
shrunk like ridge, and the band between gets a group soft-threshold. ``k`` is the number of units the
budget keeps; λ is solved every step (``adaptive``, :class:`WgsefConfig`): the smallest strength whose prox
leaves the scheduled number of units at zero.

Unit weights ``w_i`` (the √d_i of §1.3); ``auto`` (the default) takes ``allocation`` when the run has an
allocation plan (channel runs), else ``cost`` with a FLOPs or latency cost, else ``size``:

* ``size``: ``d_i ∝ |G_i|``, the number of entries of the unit, so wide and narrow units are
  compared per entry, as in group lasso's √|G| scaling;
* ``uniform``: ``d_i = 1``;
* ``cost``: ``d_i ∝ |G_i| · cost_i``, with cost_i the FLOPs (or latency) a unit costs: costly units
  are pushed to zero first;
* ``allocation`` (:mod:`hwprune.budget.allocation`): every
  unit of a group gets the norm at which the plan cuts that group (between its last kept and first
  removed unit at the start of the stage), so that ``a_i / w_i`` crosses 1 at the planned width in
  every group and the single global threshold of the envelope removes what the plan removes. The
  ``cost`` weighting gave the ResNet-20 stem stream ``a/w`` = 0.68 against 1.24-2.86 for the other
  groups at 25% of the FLOPs: the stream went first whatever its weights (the projection's old bias).

Weights are normalized to mean square 1, so λ means the same thing whatever the model.

With ``hspg=True`` the proximal stage ends after ``hspg_switch`` of the regularized steps and the
half-space stage of HSPG follows (METHODS.md §1.8, :mod:`hwprune.regularizers.hspg`): zero units stay
zero, and a unit whose step leaves the half-space ⟨θ̃, θ⟩ ≥ ε‖θ‖² is set to zero; λ keeps the value
the proximal stage ended with. The projection to the budget follows as for plain WGSEF.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import HwpruneError
from .base import MinWidthGuard, RegContext, Regularizer, register
from .hspg import HalfSpaceStep
from .wgsef_math import wgsef_prox_norms

WEIGHTINGS = ("size", "uniform", "cost", "allocation")


@dataclass
class WgsefConfig:
    """WGSEF settings.

    ``adaptive`` (default): every step, λ is the smallest strength whose prox leaves the scheduled
    number of units at zero (a bisection on log λ; the zero count grows with λ), capped so that the
    median surviving unit loses at most ``max_shrink`` of its norm per step. Otherwise λ is the fixed
    ``strength``.

    ``hspg``: add the half-space stage after the first ``hspg_switch`` of the regularized steps (0.6:
    where the sparsity schedule reaches the budget), with threshold ``hspg_epsilon`` ∈ [0, 1) (0.0, the
    OTO code's default).

    Example:
        >>> WgsefConfig(hspg=True).hspg_switch
        0.6
    """

    strength: float = 1e-3
    weighting: str = "auto"
    adaptive: bool = True
    max_shrink: float = 0.05
    hspg: bool = False
    hspg_switch: float = 0.6
    hspg_epsilon: float = 0.0

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS + ("auto",):
            raise HwpruneError(f"wgsef weighting '{self.weighting}': expected one of auto, {', '.join(WEIGHTINGS)}")
        if not self.strength > 0:
            raise HwpruneError(f"wgsef strength {self.strength}: expected a positive number")
        if not 0 < self.max_shrink < 1:
            raise HwpruneError(f"wgsef max_shrink {self.max_shrink}: expected a fraction in (0, 1)")
        if not isinstance(self.hspg, bool):
            raise HwpruneError(f"wgsef hspg {self.hspg!r}: expected true or false")
        if not 0 <= self.hspg_switch <= 1:
            raise HwpruneError(f"wgsef hspg_switch {self.hspg_switch}: expected the fraction of regularized steps in [0, 1]")
        if not 0 <= self.hspg_epsilon < 1:
            raise HwpruneError(f"wgsef hspg_epsilon {self.hspg_epsilon}: expected a value in [0, 1)")


def unit_weights(weighting: str, ctx: RegContext) -> torch.Tensor:
    """The w_i of every unit, normalized to mean square 1."""
    sizes = ctx.index.sizes().clamp_min(1.0)
    if weighting == "uniform":
        d = torch.ones_like(sizes)
    elif weighting == "allocation":
        return _allocation_weights(ctx)
    elif weighting == "cost":
        if ctx.unit_costs is None:
            raise HwpruneError("wgsef weighting 'cost' needs a FLOPs or latency budget")
        cost = torch.as_tensor(ctx.unit_costs, dtype=torch.float64).clamp_min(0)
        cost = cost / cost[cost > 0].mean() if (cost > 0).any() else torch.ones_like(cost)
        d = sizes * cost.clamp_min(1e-3)
    else:
        d = sizes
    d = d / d.mean()
    return d.sqrt()


def _allocation_weights(ctx: RegContext) -> torch.Tensor:
    """Per group, the unit norm where the planned cut falls (mean of the last kept and the first removed
    norm; a group kept whole gets half its smallest norm, so it stays above the threshold)."""
    if ctx.planned_keep is None:
        raise HwpruneError("wgsef weighting 'allocation' needs the run's allocation plan (channels, not blocks)")
    norms = ctx.index.sq_norms().clamp_min(0).sqrt().double().cpu()
    w = torch.empty_like(norms)
    for g, off, keep in zip(ctx.index.groups, ctx.index.offsets, ctx.planned_keep):
        a = torch.sort(norms[int(off) : int(off) + g.size], descending=True).values
        cut = 0.5 * float(a[-1]) if keep >= g.size else 0.5 * float(a[keep - 1] + a[keep])
        w[int(off) : int(off) + g.size] = cut
    positive = w[w > 0]
    w = torch.where(w > 0, w, positive.min() if len(positive) else torch.ones_like(w))
    return w / w.pow(2).mean().sqrt()


@register
class Wgsef(Regularizer):
    """Proximal WGSEF over all units of all prunable groups (one global term, one k)."""

    name = "wgsef"
    Config = WgsefConfig
    solves_strength = True

    def __init__(self, config: WgsefConfig, ctx: RegContext):
        super().__init__(config, ctx)
        weighting = config.weighting
        if weighting == "auto":
            weighting = "allocation" if ctx.planned_keep is not None else "cost" if ctx.unit_costs is not None else "size"
        self.weighting = weighting
        self.w = unit_weights(weighting, ctx)
        self.protect = MinWidthGuard(ctx.index)
        # The protected units are kept anyway; the envelope ranks the others against what remains.
        self.k = max(1, int(ctx.keep_units) - self.protect.count)
        self._last: dict[str, float] = {}  # previous step's search results (warm start)
        self.halfspace = HalfSpaceStep(ctx.index, self.w, self.k, self.protect, config.hspg_epsilon) if config.hspg else None
        self.hspg_start = int(config.hspg_switch * ctx.total_steps)

    @torch.no_grad()
    def after_step(self, lr: float, step: int) -> None:
        hs = self.halfspace
        if hs is not None and step >= self.hspg_start and hs.step(lr, self.strength):
            return
        self._prox_step(lr, step)
        if hs is not None and step + 1 >= self.hspg_start:
            hs.remember()  # θ_t for the next step's half-space test

    def state_dict(self) -> dict:
        state = super().state_dict()
        # the unit weights (the allocation weighting reads the norms at the stage's start) and the
        # searches' warm starts: without them a resumed stage would not replay exactly
        state["w"] = self.w.detach().clone()
        state["last"] = dict(self._last)
        if self.halfspace is not None:
            state["halfspace_prev"] = self.halfspace.state_dict()  # θ_t, so that a resumed stage replays
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("w") is not None:
            self.w.copy_(state["w"])  # in place: the half-space step holds the same tensor
        self._last = dict(state.get("last") or {})
        if self.halfspace is not None and state.get("halfspace_prev") is not None:
            self.halfspace.load_state_dict(state["halfspace_prev"])

    @torch.no_grad()
    def _prox_step(self, lr: float, step: int) -> None:
        a = self.unit_norms().double()
        w = self.w.to(a.device)
        free = ~self.protect.mask(a / w)
        af, wf = a[free], w[free]
        schedule = self.ctx.schedule
        if self.config.adaptive and schedule is not None:
            wanted = int(round(schedule.wanted(step + 1) * self.index.n_units))
            if wanted == 0:
                return
            t = self._solve(af, wf, wanted)
            self.strength = t / lr if lr > 0 else self.strength
        else:
            t = lr * self.strength
        r = a.clone()
        r[free] = wgsef_prox_norms(af, wf, self.k, t)
        factor = torch.where(a > 0, r / a.clamp_min(1e-300), torch.zeros_like(a))
        self.index.scale_(factor)

    def _solve(self, a: torch.Tensor, w: torch.Tensor, wanted: int) -> float:
        """Prox parameter t = lr·λ for this step: the smallest t whose prox leaves ``wanted`` zero units,
        but no larger than what shrinks the median surviving unit by ``max_shrink``.

        While the unit norms are alike, zeroing even one unit would soft-threshold every unit by about
        its norm; the cap keeps the pressure gentle until training has spread the norms apart, and the
        zero count then catches up with the schedule (the projection removes whatever remains).
        Both searches start from the previous step's values, so a step costs about 20 prox calls.
        """

        def prox(t: float) -> torch.Tensor:
            return wgsef_prox_norms(a, w, self.k, t)

        def gentle(t: float) -> bool:
            r = prox(t)
            alive = (r > 0) & (a > 0)
            return not alive.any() or float((1 - r[alive] / a[alive]).median()) <= self.config.max_shrink

        def enough(t: float) -> bool:
            return int((prox(t) == 0).sum()) >= wanted

        t_max = _log_search(gentle, self._last.get("t_max"), want_largest=True)
        self._last["t_max"] = t_max
        if not enough(t_max):
            return t_max
        t = _log_search(enough, self._last.get("t"), want_largest=False, hi_bound=t_max)
        self._last["t"] = t
        return t


def _log_search(pred, guess: float | None, *, want_largest: bool, hi_bound: float = 1e6, iters: int = 12) -> float:
    """Bisection on log t for a monotone predicate (true for small t if ``want_largest``, for large t if
    not): the largest t where it holds, or the smallest. Brackets around ``guess`` first."""
    lo_bound = 1e-12
    if guess is None or not lo_bound < guess < hi_bound:
        lo, hi = lo_bound, hi_bound
        iters = 60
    else:
        lo, hi = max(lo_bound, guess / 4), min(hi_bound, guess * 4)
        # widen until the bracket holds the switch point
        while lo > lo_bound and pred(lo) != want_largest:
            lo = max(lo_bound, lo / 16)
        while hi < hi_bound and pred(hi) == want_largest:
            hi = min(hi_bound, hi * 16)
    if want_largest and pred(hi):
        return hi
    if not want_largest and pred(lo):
        return lo
    for _ in range(iters):
        mid = math.sqrt(lo * hi)
        if pred(mid) == want_largest:
            lo = mid
        else:
            hi = mid
    return lo if want_largest else hi
