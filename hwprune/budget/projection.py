"""Budgets and the projection that meets them exactly.

A :class:`Budget` says what the user asked for: remove a fraction of the prunable units
(``sparsity``), keep a fraction of the FLOPs or parameters, or meet a latency. :func:`project` chooses
which units to keep, in two steps:

1. **how many** units each group keeps: an allocation policy (:mod:`hwprune.budget.allocation`: ``global``
   by default, ``uniform``, ``sensitivity``, ``learned``) over the counts the hardware allows (a
   multiple of the group's multiple, or the full width; never zero);
2. **which**: within each group the units with the highest scores stay.

Exactness: a sparsity budget removes the reachable number of units nearest ``s·N`` (with multiples of
1 exactly ``round(s·N)``); FLOPs and parameter budgets land within 1% of the request, or, when no
combination of allowed widths is that close, at the nearest reachable cost; a latency budget is a
ceiling, met within 1% below it where reachable. :attr:`Projection.status` and
:attr:`Projection.reason` say which happened and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from .cost import CostModel
from ..errors import BudgetError
from ..graph.groups import Group

if TYPE_CHECKING:
    from .allocation import AllocationConfig

DEFAULT_ALLOCATION = "global"  # the policy that won docs/benchmarks.md's allocation comparison


@dataclass(frozen=True)
class BudgetKind:
    """One kind of budget: its flag, what values it takes, and what it measures.

    ``measure``: ``units`` (a fraction of the prunable units removed), ``fraction`` (a fraction of
    the cost kept), ``ms`` (a latency ceiling) or ``relative`` (a speedup over the measured dense
    model, turned into ``ms`` by :meth:`Budget.as_latency`); ``cost``: the cost model it needs
    (``flops``, ``params``, ``latency``; None for a count of units); ``arg``: its name in
    :func:`hwprune.fit` and the CLI's argument.
    """

    name: str
    flag: str
    arg: str
    measure: str
    cost: str | None
    accepts: Callable[[float], bool]
    expected: str
    phrase: Callable[[float], str]
    # The allocation this kind of budget uses when neither --allocation nor the method decides: latency
    # budgets keep the uniform width. Measured (docs/benchmarks.md, ResNet-20 at --speedup 2, pretrained,
    # seeds 0 and 1): uniform 84.25% / 81.55%, the global solver 83.15% / 82.85% (weighting groups by
    # FLOPs share; by latency share it reached 77.20% on seed 0, a profile flat at a stream's top step
    # made the stream look worthless). A tie so far: the uniform width stays, the simpler plan to predict.
    allocation: str | None = None


KINDS: dict[str, BudgetKind] = {}


def _register(kind: BudgetKind) -> None:
    if kind.name in KINDS:
        raise ValueError(f"budget kind '{kind.name}' is registered twice")
    KINDS[kind.name] = kind


_register(BudgetKind("sparsity", "--sparsity", "sparsity", "units", None, lambda v: 0.0 <= v < 1.0,
                     "a fraction of units to remove in [0, 1)", lambda v: f"remove {v:.0%} of the prunable units"))
_register(BudgetKind("flops", "--flops", "flops", "fraction", "flops", lambda v: 0.0 < v <= 1.0,
                     "the fraction to keep, in (0, 1]", lambda v: f"keep {v:.0%} of the FLOPS"))
_register(BudgetKind("params", "--params", "params", "fraction", "params", lambda v: 0.0 < v <= 1.0,
                     "the fraction to keep, in (0, 1]", lambda v: f"keep {v:.0%} of the params"))
_register(BudgetKind("latency", "--latency-ms", "latency_ms", "ms", "latency", lambda v: v > 0,
                     "a positive number of milliseconds", lambda v: f"latency at most {v:g} ms", "uniform"))
_register(BudgetKind("speedup", "--speedup", "speedup", "relative", "latency", lambda v: v >= 1,
                     "a factor of at least 1 (2 = twice as fast as the dense model)",
                     lambda v: f"at least {v:g}x faster than the dense model (measured latency)", "uniform"))


@dataclass(frozen=True)
class Budget:
    """What to reach. ``sparsity``: fraction of units removed; ``flops``/``params``: fraction kept;
    ``latency``: milliseconds; ``speedup``: the dense model's measured latency divided by this (a run
    turns it into milliseconds once it has measured the dense model, see :meth:`as_latency`).

    Example:
        >>> Budget("sparsity", 0.7).describe()
        'remove 70% of the prunable units'
    """

    kind: str
    value: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise BudgetError(f"budget kind '{self.kind}': expected one of {', '.join(KINDS)}")
        v, k = self.value, KINDS[self.kind]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or v in (float("inf"), float("-inf")):
            raise BudgetError(f"{k.flag} {v!r}: expected {k.expected}")
        if not k.accepts(v):
            raise BudgetError(f"{k.flag} {v}: expected {k.expected}")

    @property
    def spec(self) -> BudgetKind:
        """The registered :class:`BudgetKind` of this budget."""
        return KINDS[self.kind]

    def as_latency(self, dense_ms: float) -> "Budget":
        """The millisecond budget of a ``speedup`` (others are returned as they are)."""
        return Budget("latency", dense_ms / self.value) if self.spec.measure == "relative" else self

    def describe(self) -> str:
        return self.spec.phrase(self.value)


@dataclass
class Projection:
    """Which units stay, and how close the result is to the request."""

    keep: dict[str, np.ndarray]
    kind: str
    requested: float
    achieved: float
    units: int
    removed_units: int
    keep_mask: np.ndarray = field(repr=False)
    allocation: str = DEFAULT_ALLOCATION
    status: str = "exact"  # exact | within-tolerance | nearest-reachable | nearest-found (hwprune.budget.allocation)
    reason: str = ""

    @property
    def sparsity(self) -> float:
        return self.removed_units / self.units if self.units else 0.0


class _UnitCount:
    """Cost = number of kept units; every unit saves 1."""

    def __call__(self, keep):
        return float(keep.sum())

    def batch(self, keeps):
        return np.asarray(keeps).sum(axis=0)

    def unit_savings(self, keep):
        return np.ones(len(keep))


def _target_and_cost(budget: Budget, n_units: int, cost: CostModel | None):
    measure = budget.spec.measure
    if measure == "relative":
        raise BudgetError("a speedup budget is turned into milliseconds (Budget.as_latency) before it is projected")
    if measure == "units":
        return n_units * (1.0 - budget.value), _UnitCount()
    if cost is None:
        raise BudgetError(f"a {budget.kind} budget needs a cost model")
    if measure == "ms":
        return budget.value, cost
    return budget.value * cost(np.ones(n_units)), cost


def reachable(groups: list[Group], budget: Budget, cost: CostModel | None = None) -> tuple[float, float]:
    """The (lowest, highest) value of the budget's measure that the groups can reach."""
    prunable = [g for g in groups if g.prunable]
    n = sum(g.size for g in prunable)
    mins = np.concatenate([np.r_[np.ones(g.min_keep), np.zeros(g.size - g.min_keep)] for g in prunable]) if prunable else np.zeros(0)
    if budget.spec.measure == "units":
        return 0.0, (n - mins.sum()) / n if n else 0.0
    full = cost(np.ones(n))
    if budget.spec.measure == "ms":
        return cost(mins), full
    return cost(mins) / full, 1.0


