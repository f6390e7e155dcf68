"""Budgets and the projection that meets them exactly.

A :class:`Budget` says what the user asked for: remove a fraction of the prunable units
(``sparsity``), keep a fraction of the FLOPs or parameters, or meet a latency. :func:`project` chooses
which units to keep:

* every group keeps a count its hardware multiple allows (a multiple, or the full width), never zero;
* units are removed in those chunks, least important first: the chunk with the smallest
  *score per unit of cost saved* goes next (score = unit norm / unit weight; for sparsity every unit
  costs 1, for FLOPs the saving is the marginal MACs, recomputed after each removal);
* it stops at the achievable cost closest to the target (ties: the one that meets the budget); a
  latency budget is a ceiling: it stops at the closest cost that meets it.

With multiples of 1 a sparsity budget is met exactly: ``round(s·N)`` of the ``N`` units go.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .cost import CostModel
from .errors import BudgetError
from .groups import Group

KINDS = ("sparsity", "flops", "params", "latency", "speedup")


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
        v = self.value
        if not isinstance(v, (int, float)) or v != v:
            raise BudgetError(f"--{self.kind}: expected a number, got {v!r}")
        if self.kind == "sparsity" and not 0.0 <= v < 1.0:
            raise BudgetError(f"--sparsity {v}: expected a fraction of units to remove in [0, 1)")
        if self.kind in ("flops", "params") and not 0.0 < v <= 1.0:
            raise BudgetError(f"--{self.kind} {v}: expected the fraction to keep, in (0, 1]")
        if self.kind == "latency" and not v > 0:
            raise BudgetError(f"--latency-ms {v}: expected a positive number of milliseconds")
        if self.kind == "speedup" and not v >= 1:
            raise BudgetError(f"--speedup {v}: expected a factor of at least 1 (2 = twice as fast as the dense model)")

    def as_latency(self, dense_ms: float) -> "Budget":
        """The millisecond budget of a ``speedup`` (others are returned as they are)."""
        return Budget("latency", dense_ms / self.value) if self.kind == "speedup" else self

    def describe(self) -> str:
        if self.kind == "sparsity":
            return f"remove {self.value:.0%} of the prunable units"
        if self.kind == "latency":
            return f"latency at most {self.value:g} ms"
        if self.kind == "speedup":
            return f"at least {self.value:g}x faster than the dense model (measured latency)"
        return f"keep {self.value:.0%} of the {self.kind.upper() if self.kind == 'flops' else self.kind}"


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

    @property
    def sparsity(self) -> float:
        return self.removed_units / self.units if self.units else 0.0


class _UnitCount:
    """Cost = number of kept units; every unit saves 1."""

    def __call__(self, keep):
        return float(keep.sum())

    def unit_savings(self, keep):
        return np.ones(len(keep))


def _target_and_cost(budget: Budget, n_units: int, cost: CostModel | None):
    if budget.kind == "speedup":
        raise BudgetError("a speedup budget is turned into milliseconds (Budget.as_latency) before it is projected")
    if budget.kind == "sparsity":
        return n_units * (1.0 - budget.value), _UnitCount()
    if cost is None:
        raise BudgetError(f"a {budget.kind} budget needs a cost model")
    if budget.kind == "latency":
        return budget.value, cost
    return budget.value * cost(np.ones(n_units)), cost


def reachable(groups: list[Group], budget: Budget, cost: CostModel | None = None) -> tuple[float, float]:
    """The (lowest, highest) value of the budget's measure that the groups can reach."""
    prunable = [g for g in groups if g.prunable]
    n = sum(g.size for g in prunable)
    mins = np.concatenate([np.r_[np.ones(g.min_keep), np.zeros(g.size - g.min_keep)] for g in prunable]) if prunable else np.zeros(0)
    if budget.kind == "sparsity":
        return 0.0, (n - mins.sum()) / n if n else 0.0
    full = cost(np.ones(n))
    if budget.kind == "latency":
        return cost(mins), full
    return cost(mins) / full, 1.0


