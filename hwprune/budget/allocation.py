"""Width allocation: how many units each group keeps so that the budget is met, and which.

The projection used to remove, greedily, the chunk with the smallest score per FLOP saved. FLOPs are
bilinear in widths, so a residual-stream channel (read by every block of its stage) saves several
times what an inner channel saves, and removing it never lowers what the next one saves: the greedy
stripped every stream to its hardware minimum whatever the weights said (ResNet-20 at 25% of the
FLOPs, all scores equal: the three streams at 8/16, 8/32, 8/64, the inner layers of stages 2-3 at
full width). Allocation is now its own step with named policies; the score only picks *which* units
fill the count a policy decides.

Policies (``--allocation NAME``, see :data:`POLICIES`):

* ``global`` maximises ``Σ_g w_g · log F_g(c_g)`` under the cost, where ``F_g(c)`` is the fraction of
  group ``g``'s importance that its ``c`` best units keep and ``w_g`` is the group's share of the dense
  cost (the cost terms that scale with its width). With equal scores ``F_g(c) = c / n_g``, and the
  optimum of that objective under a bilinear cost is the uniform width: every group is asked to pay
  in proportion to what it costs. A group whose importance sits in few units (a regularizer drove the
  rest towards zero) gives them up cheaply and is cut deeper; no stream collapses unless its scores
  ask for it.
* ``uniform``: every group keeps the same fraction (Torch-Pruning's default), units chosen by score.
* ``sensitivity``: each group's measured loss increase at each kept count (:mod:`hwprune.budget.sensitivity`)
  is the value to keep; the solver minimises the summed increase under the cost.
* ``learned``: the regularizer's scores decide as they are, compared across groups: maximise the kept
  score ``Σ_g S_g(c_g)`` under the cost (score per cost saved). Right for methods that drive whole
  groups to exactly zero; it is the old projection's rule, now with exact budgets.

The solver (every policy but ``uniform``): a Lagrangian ``max U(c) − λ·cost(c)``, solved for one λ by
coordinate ascent over each group's allowed counts (the cost is bilinear, so one group at a time is
exact), with bisection on λ; then a repair that moves one or two groups by a hardware multiple until
the cost is within 1% of the request, and, when 1% is not reachable and the model is small enough
(≤ 200,000 combinations), an exhaustive search for the nearest reachable cost. Sparsity budgets are
separable and get an exact dynamic programme over the removed count. :class:`Allocation` says which
of these happened and why.

Floors and caps (``floor``, ``cap``): a group keeps at least ``floor`` and at most ``cap`` times the
uniform fraction that meets the budget (``--allocation-option floor=0.5``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..errors import BudgetError

TOLERANCE = 0.01  # FLOPs / params / latency: within 1% of the request counts as met
EXHAUSTIVE_LIMIT = 200_000  # combinations of allowed counts that the exhaustive search may try
DP_LIMIT = 30_000_000  # sum of allowed counts x units for the sparsity dynamic programme


@dataclass(frozen=True)
class AllocationConfig:
    """``policy``: a name in :data:`POLICIES`; ``floor`` / ``cap``: bounds on every group's kept
    fraction, relative to the uniform fraction that meets the budget (0 and inf: none).

    Example:
        >>> AllocationConfig("global", floor=0.5).floor
        0.5
    """

    policy: str = "global"
    floor: float = 0.0
    cap: float = math.inf

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise BudgetError(f"--allocation {self.policy!r}: expected one of {', '.join(sorted(POLICIES))}")
        for key in ("floor", "cap"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or v != v or v < 0:
                raise BudgetError(f"--allocation-option {key}={v!r}: expected a number >= 0")
        if self.cap < 1.0:
            raise BudgetError(f"--allocation-option cap={self.cap:g}: expected at least 1 (cap is a multiple of "
                              "the uniform width; below 1 no allocation could meet the budget)")
        if self.floor > 1.0:
            raise BudgetError(f"--allocation-option floor={self.floor:g}: expected at most 1 (floor is a fraction "
                              "of the uniform width; above 1 no allocation could meet the budget)")

    @classmethod
    def from_options(cls, policy: str, options: dict | None) -> "AllocationConfig":
        """Build from ``--allocation NAME`` and ``--allocation-option KEY=VALUE`` pairs; unknown keys are an error."""
        options = dict(options or {})
        unknown = sorted(set(options) - {"floor", "cap"})
        if unknown:
            raise BudgetError(f"--allocation-option {', '.join(unknown)}: unknown; expected floor or cap")
        values = {}
        for k, v in options.items():
            try:
                values[k] = float(v)
            except (TypeError, ValueError):
                raise BudgetError(f"--allocation-option {k}={v}: expected numbers, e.g. floor=0.5 cap=2") from None
        return cls(policy, **values)


@dataclass
class Allocation:
    """Kept counts per group and how the budget was met.

    ``status``: ``exact`` (sparsity at the nearest reachable count), ``within-tolerance`` (within 1%),
    ``nearest-reachable`` (1% is not reachable; this is the closest cost any combination of allowed
    counts gives) or ``nearest-found`` (1% not reached by the search; the model was too large to try
    every combination). ``reason`` says why in words, for the report.
    """

    counts: list[int]
    cost: float
    status: str
    reason: str
    policy: str
    uniform_fraction: float | None = None


# --------------------------------------------------------------------------------------------------
# The problem in count space


@dataclass
class Problem:
    """What every policy sees: the prunable groups' sizes, allowed counts, unit orders and the cost.

    ``cost(counts)`` is evaluated through a keep vector in which each group keeps its ``c`` best units
    (the cost depends on the counts alone). ``kind``: the budget kind; ``target`` in the cost's units.
    """

    sizes: list[int]
    allowed: list[np.ndarray]
    orders: list[np.ndarray]  # per group: unit indices, best first
    offsets: np.ndarray
    scores: np.ndarray
    kind: str
    target: float
    cost_fn: object
    ceiling: bool = False  # a latency budget: the cost must not exceed the target
    # The cost whose shares weight the groups in ``global`` (default: ``cost_fn``). A latency profile's
    # tables are flat between hardware steps, so a group's latency share can be ~0 while it holds a
    # large part of the network: latency budgets weight groups by their FLOPs instead.
    share_fn: object = None
    dense_cost: float = field(init=False)
    # what the incremental path of costs_varying remembers (group -> count tables; widths -> cost)
    _cum: dict = field(init=False, repr=False, default_factory=dict)
    _full: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self):
        self.dense_cost = self.cost(np.array(self.sizes))

    @property
    def n_groups(self) -> int:
        return len(self.sizes)

    def keep_vector(self, counts) -> np.ndarray:
        keep = np.zeros(int(self.offsets[-1]))
        for g, c in enumerate(counts):
            keep[self.offsets[g] + self.orders[g][: int(c)]] = 1.0
        return keep

    def cost(self, counts) -> float:
        if hasattr(self.cost_fn, "partial_cost"):
            return self._full_cost(self._var_counts(counts))
        return float(self.cost_fn(self.keep_vector(counts)))

    def _full_cost(self, var_counts: np.ndarray) -> float:
        """The cost at ``var_counts``, remembered: coordinate ascent asks it for the same widths once per
        group it visits (a latency model predicts every layer for it)."""
        key = var_counts.tobytes()
        if key not in self._full:
            if len(self._full) > 4096:
                self._full.clear()
            self._full[key] = float(self.cost_fn.cost_of_counts(var_counts[:, None])[0])
        return self._full[key]

    def _var_counts(self, counts) -> np.ndarray:
        """The cost model's per-variable kept counts when group g keeps its best ``counts[g]`` units."""
        c = np.array(self.cost_fn.fixed, dtype=np.float64)
        for g, k in enumerate(counts):
            rows, cum = self._group_counts(g)
            c[rows] += cum[:, int(k)]
        return c

    def _group_counts(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """The cost variables group ``g`` touches, and their counts when it keeps its best 0..size units
        (columns): what :meth:`costs_varying` adds instead of multiplying the whole keep matrix."""
        if g not in self._cum:
            cols = int(self.offsets[g]) + self.orders[g]
            sub = self.cost_fn.A[:, cols].tocsr()
            rows = np.unique(sub.nonzero()[0])
            dense = sub[rows].toarray()
            self._cum[g] = (rows, np.concatenate([np.zeros((len(rows), 1)), np.cumsum(dense, axis=1)], axis=1))
        return self._cum[g]

    def costs_varying(self, counts, g: int, candidates, var_counts=None) -> np.ndarray:
        """The cost with group ``g`` at each of ``candidates`` and every other group as in ``counts``
        (``var_counts``: :meth:`_var_counts` of ``counts`` when the caller keeps it up to date)."""
        if hasattr(self.cost_fn, "partial_cost"):  # a sum of terms over per-variable counts: redo group g's only
            rows, cum = self._group_counts(g)
            var_counts = self._var_counts(counts) if var_counts is None else var_counts
            cand = np.asarray(candidates, dtype=np.int64)
            c = np.repeat(var_counts[:, None], len(cand), axis=1)
            c[rows, :] += cum[:, cand] - cum[:, [int(counts[g])]]
            base = var_counts[:, None]
            rest = self._full_cost(var_counts) - self.cost_fn.partial_cost(base, rows)[0]
            return rest + np.asarray(self.cost_fn.partial_cost(c, rows), dtype=np.float64)
        base = self.keep_vector(counts)
        a, order = int(self.offsets[g]), self.orders[g]
        keeps = np.repeat(base[:, None], len(candidates), axis=1)
        keeps[a : a + self.sizes[g], :] = 0.0
        for j, c in enumerate(candidates):
            keeps[a + order[: int(c)], j] = 1.0
        return self.batch_cost(keeps)

    def batch_cost(self, keeps: np.ndarray) -> np.ndarray:
        """The cost of every column of ``keeps`` (a vectorised ``batch`` where the cost model has one)."""
        batch = getattr(self.cost_fn, "batch", None)
        if batch is not None:
            return np.asarray(batch(keeps), dtype=np.float64)
        return np.array([float(self.cost_fn(keeps[:, j])) for j in range(keeps.shape[1])])

    def costs_of(self, many_counts: np.ndarray) -> np.ndarray:
        """The cost of each column of ``many_counts`` (groups x candidates)."""
        keeps = np.stack([self.keep_vector(many_counts[:, j]) for j in range(many_counts.shape[1])], axis=1)
        return self.batch_cost(keeps)

    def band(self) -> tuple[float, float]:
        """Costs that count as meeting the budget: within 1% of it; a latency budget is a ceiling."""
        if self.ceiling:
            return self.target * (1 - TOLERANCE), self.target * (1 + 1e-12)
        return self.target * (1 - TOLERANCE), self.target * (1 + TOLERANCE)

    def distance(self, cost: float) -> float:
        """How far a cost is from meeting the budget (0 inside the band); a latency over its ceiling is
        infeasible, so it is ranked behind every cost that meets it."""
        lo, hi = self.band()
        if self.ceiling and cost > hi:
            return math.inf
        return max(0.0, lo - cost, cost - hi)

    def sorted_scores(self, g: int) -> np.ndarray:
        a = int(self.offsets[g])
        return np.maximum(self.scores[a + self.orders[g]], 0.0)


def build_problem(prunable, scores, kind, target, cost_fn, ceiling: bool = False, share_fn=None) -> Problem:
    offsets = np.concatenate([[0], np.cumsum([g.size for g in prunable])]).astype(np.int64)
    # best first; ties keep the lower index (the old projection removed the higher index first)
    orders = [np.argsort(-scores[offsets[i] : offsets[i + 1]], kind="stable") for i in range(len(prunable))]
    allowed = [np.asarray(g.allowed_keep_counts(), dtype=np.int64) for g in prunable]
    return Problem([g.size for g in prunable], allowed, orders, offsets, scores, kind, target, cost_fn, ceiling,
                   share_fn)


# --------------------------------------------------------------------------------------------------
# Policies: a registry


class Policy:
    """One allocation rule. ``values(problem)``: per group, the value of keeping each allowed count
    (the solver maximises their sum under the cost); ``uniform`` overrides :meth:`solve`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def values(self, problem: Problem, extra) -> list[np.ndarray]:
        raise NotImplementedError

    def solve(self, problem: Problem, extra) -> tuple[list[int], str, str]:
        return solve_lagrangian(problem, self.values(problem, extra))

    def unit_values(self, problem: Problem, extra) -> list[np.ndarray]:
        """The values when the cost is the number of units (a sparsity budget, solved exactly)."""
        return self.values(problem, extra)


POLICIES: dict[str, Policy] = {}


def register(cls: type[Policy]) -> type[Policy]:
    if cls.name in POLICIES:
        raise ValueError(f"allocation policy '{cls.name}' is registered twice")
    POLICIES[cls.name] = cls()
    return cls


def cost_shares(problem: Problem) -> np.ndarray:
    """Each group's share of the dense cost: ``n_g · ∂cost/∂c_g`` at the dense width, measured as
    the cost saved by removing one allowed step, scaled to the full width; shares sum to 1."""
    full = list(problem.sizes)
    share_fn = problem.share_fn or problem.cost_fn
    dense = float(share_fn(problem.keep_vector(full)))
    w = np.zeros(problem.n_groups)
    for g in range(problem.n_groups):
        lower = problem.allowed[g][-2] if len(problem.allowed[g]) > 1 else problem.allowed[g][-1]
        step = full[g] - lower
        if step > 0:
            cut = list(full)
            cut[g] = int(lower)
            w[g] = max(dense - float(share_fn(problem.keep_vector(cut))), 0.0) * full[g] / step
    if w.sum() <= 0:
        return np.full(problem.n_groups, 1.0 / max(problem.n_groups, 1))
    w = np.maximum(w, 1e-6 * w.max())  # a group that saves nothing still values its units a little
    return w / w.sum()


def log_fraction_values(problem: Problem, weights: np.ndarray, scores_of=None) -> list[np.ndarray]:
    """``w_g · log F_g(c)`` at every allowed count, ``F_g`` the fraction of the group's importance kept
    (a tiny uniform floor keeps it increasing where scores are exactly zero)."""
    out = []
    for g in range(problem.n_groups):
        s = problem.sorted_scores(g) if scores_of is None else scores_of(g)
        prefix = np.concatenate([[0.0], np.cumsum(s)])
        eps = 1e-9 * (prefix[-1] / len(s) if prefix[-1] > 0 else 1.0)
        frac = (prefix + eps * np.arange(len(prefix))) / (prefix[-1] + eps * len(s))
        out.append(weights[g] * np.log(frac[problem.allowed[g]]))
    return out


@register
class GlobalPolicy(Policy):
    name = "global"
    description = "maximise Σ cost-share · log(importance kept) under the cost (uniform when scores are equal)"

    def values(self, problem, extra):
        return log_fraction_values(problem, cost_shares(problem))

    def unit_values(self, problem, extra):
        # counting units, a group's share of the cost is its share of the units
        return log_fraction_values(problem, np.array(problem.sizes, float) / sum(problem.sizes))


@register
class LearnedPolicy(Policy):
    name = "learned"
    description = "the regularizer's scores compared across groups: maximise the kept score under the cost"

    def values(self, problem, extra):
        total = float(np.sum(np.maximum(problem.scores, 0.0))) or 1.0
        return [np.concatenate([[0.0], np.cumsum(problem.sorted_scores(g))])[problem.allowed[g]] / total
                for g in range(problem.n_groups)]


@register
class SensitivityPolicy(Policy):
    name = "sensitivity"
    description = "each group's measured loss increase at each width; minimise the sum under the cost"

    def values(self, problem, extra):
        if extra is None:
            raise BudgetError("--allocation sensitivity needs measured sensitivity curves (hwprune.budget.sensitivity)")
        out = []
        for g in range(problem.n_groups):
            curve = np.asarray(extra[g], dtype=np.float64)
            if curve.shape != problem.allowed[g].shape:
                raise BudgetError(f"sensitivity curve of group {g}: expected {len(problem.allowed[g])} values "
                                  f"(one per allowed count), got {curve.shape}")
            out.append(-curve)
        return out


@register
class UniformPolicy(Policy):
    name = "uniform"
    description = "every group keeps the same fraction (a width multiplier); units chosen by score"

    def solve(self, problem, extra):
        alpha, counts = uniform_fraction(problem)
        if problem.distance(problem.cost(counts)) == 0:
            return counts, "within-tolerance", f"every group at {alpha:.3f} of its width (rounded to its multiple)"
        # Rounding to the multiples missed the band: repair towards it, staying as close to uniform as
        # possible (equal scores make the log-fraction objective peak at the uniform width).
        values = log_fraction_values(problem, cost_shares(problem), scores_of=lambda g: np.ones(problem.sizes[g]))
        return repair(problem, values, counts)

    def unit_values(self, problem, extra):
        # equal scores: the log-fraction objective peaks at the same fraction everywhere
        return log_fraction_values(problem, np.array(problem.sizes, float) / sum(problem.sizes),
                                   scores_of=lambda g: np.ones(problem.sizes[g]))


def uniform_counts(problem: Problem, alpha: float) -> list[int]:
    """Every group at the allowed count closest to ``alpha`` of its width (ties keep more)."""
    out = []
    for g in range(problem.n_groups):
        a = problem.allowed[g]
        out.append(int(a[np.argmin(np.abs(a - alpha * problem.sizes[g]) - 1e-9 * a)]))
    return out


def uniform_fraction(problem: Problem) -> tuple[float, list[int]]:
    """The width fraction whose rounded counts come closest to the budget (bisection, then the best of
    the fractions at which some rounding changes)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if problem.cost(uniform_counts(problem, mid)) > problem.target:
            hi = mid
        else:
            lo = mid
    best = None
    for alpha in (lo, hi):
        counts = uniform_counts(problem, alpha)
        key = (problem.distance(problem.cost(counts)), abs(problem.cost(counts) - problem.target))
        if best is None or key < best[0]:
            best = (key, alpha, counts)
    return best[1], best[2]


# --------------------------------------------------------------------------------------------------
# The solver


def solve_lagrangian(problem: Problem, values: list[np.ndarray]) -> tuple[list[int], str, str]:
    """Bisection on λ over ``max Σ values − λ·cost/dense_cost``, then :func:`repair` and :func:`improve`.

    Coordinate ascent on a bilinear cost with widths in steps of a hardware multiple stops at local
    optima that depend on where it starts (from the dense model, the first group visited at a high λ
    is cut to its minimum before its neighbours shrink). So it runs from two starts, the dense widths
    and the uniform widths that meet the budget, and the more valuable result wins."""
    dense = list(problem.sizes)
    if problem.distance(problem.dense_cost) == 0 and not problem.ceiling:
        return dense, "within-tolerance", "the dense model already meets the budget"
    results = []
    for start in (dense, uniform_fraction(problem)[1]):
        counts = _bisect(problem, values, start)
        results.append(improve(problem, values, *repair(problem, values, counts)))
    return min(results, key=lambda r: (problem.distance(problem.cost(r[0])), -_value(values, problem, r[0])))


def _bisect(problem: Problem, values: list[np.ndarray], start) -> list[int]:
    scale = problem.dense_cost or 1.0

    fast = hasattr(problem.cost_fn, "partial_cost")

    def best_response(lam, counts):
        counts = list(counts)
        vc = problem._var_counts(counts) if fast else None  # kept up to date as groups move
        for _ in range(30):  # coordinate ascent; a bilinear cost is linear in one group's width
            changed = False
            for g in range(problem.n_groups):
                costs = problem.costs_varying(counts, g, problem.allowed[g], vc)
                obj = values[g] - lam * costs / scale
                j = len(obj) - 1 - int(np.argmax(obj[::-1]))  # ties keep more: no unit goes for nothing
                if int(problem.allowed[g][j]) != counts[g]:
                    if fast:
                        rows, cum = problem._group_counts(g)
                        vc[rows] += cum[:, int(problem.allowed[g][j])] - cum[:, counts[g]]
                    counts[g], changed = int(problem.allowed[g][j]), True
            if not changed:
                break
        return counts

    lo_lam, lo_counts = 0.0, list(problem.sizes)  # cost above the target
    hi_lam, hi_counts = 1.0, best_response(1.0, start)
    while problem.cost(hi_counts) > problem.target and hi_lam < 1e12:
        lo_lam, lo_counts = hi_lam, hi_counts
        hi_lam *= 4.0
        hi_counts = best_response(hi_lam, hi_counts)
    for _ in range(60):
        if hi_lam - lo_lam <= 1e-9 * hi_lam:
            break
        mid = 0.5 * (lo_lam + hi_lam)
        counts = best_response(mid, start)
        if problem.cost(counts) > problem.target:
            lo_lam, lo_counts = mid, counts
        else:
            hi_lam, hi_counts = mid, counts
    # the better of the two sides, by distance to the band then value
    return min((hi_counts, lo_counts), key=lambda c: (problem.distance(problem.cost(c)), -_value(values, problem, c)))


def improve(problem: Problem, values: list[np.ndarray], counts, status: str, reason: str):
    """Trade widths between groups while the budget stays met: one group up by a step and another
    down by a step, or one group by a step alone, whenever that raises the value (a local search
    after the Lagrangian, whose solutions lie only on the hull of the value/cost trade-off)."""
    if problem.distance(problem.cost(counts)) > 0:
        return counts, status, reason
    counts = list(counts)
    current = _value(values, problem, counts)
    for _ in range(10 * sum(len(a) for a in problem.allowed)):
        idx = [int(np.searchsorted(problem.allowed[g], c)) for g, c in enumerate(counts)]
        moves = []
        for g in range(problem.n_groups):
            for dg in (-1, 1):
                if not 0 <= idx[g] + dg < len(problem.allowed[g]):
                    continue
                single = list(counts)
                single[g] = int(problem.allowed[g][idx[g] + dg])
                moves.append(single)
                for h in range(problem.n_groups):
                    if h != g and 0 <= idx[h] - dg < len(problem.allowed[h]):
                        pair = list(single)
                        pair[h] = int(problem.allowed[h][idx[h] - dg])
                        moves.append(pair)
        # a move's gain is the sum of its groups' value changes (the value is separable by group)
        gains = [(sum(float(values[g][int(np.searchsorted(problem.allowed[g], m[g]))] - values[g][idx[g]])
                      for g in range(problem.n_groups) if m[g] != counts[g]), m) for m in moves]
        gains = [(v, m) for v, m in gains if v > 1e-12]
        gains.sort(key=lambda vm: -vm[0])
        for v, m in gains:
            if problem.distance(problem.cost(m)) == 0:
                counts, current = m, current + v
                break
        else:
            break
    cost = problem.cost(counts)
    return counts, status, f"{_describe(problem, cost)} is within 1% of the request" if status == "within-tolerance" else reason


def _value(values, problem: Problem, counts) -> float:
    return float(sum(values[g][int(np.searchsorted(problem.allowed[g], c))] for g, c in enumerate(counts)))


def repair(problem: Problem, values: list[np.ndarray], counts) -> tuple[list[int], str, str]:
    """Move one group to any allowed count, or two groups by one allowed step each in opposite
    directions, until the cost is within the band (the most valuable such move), or no move brings it
    closer. Then, if the band was not reached and the model is small, search every combination."""
    counts = [int(c) for c in counts]
    idx = [int(np.searchsorted(problem.allowed[g], c)) for g, c in enumerate(counts)]
    for _ in range(4 * sum(len(a) for a in problem.allowed) + 10):
        here = problem.distance(problem.cost(counts))
        if here == 0:
            break
        moves = []  # (distance, -value, counts)
        for g in range(problem.n_groups):
            costs = problem.costs_varying(counts, g, problem.allowed[g])
            for j, c in enumerate(costs):
                if j == idx[g]:
                    continue
                new = list(counts)
                new[g] = int(problem.allowed[g][j])
                moves.append((problem.distance(c), -_value(values, problem, new), new))
        for g in range(problem.n_groups):
            for h in range(problem.n_groups):
                if g == h or idx[g] + 1 >= len(problem.allowed[g]) or idx[h] == 0:
                    continue
                new = list(counts)
                new[g], new[h] = int(problem.allowed[g][idx[g] + 1]), int(problem.allowed[h][idx[h] - 1])
                moves.append((problem.distance(problem.cost(new)), -_value(values, problem, new), new))
        if not moves:
            break
        inside = [m for m in moves if m[0] == 0]
        best = min(inside or moves, key=lambda m: (m[0], m[1]))
        if best[0] >= here:
            break
        counts = best[2]
        idx = [int(np.searchsorted(problem.allowed[g], c)) for g, c in enumerate(counts)]
    cost = problem.cost(counts)
    if problem.distance(cost) == 0:
        return counts, "within-tolerance", f"{_describe(problem, cost)} is within 1% of the request"
    combos = math.prod(len(a) for a in problem.allowed)
    if combos <= EXHAUSTIVE_LIMIT:
        return exhaustive(problem, values)
    return counts, "nearest-found", (
        f"{_describe(problem, cost)}: 1% of the request was not reached by the search, and the "
        f"{combos:.3g} combinations of allowed widths are too many to try them all")


def exhaustive(problem: Problem, values: list[np.ndarray]) -> tuple[list[int], str, str]:
    """Try every combination of allowed counts: the nearest reachable cost (ties: the most valuable)."""
    grids = np.array(np.meshgrid(*problem.allowed, indexing="ij")).reshape(problem.n_groups, -1)
    costs = np.concatenate([problem.costs_of(grids[:, a : a + 4096]) for a in range(0, grids.shape[1], 4096)])
    value = sum(values[g][np.searchsorted(problem.allowed[g], grids[g])] for g in range(problem.n_groups))
    dist = np.array([problem.distance(c) for c in costs])
    j = int(np.lexsort((np.round(np.abs(costs - problem.target), 9), -value, dist))[0])  # inside the band: most valuable
    best = [int(v) for v in grids[:, j]]
    cost = float(costs[j])
    if dist[j] == 0:
        return best, "within-tolerance", f"{_describe(problem, cost)} is within 1% of the request"
    return best, "nearest-reachable", (
        f"{_describe(problem, cost)} is the nearest reachable: with kept counts in hardware multiples no "
        f"combination of widths comes within 1% of the request (all {grids.shape[1]} were tried)")


def _describe(problem: Problem, cost: float) -> str:
    if problem.ceiling:
        return f"a predicted {cost:.4g} ms against the {problem.target:.4g} ms asked"
    return f"{cost / problem.dense_cost:.4f} of the {problem.kind} against {problem.target / problem.dense_cost:.4f} asked"


# --------------------------------------------------------------------------------------------------
# Sparsity: a separable cost (units removed), solved exactly


def solve_units(problem: Problem, values: list[np.ndarray], keep_target: float) -> tuple[list[int], str, str]:
    """Kept counts whose total is the reachable total nearest ``keep_target`` (ties remove more) and
    whose summed value is the largest among those totals: a dynamic programme over groups when it is
    small enough, else a Lagrangian on the count with single-unit repair (groups of multiple 1)."""
    n = sum(problem.sizes)
    work = sum(len(a) for a in problem.allowed) * (n + 1)
    if work <= DP_LIMIT:
        return _units_dp(problem, values, keep_target)
    return _units_lagrangian(problem, values, keep_target)


def _units_dp(problem, values, keep_target):
    n = sum(problem.sizes)
    best = np.full(n + 1, -np.inf)
    best[0] = 0.0
    choice = []
    for g in range(problem.n_groups):
        new = np.full(n + 1, -np.inf)
        arg = np.full(n + 1, -1, dtype=np.int64)
        for j, c in enumerate(problem.allowed[g]):
            shifted = np.full(n + 1, -np.inf)
            shifted[c:] = best[: n + 1 - c] + values[g][j]
            better = shifted > new
            new[better], arg[better] = shifted[better], j
        best = new
        choice.append(arg)
    totals = np.flatnonzero(np.isfinite(best))
    # nearest reachable kept total; ties: keep fewer (the removal outranks staying, as before)
    total = int(totals[np.lexsort((totals, np.round(np.abs(totals - keep_target), 9)))[0]])
    counts, t = [0] * problem.n_groups, total
    for g in range(problem.n_groups - 1, -1, -1):
        j = int(choice[g][t])
        counts[g] = int(problem.allowed[g][j])
        t -= counts[g]
    return counts, "exact", f"{n - total} of {n} units removed: the reachable count nearest {n - keep_target:.2f}"


def _units_lagrangian(problem, values, keep_target):
    """Large unit counts (thousands of weight blocks): every group has multiple 1 here in practice,
    so after the λ bisection single units are added or removed by marginal value until the count is
    the nearest reachable one."""
    marg = [np.diff(v) / np.diff(a) for v, a in zip(values, problem.allowed)]

    def counts_at(lam):
        out = []
        for g in range(problem.n_groups):
            take = np.flatnonzero(marg[g] >= lam)
            # marginals are non-increasing for concave values: keep up to the last step worth λ
            j = int(take[-1]) + 1 if len(take) else 0
            out.append(int(problem.allowed[g][j]))
        return out

    lo, hi = -1e-12, max((float(m.max()) for m in marg if len(m)), default=0.0) + 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if sum(counts_at(mid)) > keep_target:
            lo = mid
        else:
            hi = mid
    counts = counts_at(hi)
    idx = [int(np.searchsorted(problem.allowed[g], c)) for g, c in enumerate(counts)]
    target = int(round(keep_target))
    while sum(counts) < target:  # add the most valuable next step that does not overshoot
        opts = [(marg[g][idx[g]], g) for g in range(problem.n_groups) if idx[g] + 1 < len(problem.allowed[g])
                and sum(counts) + problem.allowed[g][idx[g] + 1] - counts[g] <= target]
        if not opts:
            break
        _, g = max(opts)
        idx[g] += 1
        counts[g] = int(problem.allowed[g][idx[g]])
    n = sum(problem.sizes)
    status = "exact" if sum(counts) == target else "nearest-found"
    return counts, status, f"{n - sum(counts)} of {n} units removed ({n - keep_target:.2f} asked)"


# --------------------------------------------------------------------------------------------------
# Floors and caps


def apply_bounds(problem: Problem, config: AllocationConfig) -> float | None:
    """Restrict every group's allowed counts to [floor, cap] x the uniform fraction; returns that
    fraction (None when there are no bounds)."""
    if config.floor <= 0 and math.isinf(config.cap):
        return None
    alpha, _ = uniform_fraction(problem)
    for g in range(problem.n_groups):
        a = problem.allowed[g]
        lo, hi = config.floor * alpha * problem.sizes[g], config.cap * alpha * problem.sizes[g]
        inside = a[(a >= lo - 1e-9) & (a <= hi + 1e-9)]
        if not len(inside):  # the bounds fall between two multiples: the nearest allowed count inside
            inside = a[[int(np.argmin(np.abs(a - min(max(alpha * problem.sizes[g], lo), hi))))]]
        problem.allowed[g] = inside
    return alpha


def allocate(problem: Problem, config: AllocationConfig, sensitivity=None,
             keep_target: float | None = None) -> Allocation:
    """Kept counts for every group of ``problem`` by ``config.policy``.

    ``keep_target``: for a sparsity budget, the number of units to keep (the cost is then the count);
    ``sensitivity``: per group, the loss increase at each allowed count (``sensitivity`` policy).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hwprune.budget.cost import flops_model
        >>> from hwprune.graph import discover_groups
        >>> net, x = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 1)), torch.zeros(1, 3, 8, 8)
        >>> groups = discover_groups(net, x)
        >>> fm = flops_model(net, (x,), groups)
        >>> prunable, dense = [g for g in groups if g.prunable], fm(np.ones(16))
        >>> alloc = allocate(build_problem(prunable, np.arange(16.0), "flops", 0.25 * dense, fm), AllocationConfig())
        >>> alloc.counts, alloc.status
        ([4], 'within-tolerance')
    """
    alpha = apply_bounds(problem, config)
    policy = POLICIES[config.policy]
    if keep_target is not None:
        counts, status, reason = solve_units(problem, policy.unit_values(problem, sensitivity), keep_target)
    else:
        counts, status, reason = policy.solve(problem, sensitivity)
    return Allocation(counts, problem.cost(counts), status, reason, config.policy, alpha)


def keep_indices(problem: Problem, counts) -> list[np.ndarray]:
    """The kept unit indices of every group (sorted), the ``c`` best by score."""
    return [np.sort(problem.orders[g][: int(c)]) for g, c in enumerate(counts)]