def no_prunable_groups_message(groups) -> str:
    """Why nothing can be pruned, layer by layer (never a bare "no prunable groups")."""
    from ..graph.diagnose import explain

    unpruned = getattr(groups, "unpruned", None)
    if not unpruned:
        return ("the model has no prunable groups: it has no conv or linear layer whose output channels "
                "hwprune can remove (all are coupled to the model's inputs or outputs)")
    return ("the model has no prunable groups. Every conv/linear layer keeps its output channels, because:\n"
            + explain(unpruned) + "\nRemove the cause named for a layer (or stop excluding it) to prune it")


def _layers_that_stay(groups) -> str:
    """For a budget the model cannot meet: the layers that keep their width and why ('' when none do),
    since those, not the budget, are often what the user can change."""
    from ..graph.diagnose import MODEL_OUTPUT, explain

    # the classifier's output is the model's in every model: naming it would only hide the layers that matter
    unpruned = {k: v for k, v in (getattr(groups, "unpruned", None) or {}).items() if v != MODEL_OUTPUT}
    if not unpruned:
        return ""
    return ("\nThese layers keep their output width:\n" + explain(unpruned)
            + "\nRemove the cause named for a layer to prune it too, or ask for less")


def check_budget(groups: list[Group], budget: Budget, cost: CostModel | None = None) -> None:
    """Reject a budget the model cannot meet, before any training, with the reachable range."""
    prunable = [g for g in groups if g.prunable]
    measure = budget.spec.measure
    if not prunable and not (measure == "units" and budget.value == 0):
        raise BudgetError(no_prunable_groups_message(groups))
    if measure == "relative":
        raise BudgetError("a speedup budget is turned into milliseconds (Budget.as_latency) before it is checked")
    lo, hi = reachable(groups, budget, cost)
    if measure == "units" and len({g.kind == "heads" for g in prunable}) > 1:
        # removed from heads and from the other units separately (see _project_per_kind)
        for heads, what in ((True, "attention heads"), (False, "neurons and channels")):
            _, top = reachable([g for g in prunable if (g.kind == "heads") == heads], budget)
            if budget.value > top + 1e-9:
                raise BudgetError(
                    f"--sparsity {budget.value:g} cannot be met for the {what}: every layer keeps at least one "
                    f"hardware multiple, so at most {top:.4f} of them can go. Reachable range: [0, {top:.4f}]")
    if measure == "units" and budget.value > hi + 1e-9:
        raise BudgetError(
            f"--sparsity {budget.value:g} cannot be met: every layer keeps at least one hardware multiple, so at "
            f"most {hi:.4f} of the units can go. Reachable range: [0, {hi:.4f}]" + _layers_that_stay(groups)
        )
    if measure == "fraction" and budget.value < lo - 1e-9:
        raise BudgetError(
            f"--{budget.kind} {budget.value:g} cannot be met: with every layer at its minimum width the model keeps "
            f"{lo:.4f} of its {budget.kind}. Reachable range: [{lo:.4f}, 1]" + _layers_that_stay(groups)
        )
    if measure == "ms" and budget.value < lo:
        raise BudgetError(
            f"--latency-ms {budget.value:.4g} cannot be met: the predicted floor (every layer at its minimum width) is "
            f"{lo:.4g} ms; the dense model is {hi:.4g} ms. Reachable range: [{lo:.4g}, {hi:.4g}] ms "
            f"(a speedup of at most {hi / lo:.2f}x)" + _layers_that_stay(groups)
        )
    if measure == "ms" and budget.value >= hi:
        raise BudgetError(
            f"--latency-ms {budget.value:.4g} asks for nothing: the dense model is already {hi:.4g} ms, so no unit "
            f"needs to go. Give a budget under {hi:.4g} ms (the floor is {lo:.4g} ms), or --speedup S with S > 1"
        )