def check_budget(groups: list[Group], budget: Budget, cost: CostModel | None = None) -> None:
    """Reject a budget the model cannot meet, before any training, with the reachable range."""
    prunable = [g for g in groups if g.prunable]
    if not prunable and not (budget.kind == "sparsity" and budget.value == 0):
        raise BudgetError("the model has no prunable groups (all channels are coupled to inputs, outputs or excluded layers)")
    if budget.kind == "speedup":
        raise BudgetError("a speedup budget is turned into milliseconds (Budget.as_latency) before it is checked")
    lo, hi = reachable(groups, budget, cost)
    if budget.kind == "sparsity" and len({g.kind == "heads" for g in prunable}) > 1:
        # removed from heads and from the other units separately (see _project_per_kind)
        for heads, what in ((True, "attention heads"), (False, "neurons and channels")):
            _, top = reachable([g for g in prunable if (g.kind == "heads") == heads], budget)
            if budget.value > top + 1e-9:
                raise BudgetError(
                    f"--sparsity {budget.value:g} cannot be met for the {what}: every layer keeps at least one "
                    f"hardware multiple, so at most {top:.4f} of them can go. Reachable range: [0, {top:.4f}]")
    if budget.kind == "sparsity" and budget.value > hi + 1e-9:
        raise BudgetError(
            f"--sparsity {budget.value:g} cannot be met: every layer keeps at least one hardware multiple, so at "
            f"most {hi:.4f} of the units can go. Reachable range: [0, {hi:.4f}]"
        )
    if budget.kind in ("flops", "params") and budget.value < lo - 1e-9:
        raise BudgetError(
            f"--{budget.kind} {budget.value:g} cannot be met: with every layer at its minimum width the model keeps "
            f"{lo:.4f} of its {budget.kind}. Reachable range: [{lo:.4f}, 1]"
        )
    if budget.kind == "latency" and budget.value < lo:
        raise BudgetError(
            f"--latency-ms {budget.value:.4g} cannot be met: the predicted floor (every layer at its minimum width) is "
            f"{lo:.4g} ms; the dense model is {hi:.4g} ms. Reachable range: [{lo:.4g}, {hi:.4g}] ms "
            f"(a speedup of at most {hi / lo:.2f}x)"
        )


def project(groups: list[Group], scores: np.ndarray, budget: Budget, cost: CostModel | None = None) -> Projection:
    """Choose the kept units of every prunable group so that the budget is met as exactly as the
    hardware multiples allow.

    ``scores``: one importance value per unit, in the order of the prunable groups (as
    :class:`~hwprune.groups.UnitIndex` numbers them); low scores go first.

    Example:
        >>> proj = project(groups, norms, Budget("sparsity", 0.7))             # doctest: +SKIP
        >>> proj.achieved
        0.7
    """
    check_budget(groups, budget, cost)
    prunable = [g for g in groups if g.prunable]
    if budget.kind == "sparsity" and len({g.kind == "heads" for g in prunable}) > 1:
        return _project_per_kind(prunable, np.asarray(scores, dtype=np.float64), budget)
    offsets = np.concatenate([[0], np.cumsum([g.size for g in prunable])]).astype(np.int64)
    n = int(offsets[-1])
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (n,):
        raise ValueError(f"expected {n} scores, got {scores.shape}")
    target, cost_fn = _target_and_cost(budget, n, cost)
    allowed = [g.allowed_keep_counts() for g in prunable]
    if budget.kind == "sparsity" and all(a == list(range(g.min_keep, g.size + 1)) for g, a in zip(prunable, allowed)):
        keep, current = _unit_steps(prunable, offsets, scores, target)
    else:
        keep, current = _greedy(prunable, offsets, scores, target, cost_fn, allowed, ceiling=budget.kind == "latency")
    return _result(prunable, offsets, keep, current, budget, cost_fn)


