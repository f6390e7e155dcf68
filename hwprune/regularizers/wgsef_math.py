"""WGSEF mathematics: value, prox and optimality certificate (METHODS.md §1.4, §1.5). No model code.

Notation (METHODS.md §1.3): there are ``m`` disjoint groups with norms ``a_i = ‖v_{G_i}‖`` and weights
``w_i > 0`` (``w_i = √d_i``). With ``z_i = w_i·a_i``,

    WGSEF_k = ½ (‖z‖_k^sp)²                         (half the squared k-support norm of z)

and the prox of ``λ·WGSEF_k`` keeps every group's direction and maps its norm ``a_i`` to

    r_i = clamp(a_i − τ·w_i, 0, a_i / (1 + λ w_i²))

for one threshold ``τ > 0`` that solves ``Φ(τ) = Σ_i clip(λ w_i a_i / τ − λ w_i², 0, 1) = k``. The
clamp covers the three regimes of §1.5 at once: ``zero`` (``a_i ≤ τ w_i``), ``shrunk``
(``r_i = a_i − τ w_i``) and ``full`` (``r_i = a_i / (1 + λ w_i²)``).

All functions take CPU or CUDA tensors in float32 or float64 and return the input's dtype. Values,
conjugates, certificates and the prefix sums of the sweep are computed in float64; float32 inputs
keep their element-wise work in float32 (reductions are pairwise, accurate to ~1e-7 relative).

Solvers for τ:

* :func:`wgsef_prox_norms` (``method="sort"``): the breakpoint sweep. Between its 2m breakpoints
  ``a_i/w_i`` and ``λ w_i a_i/(1 + λ w_i²)``, Φ(τ) = |A| + P/τ − Q (|A| full groups; P, Q sums of
  ``λ w_i a_i`` and ``λ w_i²`` over the shrunk ones). The breakpoints are sorted, |A|, P and Q are
  prefix sums (``cumsum``), the first breakpoint where Φ reaches k is located and
  ``τ = P/(k − |A| + Q)`` is solved on the interval above it. For m above a few thousand the sort is
  applied only to the groups with a breakpoint inside a bracket [lo, hi] around τ: pivots are placed
  from a strided sample (Floyd–Rivest style), the groups outside are folded into |A|, P, Q, and Φ at
  the pivots, exact from those sums and the few remaining groups, confirms the bracket (or gives the
  valid half). Each round keeps about a tenth of the groups, so the work is O(m) passes plus a sort
  of a few thousand; the result is that of the plain sweep (``narrow=False``), which sorts all 2m.
* :func:`wgsef_prox_norms_bisect`: bisection on τ in float64, the robust reference.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ksupport_sq",
    "wgsef_value",
    "wgsef_prox_norms",
    "wgsef_prox_norms_bisect",
    "wgsef_prox",
    "conjugate_topk",
    "fenchel_young_gap",
    "group_norms",
]

_ACC = torch.float64

# Narrowing of the sort solver: sort directly at or below this many active groups; otherwise sample
# this many groups to place the pivots, for at most this many rounds.
_SORT_DIRECT = 1 << 12
_SAMPLE = 1 << 12
_MAX_ROUNDS = 8
_Z_SCORE = 4.0


def _check_k(k) -> int:
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"k = {k!r}: expected an integer >= 1") from None
    if k < 1:
        raise ValueError(f"k = {k}: expected an integer >= 1 (the number of groups WGSEF keeps non-zero)")
    return k


def _check_lam(lam) -> float:
    lam = float(lam)
    if not lam >= 0 or math.isinf(lam):
        raise ValueError(f"lam = {lam}: expected a finite number >= 0")
    return lam


def _work_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _check_norms(a: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    if a.dim() != 1 or w.shape != a.shape:
        raise ValueError(f"group norms of shape {tuple(a.shape)} and weights of shape {tuple(w.shape)}: "
                         "expected two 1-D tensors of the same length m")
    dt = _work_dtype(a)
    return a.to(dt), w.to(device=a.device, dtype=dt)


# ----------------------------------------------------------------------------------------------------
# Value (§1.4) and conjugate
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def ksupport_sq(z: Tensor, k: int) -> Tensor:
    """(‖z‖_k^sp)², the squared k-support norm of a 1-D vector ``z ≥ 0`` (METHODS.md §1.2, §1.4).

    Sort ``z`` decreasingly; for ``a = |A| ∈ {0, …, k−1}`` put ``ρ_a = (Σ_{i>a} z↓_i)/(k − a)``. The
    value is ``Σ_{i≤a} z↓_i² + (Σ_{i>a} z↓_i)²/(k − a)`` at the ``a`` with ``z↓_a > ρ_a ≥ z↓_{a+1}``.
    Every ``a`` with ``ρ_a ≥ z↓_{a+1}`` is a feasible point of the box form, so the value is taken as
    the smallest of those (robust to ties and rounding). ``k ≥ nnz(z)`` gives ``‖z‖²`` and ``k = 1``
    gives ``‖z‖₁²``. Computed in float64, returned as a 0-dim tensor of ``z``'s dtype.

    Example:
        >>> ksupport_sq(torch.tensor([5., 4., 2.5, 2., 1., .5]), 2).item()
        112.5
        >>> ksupport_sq(torch.tensor([10., 1., 1.]), 2).item()  # A = {10}, rest averaged: 100 + 2²
        104.0
        >>> ksupport_sq(torch.tensor([3., 4.]), 5).item()  # k >= nnz: plain squared norm
        25.0
    """
    k = _check_k(k)
    dt = _work_dtype(z)
    zz = z.reshape(-1).to(_ACC)
    if zz.numel() == 0:
        return torch.zeros((), dtype=dt, device=z.device)
    if bool((zz < 0).any()):
        raise ValueError("ksupport_sq: expected z >= 0 (weighted group norms)")
    nnz = int(torch.count_nonzero(zz))
    if k >= nnz:
        return (zz * zz).sum().to(dt)
    s = zz[_argsort_desc(zz)]
    tail = torch.flip(torch.cumsum(torch.flip(s, (0,)), 0), (0,))[:k]  # tail[a] = Σ_{i>a} z↓_i (1-based)
    head = torch.cumsum(s[:k] * s[:k], 0)
    head = torch.cat([head.new_zeros(1), head[:-1]])  # head[a] = Σ_{i≤a} z↓_i²
    den = torch.arange(k, 0, -1, dtype=_ACC, device=zz.device)  # k − a
    rho = tail / den
    feasible = rho >= s[:k] * (1 - 1e-12)
    feasible[-1] = True  # a = k−1: ρ = Σ_{i≥k} z↓_i ≥ z↓_k always
    vals = head + tail * tail / den
    return vals.masked_fill(~feasible, math.inf).min().to(dt)


@torch.no_grad()
def wgsef_value(group_norms: Tensor, weights: Tensor, k: int) -> Tensor:
    """WGSEF_k(θ) = ½ (‖z‖_k^sp)² with ``z_i = w_i·‖θ_{G_i}‖`` (METHODS.md §1.3–1.4).

    Example:
        >>> v = torch.tensor([5., 4., 2.5, 2., 1., .5])  # singleton groups, unit weights (Ex. 2)
        >>> wgsef_value(v, torch.ones(6), 2).item(), wgsef_value(v, torch.ones(6), 1).item()
        (56.25, 112.5)
    """
    a, w = _check_norms(group_norms.reshape(-1), weights.reshape(-1))
    return 0.5 * ksupport_sq(w.to(_ACC) * a.to(_ACC), k).to(a.dtype)


@torch.no_grad()
def conjugate_topk(y_norms_over_w: Tensor, k: int) -> Tensor:
    """½ · (sum of the k largest squared values): the conjugate WGSEF_k*(y) evaluated on ``‖y_{G_i}‖/w_i``.

    Example:
        >>> conjugate_topk(torch.tensor([1., -3., 2.]), 2).item()  # ½ (9 + 4)
        6.5
    """
    k = _check_k(k)
    x = y_norms_over_w.reshape(-1).to(_ACC)
    sq = x * x
    if k < sq.numel():
        sq = torch.topk(sq, k, sorted=False).values
    return (0.5 * sq.sum()).to(_work_dtype(y_norms_over_w))


# ----------------------------------------------------------------------------------------------------
# Prox on group norms (§1.5)
# ----------------------------------------------------------------------------------------------------


def _trivial_prox(a: Tensor, w: Tensor, k: int, lam: float, nnz: int) -> Tensor | None:
    """The cases without a threshold: λ = 0 (identity) and at most k non-zero groups (ridge shrink)."""
    if lam == 0:
        return a.clone()
    if nnz <= k:
        return a / (1 + lam * w * w)
    return None


def _apply_tau(a: Tensor, w: Tensor, lam: float, tau: float, tmp: Tensor | None = None) -> Tensor:
    """r_i = clamp(a_i − τ w_i, 0, a_i/(1 + λ w_i²)): zero, shrunk and full groups in one expression."""
    one = torch.ones((), dtype=a.dtype, device=a.device)
    r = torch.addcmul(one, w, w, value=lam)
    torch.div(a, r, out=r)  # the ridge-shrunk "full" norm
    tmp = torch.add(a, w, alpha=-tau, out=tmp)
    return torch.clamp(tmp.clamp_min_(0), max=r, out=r)


def _argsort_desc(keys: Tensor) -> Tensor:
    """Indices that sort ``keys`` in decreasing order (ties in any order).

    On CPU numpy's introsort is about 3× faster than ``torch.sort``; elsewhere ``torch.argsort``.
    """
    if keys.device.type == "cpu":
        return torch.from_numpy(np.argsort(np.negative(keys.numpy())))
    return torch.argsort(keys, descending=True)


def _sweep(p, q, t1, t2, lo, hi, base, targets, scale=1.0):
    """Exact τ with Φ(τ) = target, for τ ∈ [lo, hi], by sorting the breakpoints of the groups given.

    The groups given (``p = λ w a``, ``q = λ w²`` and their breakpoints ``t1 = a/w`` and
    ``t2 = p/(1 + q)``) are weighted by ``scale`` (1, or N/s for a sample); ``base = (|A|, P, Q)``
    holds the other groups, which are full (counted in |A|) or shrunk (summed in P, Q) on all of
    (lo, hi). Sweeping τ downwards from +∞, ``t1`` moves a group from zero to shrunk (P += p,
    Q += q) and ``t2`` from shrunk to full (P −= p, Q −= q, |A| += 1); between breakpoints
    Φ(τ) = |A| + P/τ − Q. Breakpoints at or above ``hi`` only build the state at hi⁻; the first
    breakpoint at or below ``lo`` stops the search (Φ(lo) ≥ target is the caller's invariant).
    Returns a float64 tensor with one τ per target.
    """
    dev = p.device
    n = p.numel()
    cA, P0, Q0 = base
    targets = torch.as_tensor(targets, dtype=_ACC, device=dev).reshape(-1)
    one = torch.ones(1, dtype=_ACC, device=dev)
    if n:
        keys = torch.cat([t1, t2])
        order = _argsort_desc(keys)
        keys = keys[order].to(_ACC)
        second = order >= n  # a t2 event
        gidx = torch.where(second, order - n, order)
        sign = 1.0 - 2.0 * second.to(_ACC)
        cum_a = cA + scale * torch.cumsum(second.to(_ACC), 0)
        cum_p = P0 + scale * torch.cumsum(p[gidx].to(_ACC) * sign, 0)
        cum_q = Q0 + scale * torch.cumsum(q[gidx].to(_ACC) * sign, 0)
        phi = cum_a + cum_p / keys - cum_q  # Φ at each breakpoint (continuous, so either side's sets)
        ge = ((phi[None, :] >= targets[:, None]) & (keys < hi)) | (keys <= lo)
        j = torch.where(ge.any(1), ge.to(torch.uint8).argmax(1), 2 * n)  # first breakpoint with Φ ≥ target
    else:
        keys = cum_a = cum_p = cum_q = torch.zeros(0, dtype=_ACC, device=dev)
        j = torch.zeros(targets.numel(), dtype=torch.long, device=dev)
    # the state on [lower, upper], the interval just above breakpoint j: after j events
    st_a = torch.cat([one * cA, cum_a])[j]
    st_p = torch.cat([one * P0, cum_p])[j]
    st_q = torch.cat([one * Q0, cum_q])[j]
    lower = torch.cat([keys, one * lo])[j].clamp_min(lo)
    upper = torch.cat([one * hi, keys])[j].clamp_max(hi)
    den = targets - st_a + st_q
    tau = torch.where(den > 0, st_p.clamp_min(0) / den.clamp_min(1e-300), upper)
    return torch.minimum(torch.maximum(tau, lower), upper)


class _Groups:
    """Norms ``a``, weights ``w`` and breakpoints ``t1 = a/w``, ``t2 = λ w a/(1 + λ w²)`` of a set of groups.

    For the full set the breakpoints are written into one (2, n) buffer that is later reused as
    scratch (fresh large tensors are expensive on CPU: every page is faulted in on first touch);
    ``p = λ w a`` and ``q = λ w²`` are only formed for the small sets (sample, active groups).
    """

    def __init__(self, a: Tensor, w: Tensor, lam: float, t1: Tensor | None = None, t2: Tensor | None = None):
        self.a, self.w, self.lam = a, w, lam
        self.buf = None
        self.t1, self.t2 = t1, t2
        if t1 is None:
            self.buf = torch.empty((2, a.numel()), dtype=a.dtype, device=a.device)
            self._breakpoints()
        self._pq = None

    def _breakpoints(self) -> None:
        a, w, t = self.a, self.w, self.buf
        self.t1 = torch.div(a, w, out=t[0])
        self.t2 = torch.addcmul(torch.ones((), dtype=a.dtype, device=a.device), w, w, value=self.lam, out=t[1])
        torch.div(a, self.t2, out=self.t2).mul_(w).mul_(self.lam)

    def __len__(self) -> int:
        return self.a.numel()

    def pq(self) -> tuple[Tensor, Tensor]:
        if self._pq is None:
            self._pq = (self.lam * self.w * self.a, self.lam * self.w * self.w)
        return self._pq

    def take(self, idx: Tensor) -> "_Groups":
        return _Groups(self.a[idx], self.w[idx], self.lam, self.t1[idx], self.t2[idx])

    def sweep(self, lo, hi, base, targets, scale=1.0) -> Tensor:
        p, q = self.pq()
        return _sweep(p, q, self.t1, self.t2, lo, hi, base, targets, scale)

    def phi(self, tau: float) -> float:
        """Σ_i clip(p_i/τ − q_i, 0, 1) (a cascade sum: accurate in float32 too)."""
        p, q = self.pq()
        return float((p / tau - q).clamp_(0, 1).sum())

    def resolve(self, lo: float, hi: float) -> tuple[int, float, float, "_Groups"]:
        """Fold the groups without a breakpoint in (lo, hi) into (|A|, P, Q); return them and the others.

        On the whole bracket, a group with t2 ≥ hi is full, one with t2 ≤ lo and t1 ≥ hi is shrunk and
        one with t1 ≤ lo is zero.
        """
        if self.t1 is None:  # the buffer was used as scratch by an earlier call
            self._breakpoints()
        active = self.t1 > lo
        n_full, P, Q, shrunk = 0, 0.0, 0.0, None
        if hi < math.inf:
            full = self.t2 >= hi
            n_full = int(torch.count_nonzero(full))
            active &= full.logical_not_()
            shrunk = self.t2 <= lo
            shrunk &= torch.ge(self.t1, hi, out=full)
            if bool(shrunk.any()):
                active &= torch.logical_not(shrunk, out=full)
            else:
                shrunk = None
        sub = self.take(active.nonzero().squeeze(1))
        if shrunk is not None:
            f = self.buf
            if f is None:
                f = torch.empty((2, len(self)), dtype=self.a.dtype, device=self.a.device)
            else:
                self.t1 = self.t2 = None  # overwritten below
            torch.where(shrunk, self.w, torch.zeros((), dtype=self.w.dtype, device=self.w.device), out=f[0])
            torch.mul(f[0], self.w, out=f[1])  # w² on the shrunk groups, 0 elsewhere
            f[0].mul_(self.a)  # w·a on the shrunk groups
            P, Q = (self.lam * f.sum(1)).tolist()
        return n_full, P, Q, sub


def _solve_tau(a: Tensor, w: Tensor, k: int, lam: float, narrow: bool = True) -> tuple[float, Tensor]:
    """τ > 0 with Φ(τ) = k (assumes λ > 0 and more than k groups with a_i > 0).

    Invariant: τ ∈ [lo, hi] with Φ(lo) ≥ k > Φ(hi); groups without a breakpoint inside (lo, hi) are
    folded into (|A|, P, Q), so that Φ(τ) = |A| + P/τ − Q + Σ_active φ_i(τ) on the bracket.

    Narrowing rounds (while more than ``_SORT_DIRECT`` groups are active): the sweep over a strided
    sample of the active groups places the pivots where the sample's estimate of Φ is k ± 4σ; the
    groups are folded against that candidate bracket, and Φ at its ends is then exact from the few
    groups left. If a pivot is on the wrong side of τ (rare), the part of the bracket that it proves
    valid is used instead. Finally the breakpoints of the active groups are swept.

    Returns τ and a (2, n) scratch buffer that the caller may reuse.
    """
    g = top = _Groups(a, w, lam)
    lo, hi = 0.0, math.inf
    cA, P, Q = 0, 0.0, 0.0
    rounds = 0
    while narrow and len(g) > _SORT_DIRECT and rounds < _MAX_ROUNDS:
        rounds += 1
        n = len(g)
        sample = g.take(torch.arange(0, n, max(1, n // min(_SAMPLE, n // 4)), device=a.device))
        s = len(sample)
        # Φ̂ from the sample has standard deviation at most n·½/√s (each term lies in [0, 1])
        delta = _Z_SCORE * 0.5 * n * math.sqrt(max(1 - s / n, 0.0) / s) + 1.0
        piv = sample.sweep(lo, hi, (cA, P, Q), [k + delta, k - delta], n / s)
        c_lo, c_hi = (max(lo, min(t, hi)) for t in piv.tolist())
        if c_lo >= c_hi:
            break
        verified = False
        while True:
            n_full, dP, dQ, sub = g.resolve(c_lo, c_hi)
            if verified:
                break
            st = (cA + n_full, P + dP, Q + dQ)
            if c_lo > lo and st[0] + st[1] / c_lo - st[2] + sub.phi(c_lo) < k:  # τ < c_lo
                c_lo, c_hi, verified = lo, c_lo, True
            elif c_hi < hi and st[0] + st[1] / c_hi - st[2] + sub.phi(c_hi) >= k:  # τ ≥ c_hi
                c_lo, c_hi, verified = c_hi, hi, True
            else:
                break
        lo, hi = c_lo, c_hi
        cA, P, Q = cA + n_full, P + dP, Q + dQ
        progress = len(sub) < 0.75 * n
        g = sub
        if not progress:
            break
    return float(g.sweep(lo, hi, (cA, P, Q), [float(k)])[0]), top.buf


@torch.no_grad()
def wgsef_prox_norms(a: Tensor, w: Tensor, k: int, lam: float, *, narrow: bool = True) -> Tensor:
    """Output group norms r of the prox of ``lam·WGSEF_k`` for input group norms ``a ≥ 0`` (METHODS.md §1.5).

    Sort-based breakpoint sweep (see the module docstring); no Python loop over groups.
    ``narrow=False`` sorts all 2m breakpoints (same result, slower for large m). Groups with
    ``a_i ≤ τ w_i`` come out exactly zero; at least ``min(k, nnz(a))`` groups stay non-zero.

    Example (METHODS.md §1.6 Ex. 1: singletons, w = 1, k = 2, λ = 1, τ = 7/3):
        >>> r = wgsef_prox_norms(torch.tensor([5., 4., 3., 2., 1., .5]), torch.ones(6), 2, 1.0)
        >>> [round(x, 6) for x in r.tolist()]
        [2.5, 1.666667, 0.666667, 0.0, 0.0, 0.0]
    """
    k = _check_k(k)
    lam = _check_lam(lam)
    a, w = _check_norms(a, w)
    nnz = int(torch.count_nonzero(a))
    r = _trivial_prox(a, w, k, lam, nnz)
    if r is not None:
        return r
    # Zero groups need no special case: both their breakpoints are 0, at or below every bracket.
    tau, scratch = _solve_tau(a, w, k, lam, narrow=narrow)
    return _apply_tau(a, w, lam, tau, tmp=scratch[0])


@torch.no_grad()
def wgsef_prox_norms_bisect(a: Tensor, w: Tensor, k: int, lam: float, iters: int = 100) -> Tensor:
    """The same prox as :func:`wgsef_prox_norms`, by bisection on τ ∈ (0, max a_i/w_i] in float64.

    Φ(τ) = Σ_i clip(λ w_i a_i/τ − λ w_i², 0, 1) is continuous and non-increasing; each step evaluates it
    for all groups at once and keeps the part of the bracket where it crosses k. For small m a step
    evaluates up to 15 equally spaced points instead of the midpoint (4 bits per step instead of 1 at
    the same cost). ``iters`` bounds the number of steps; the loop stops once the bracket no longer
    shrinks (about 60 halvings in float64).

    Example (METHODS.md §1.6 Ex. 2, λ = 0.5, τ = 1.6875):
        >>> v = torch.tensor([5., 4., 2.5, 2., 1., .5], dtype=torch.float64)
        >>> wgsef_prox_norms_bisect(v, torch.ones(6, dtype=torch.float64), 2, 0.5).tolist()
        [3.3125, 2.3125, 0.8125, 0.3125, 0.0, 0.0]
    """
    k = _check_k(k)
    lam = _check_lam(lam)
    a, w = _check_norms(a, w)
    r = _trivial_prox(a, w, k, lam, int(torch.count_nonzero(a)))
    if r is not None:
        return r
    a64, w64 = a.to(_ACC), w.to(_ACC)
    m = a64.numel()
    n_pts = max(1, min(15, (1 << 16) // m))
    frac = torch.arange(1, n_pts + 1, dtype=_ACC, device=a.device) / (n_pts + 1)
    p = (lam * w64 * a64)[:, None]
    q = (lam * w64 * w64)[:, None]
    buf = torch.empty((m, n_pts), dtype=_ACC, device=a.device)
    lo = torch.zeros(1, dtype=_ACC, device=a.device)
    hi = (a64 / w64).max().reshape(1)
    for i in range(int(iters)):
        pts = lo + (hi - lo) * frac
        phi = torch.div(p, pts, out=buf).sub_(q).clamp_(0, 1).sum(0)  # non-increasing along pts
        c = torch.count_nonzero(phi >= k)  # Φ ≥ k on pts[:c], < k on pts[c:]
        ext = torch.cat([lo, pts, hi])
        lo, hi = ext[c].reshape(1), ext[c + 1].reshape(1)
        if i % 4 == 3 and not bool(lo < 0.5 * (lo + hi) < hi):  # converged (checked every 4 steps)
            break
    return _apply_tau(a, w, lam, float(0.5 * (lo + hi)))


# ----------------------------------------------------------------------------------------------------
# Prox and certificate on flat vectors
# ----------------------------------------------------------------------------------------------------


def _slot_index(group_index: Tensor, m: int) -> Tensor:
    """group_index with -1 (ungrouped) mapped to the extra slot m."""
    return torch.where(group_index < 0, m, group_index)


@torch.no_grad()
def group_norms(v: Tensor, group_index: Tensor, m: int) -> Tensor:
    """‖v_{G_i}‖ for i = 0..m−1 (entries with ``group_index == -1`` ignored), accumulated in float64.

    Example:
        >>> group_norms(torch.tensor([3., 4., 1., 7.]), torch.tensor([0, 0, 1, -1]), 2).tolist()
        [5.0, 1.0]
    """
    gi = _slot_index(group_index.to(v.device), m)
    acc = torch.zeros(m + 1, dtype=_ACC, device=v.device)
    vv = v.reshape(-1).to(_ACC)
    acc.index_add_(0, gi, vv * vv)
    return acc[:m].sqrt()


@torch.no_grad()
def wgsef_prox(v: Tensor, group_index: Tensor, w: Tensor, k: int, lam: float, method: str = "sort") -> Tensor:
    """P(v) = argmin_θ lam·WGSEF_k(θ) + ½‖θ − v‖² on a flat vector (METHODS.md §1.5).

    Entry ``j`` of ``v`` belongs to group ``group_index[j]`` (``0..m−1``, with ``m = len(w)``) or is
    ungrouped (``-1``) and copied unchanged. Each group is rescaled by ``r_i/a_i`` with ``a_i`` its norm
    and ``r_i`` from :func:`wgsef_prox_norms` (``method="sort"``) or
    :func:`wgsef_prox_norms_bisect` (``method="bisect"``).

    Example (METHODS.md §1.6 Ex. 3: groups of sizes 2, 4, 2, 1, 3, w_i = √|G_i|, k = 2, λ = 0.5):
        >>> v = torch.tensor([3., 4., 1., 1., 1., 1., .6, .8, 2., .3, -.4, 0.], dtype=torch.float64)
        >>> gi = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2, 3, 4, 4, 4])
        >>> w = torch.tensor([2., 4., 2., 1., 3.], dtype=torch.float64).sqrt()
        >>> [round(x, 6) for x in wgsef_prox(v, gi, w, 2, 0.5).tolist()]
        [1.5, 2.0, 0.142857, 0.142857, 0.142857, 0.142857, 0.0, 0.0, 1.142857, 0.0, -0.0, 0.0]
    """
    if method not in ("sort", "bisect"):
        raise ValueError(f"method '{method}': expected 'sort' or 'bisect'")
    if v.shape != group_index.shape:
        raise ValueError(f"v of shape {tuple(v.shape)} and group_index of shape {tuple(group_index.shape)}: "
                         "expected the same shape")
    m = w.numel()
    a = group_norms(v, group_index, m)
    solve = wgsef_prox_norms if method == "sort" else wgsef_prox_norms_bisect
    # the solver works in v's precision (float64 norms stay float64)
    r = solve(a.to(_work_dtype(v)), w.reshape(-1).to(device=v.device), k, lam).to(_ACC)
    scale = torch.where(a > 0, r / a.clamp_min(1e-300), torch.zeros_like(a))
    scale = torch.cat([scale, scale.new_ones(1)]).to(_work_dtype(v))
    return (v * scale[_slot_index(group_index.to(v.device), m)]).to(v.dtype)


@torch.no_grad()
def fenchel_young_gap(p: Tensor, v: Tensor, group_index: Tensor, w: Tensor, k: int, lam: float) -> float:
    """The optimality certificate of METHODS.md §1.5: ``p`` is the prox of ``lam·WGSEF_k`` at ``v`` iff

        WGSEF_k(p) + WGSEF_k*(y) − ⟨p, y⟩ = 0,   y = (v − p)/lam,

    with ``WGSEF_k*(y) = ½ · (sum of the k largest (‖y_{G_i}‖/w_i)²)``. The gap is ≥ 0 for every ``p``
    (Fenchel–Young); it is returned as a float, computed in float64. Ungrouped entries must be copied
    (``p_j = v_j``), otherwise the gap is infinite.

    Example:
        >>> v = torch.tensor([5., -4., 3., 2., -1., .5], dtype=torch.float64)
        >>> gi, w = torch.arange(6), torch.ones(6, dtype=torch.float64)
        >>> abs(fenchel_young_gap(wgsef_prox(v, gi, w, 2, 1.0), v, gi, w, 2, 1.0)) < 1e-12
        True
    """
    lam = _check_lam(lam)
    if lam == 0:
        raise ValueError("fenchel_young_gap: lam must be > 0")
    m = w.numel()
    p64 = p.reshape(-1).to(_ACC)
    v64 = v.reshape(-1).to(device=p.device, dtype=_ACC)
    gi = group_index.reshape(-1).to(p.device)
    w64 = w.reshape(-1).to(device=p.device, dtype=_ACC)
    y = (v64 - p64) / lam
    grouped = gi >= 0
    if bool((y[~grouped] != 0).any()):
        return math.inf
    value = wgsef_value(group_norms(p64, gi, m), w64, k)
    conj = conjugate_topk(group_norms(y, gi, m) / w64, k)
    inner = (p64 * y)[grouped].sum()
    return float(value + conj - inner)