def project(groups: list[Group], scores: np.ndarray, budget: Budget, cost: CostModel | None = None,
            allocation: "AllocationConfig | str | None" = None, sensitivity=None, share_cost=None) -> Projection:
    """Choose the kept units of every prunable group so that the budget is met as exactly as the
    hardware multiples allow.

    ``scores``: one importance value per unit, in the order of the prunable groups (as
    :class:`~hwprune.graph.groups.UnitIndex` numbers them); within a group the lowest go first.
    ``allocation``: the policy that decides each group's kept count (a name or an
    :class:`~hwprune.budget.allocation.AllocationConfig`; default ``global``). ``sensitivity``: per prunable
    group, the measured loss increase at each allowed count (for the ``sensitivity`` policy).
    ``share_cost``: the cost whose shares weight the groups in ``global`` (default ``cost``; the
    pipeline passes the FLOPs model with a latency budget).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hwprune.graph import discover_groups
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 1))
        >>> groups = discover_groups(net, torch.zeros(1, 3, 8, 8))         # two groups of 16 channels
        >>> proj = project(groups, np.random.default_rng(0).random(32), Budget("sparsity", 0.7))
        >>> proj.achieved, proj.status                                     # 22 of 32 removed: nearest to 22.4
        (0.6875, 'exact')
        >>> {name: len(kept) for name, kept in proj.keep.items()}
        {'0': 5, '2': 5}
    """
    from .allocation import AllocationConfig

    config = allocation if isinstance(allocation, AllocationConfig) else AllocationConfig(allocation or DEFAULT_ALLOCATION)
    check_budget(groups, budget, cost)
    prunable = [g for g in groups if g.prunable]
    scores = np.asarray(scores, dtype=np.float64)
    units = budget.spec.measure == "units"
    if units and len({g.kind == "heads" for g in prunable}) > 1:
        return _project_per_kind(prunable, scores, budget, config)
    offsets = np.concatenate([[0], np.cumsum([g.size for g in prunable])]).astype(np.int64)
    n = int(offsets[-1])
    if scores.shape != (n,):
        raise ValueError(f"expected {n} scores, got {scores.shape}")
    target, cost_fn = _target_and_cost(budget, n, cost)
    if (units and config.policy == "learned" and config.floor <= 0 and np.isinf(config.cap)
            and all(g.multiple == 1 for g in prunable)):
        keep, current = _unit_steps(prunable, offsets, scores, target)  # tens of thousands of blocks: one sort
        return _result(prunable, offsets, keep, current, budget, cost_fn, config.policy, "exact",
                       f"{int(n - keep.sum())} of {n} units removed: round({budget.value:g} x {n})")
    return _allocate(prunable, offsets, scores, budget, target, cost_fn, config, sensitivity, share_cost)