def _greedy(prunable, offsets, scores, target, cost_fn, allowed, ceiling=False):
    """Remove the cheapest chunk (score per cost saved) until the target; O(removed chunks x groups).
    ``ceiling``: the target must be met (a latency budget), not merely approached."""
    n = int(offsets[-1])
    keep = np.ones(n)
    # Within a group, units go in ascending score order (ties: higher index first, stable).
    order = [offsets[i] + np.argsort(scores[offsets[i] : offsets[i + 1]], kind="stable") for i in range(len(prunable))]
    kept = [g.size for g in prunable]

    def chunk(i):
        lower = [c for c in allowed[i] if c < kept[i]]
        if not lower:
            return None
        removed = prunable[i].size - kept[i]
        return order[i][removed : prunable[i].size - lower[-1]]

    current = cost_fn(keep)
    while current > target + 1e-9:
        savings = cost_fn.unit_savings(keep)
        best, best_ratio = None, np.inf
        candidates = []
        for i in range(len(prunable)):
            c = chunk(i)
            if c is None:
                continue
            saving = float(savings[c].sum())
            if saving <= 0:
                continue
            ratio = float(scores[c].sum()) / saving
            candidates.append((i, c, ratio))
            if ratio < best_ratio:
                best, best_ratio = (i, c, ratio), ratio
        if best is None:
            break
        best = best[:2]
        trial = keep.copy()
        trial[best[1]] = 0
        after = cost_fn(trial)
        if after < target - 1e-9:
            # The next chunk overshoots: land on the achievable cost closest to the target; among equally
            # close choices prefer one that meets the budget, then the least important chunk.
            options = [(abs(current - target), 1, np.inf, None)]
            for i, c, ratio in candidates:
                t = keep.copy()
                t[c] = 0
                v = cost_fn(t)
                options.append((abs(v - target), 0 if v <= target + 1e-9 else 1, ratio, (i, c, v)))
            if ceiling:  # meet it first, then come closest
                *_, pick = min(options, key=lambda o: (o[1], round(o[0], 9), o[2]))
            else:
                *_, pick = min(options, key=lambda o: (round(o[0], 9), o[1], o[2]))
            if pick is not None:
                i, c, after = pick
                keep[c] = 0
                kept[i] -= len(c)
                current = after
            break
        keep[best[1]] = 0
        kept[best[0]] -= len(best[1])
        current = after

    return keep, current


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


def _result(prunable, offsets, keep, current, budget, cost_fn) -> Projection:
    n = int(offsets[-1])
    keep_by_group = {
        g.name: np.flatnonzero(keep[offsets[i] : offsets[i + 1]]) for i, g in enumerate(prunable)
    }
    removed = int(n - keep.sum())
    if budget.kind == "sparsity":
        achieved = removed / n
    elif budget.kind == "latency":
        achieved = current
    else:
        achieved = current / cost_fn(np.ones(n))
    return Projection(keep_by_group, budget.kind, budget.value, achieved, n, removed, keep.astype(bool))


def _project_per_kind(prunable: list[Group], scores: np.ndarray, budget: Budget) -> Projection:
    """A sparsity budget over attention heads *and* other units: the fraction is removed from each kind
    separately. A head (Q, K, V rows and output columns: 4·d·hidden weights) and an FFN neuron
    (2·hidden weights) are not the same amount of model, so one global count would let either kind
    absorb the budget (seen on MiniLM in a short run: a global 50% kept 69 of 72 heads and cut the FFN instead)."""
    offsets = np.concatenate([[0], np.cumsum([g.size for g in prunable])]).astype(np.int64)
    keep, mask, removed = {}, np.ones(int(offsets[-1]), dtype=bool), 0
    for heads in (True, False):
        idx = [i for i, g in enumerate(prunable) if (g.kind == "heads") == heads]
        part = np.concatenate([scores[offsets[i] : offsets[i + 1]] for i in idx])
        sub = project([prunable[i] for i in idx], part, budget)
        keep.update(sub.keep)
        removed += sub.removed_units
        for i in idx:
            m = np.zeros(prunable[i].size, dtype=bool)
            m[sub.keep[prunable[i].name]] = True
            mask[offsets[i] : offsets[i + 1]] = m
    n = int(offsets[-1])
    return Projection(keep, budget.kind, budget.value, removed / n, n, removed, mask)