def _allocate(prunable, offsets, scores, budget, target, cost_fn, config, sensitivity, share_cost=None) -> Projection:
    from .allocation import allocate, build_problem, keep_indices

    measure = budget.spec.measure
    problem = build_problem(prunable, scores, budget.kind, target, cost_fn, ceiling=measure == "ms",
                            share_fn=share_cost)
    alloc = allocate(problem, config, sensitivity, keep_target=target if measure == "units" else None)
    keep = np.zeros(int(offsets[-1]))
    for i, idx in enumerate(keep_indices(problem, alloc.counts)):
        keep[offsets[i] + idx] = 1.0
    return _result(prunable, offsets, keep, cost_fn(keep), budget, cost_fn, alloc.policy, alloc.status, alloc.reason)


def _unit_steps(prunable, offsets, scores, target):
    """The greedy's result when every unit can go on its own and costs 1 (sparsity, no multiples):
    the lowest scores overall, each group keeping its ``min_keep`` best. Equal to :func:`_greedy`
    (ties: lower group first, then lower index) but one sort instead of one pass per unit: blocks
    make tens of thousands of units, where the greedy took a minute (29,645 blocks: 58 s)."""
    n = int(offsets[-1])
    keep = np.ones(n)
    removable, group_of, rank = [], [], []
    for i, g in enumerate(prunable):
        local = np.argsort(scores[offsets[i] : offsets[i + 1]], kind="stable")[: g.size - g.min_keep]
        removable.append(offsets[i] + local)
        group_of.append(np.full(len(local), i))
        rank.append(np.arange(len(local)))
    removable = np.concatenate(removable) if removable else np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.concatenate(rank) if rank else [], np.concatenate(group_of) if group_of else [],
                        scores[removable]))
    # How many go: the greedy's stopping rule on the count alone (each step removes one unit).
    current, removed = float(n), 0
    while current > target + 1e-9 and removed < len(removable):
        after = current - 1
        if after < target - 1e-9:
            stay, go = (round(abs(current - target), 9), 1), (round(abs(after - target), 9), 0 if after <= target + 1e-9 else 1)
            if go <= stay:  # equal: the greedy removes (a removal outranks staying)
                removed, current = removed + 1, after
            break
        removed, current = removed + 1, after
    keep[removable[order[:removed]]] = 0
    return keep, current


def _result(prunable, offsets, keep, current, budget, cost_fn, policy, status, reason) -> Projection:
    n = int(offsets[-1])
    keep_by_group = {
        g.name: np.flatnonzero(keep[offsets[i] : offsets[i + 1]]) for i, g in enumerate(prunable)
    }
    removed = int(n - keep.sum())
    measure = budget.spec.measure
    achieved = removed / n if measure == "units" else current if measure == "ms" else current / cost_fn(np.ones(n))
    return Projection(keep_by_group, budget.kind, budget.value, achieved, n, removed, keep.astype(bool), policy,
                      status, reason)


def _project_per_kind(prunable: list[Group], scores: np.ndarray, budget: Budget, config) -> Projection:
    """A sparsity budget over attention heads *and* other units: the fraction is removed from each kind
    separately. A head (Q, K, V rows and output columns: 4·d·hidden weights) and an FFN neuron
    (2·hidden weights) are not the same amount of model, so one global count would let either kind
    absorb the budget (seen on MiniLM in a short run: a global 50% kept 69 of 72 heads and cut the FFN instead)."""
    offsets = np.concatenate([[0], np.cumsum([g.size for g in prunable])]).astype(np.int64)
    keep, mask, removed = {}, np.ones(int(offsets[-1]), dtype=bool), 0
    for heads in (True, False):
        idx = [i for i, g in enumerate(prunable) if (g.kind == "heads") == heads]
        part = np.concatenate([scores[offsets[i] : offsets[i + 1]] for i in idx])
        sub = project([prunable[i] for i in idx], part, budget, allocation=config)
        keep.update(sub.keep)
        removed += sub.removed_units
        for i in idx:
            m = np.zeros(prunable[i].size, dtype=bool)
            m[sub.keep[prunable[i].name]] = True
            mask[offsets[i] : offsets[i + 1]] = m
    n = int(offsets[-1])
    return Projection(keep, budget.kind, budget.value, removed / n, n, removed, mask, config.policy, sub.status,
                      "attention heads and the other units each lose the fraction asked")
