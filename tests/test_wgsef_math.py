"""WGSEF value and prox (hwprune/regularizers/wgsef_math.py) against METHODS.md §1.4–1.6.

The worked examples of §1.6 are checked to the doc's numbers for every solver; random cases are
certified by the Fenchel–Young gap of §1.5 (zero iff the output is the prox).
"""

import math

import numpy as np
import pytest
import torch

from hwprune.regularizers import wgsef_math as wm
from hwprune.regularizers.wgsef_math import (
    conjugate_topk,
    fenchel_young_gap,
    group_norms,
    ksupport_sq,
    wgsef_prox,
    wgsef_prox_norms,
    wgsef_prox_norms_bisect,
    wgsef_value,
)

F64 = torch.float64



# The solvers on group norms: sort with and without narrowing, and bisection.
SOLVERS = {
    "sort": wgsef_prox_norms,
    "sort-full": lambda a, w, k, lam: wgsef_prox_norms(a, w, k, lam, narrow=False),
    "bisect": wgsef_prox_norms_bisect,
}


def t64(x):
    return torch.tensor(x, dtype=F64)


def assert_close(x, y, atol=1e-9):
    """Max-abs comparison (torch.testing.assert_close costs a second of imports on first use)."""
    assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, y.dtype, x.shape, y.shape)
    err = (x.double() - y.double()).abs().max().item() if x.numel() else 0.0
    assert err <= atol, f"max |x - y| = {err:.3g} > {atol:.3g}:\n{x}\n{y}"


def prox_flat(v, gi, w, k, lam, solver):
    """wgsef_prox with any of SOLVERS (the flat-vector wrapper, but the solver chosen here)."""
    if solver == "sort":
        return wgsef_prox(v, gi, w, k, lam, method="sort")
    if solver == "bisect":
        return wgsef_prox(v, gi, w, k, lam, method="bisect")
    a = group_norms(v, gi, w.numel())
    r = SOLVERS[solver](a, w, k, lam)
    scale = torch.where(a > 0, r / a.clamp_min(1e-300), torch.zeros_like(a))
    return v * torch.cat([scale, scale.new_ones(1)])[torch.where(gi < 0, w.numel(), gi)]


# ---------------------------------------------------------------------------------------------------
# METHODS.md §1.6 worked examples
# ---------------------------------------------------------------------------------------------------

EX1_V = [5.0, -4.0, 3.0, 2.0, -1.0, 0.5]
EX2_V = [5.0, -4.0, 2.5, 2.0, -1.0, 0.5]
EX2_ROWS = [  # λ, τ (None: any τ in an interval), P(v), nnz
    (0.1, 0.58, [4.42, -3.42, 1.92, 1.42, -0.42, 0.0], 5),
    (0.5, 1.6875, [3.3125, -2.3125, 0.8125, 0.3125, 0.0, 0.0], 4),
    (1.0, 13 / 6, [2.5, -11 / 6, 1 / 3, 0.0, 0.0, 0.0], 3),
    (4.0, None, [1.0, -0.8, 0.0, 0.0, 0.0, 0.0], 2),
]
EX3_V = [3, 4, 1, 1, 1, 1, 0.6, 0.8, 2, 0.3, -0.4, 0]
EX3_GI = [0, 0, 1, 1, 1, 1, 2, 2, 3, 4, 4, 4]
EX3_W = [math.sqrt(2), 2.0, math.sqrt(2), 1.0, math.sqrt(3)]


@pytest.mark.parametrize("solver", SOLVERS)
def test_example1_singletons(solver):
    v = t64(EX1_V)
    gi, w = torch.arange(6), torch.ones(6, dtype=F64)
    p = prox_flat(v, gi, w, 2, 1.0, solver)
    assert_close(p, t64([2.5, -5 / 3, 2 / 3, 0, 0, 0]), atol=1e-6)
    assert int(torch.count_nonzero(p)) == 3  # > k: k is a lower bound on the survivors
    # τ = 7/3: the shrunk entries are |v| − τ
    assert abs((4 - abs(p[1].item())) - 7 / 3) < 1e-12
    assert abs(wgsef_value(v.abs(), w, 2).item() - 60.0625) < 1e-6
    assert abs(wgsef_value(p.abs(), w, 2).item() - 5.847222) < 1e-6
    assert abs(fenchel_young_gap(p, v, gi, w, 2, 1.0)) < 1e-12


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("lam,tau,expected,nnz", EX2_ROWS)
def test_example2_lambda_sweep(solver, lam, tau, expected, nnz):
    v = t64(EX2_V)
    gi, w = torch.arange(6), torch.ones(6, dtype=F64)
    p = prox_flat(v, gi, w, 2, lam, solver)
    assert_close(p, t64(expected), atol=1e-6)
    assert int(torch.count_nonzero(p)) == nnz
    shrunk = (p != 0) & ((p.abs() - v.abs() / (1 + lam)).abs() > 1e-9)  # non-zero and not ridge-shrunk
    if tau is not None:  # every shrunk entry sits at |v| − τ
        assert shrunk.any()
        assert_close(v.abs()[shrunk] - p.abs()[shrunk], torch.full((int(shrunk.sum()),), tau, dtype=F64))
    assert abs(fenchel_young_gap(p, v, gi, w, 2, lam)) < 1e-12


@pytest.mark.parametrize("solver", SOLVERS)
def test_example2_k_at_least_nnz_is_ridge(solver):
    v = t64(EX2_V)
    p = prox_flat(v, torch.arange(6), torch.ones(6, dtype=F64), 6, 1.0, solver)
    assert_close(p, v / 2, atol=1e-12)


def test_example2_values():
    a, w = t64(EX2_V).abs(), torch.ones(6, dtype=F64)
    assert abs(wgsef_value(a, w, 2).item() - 56.25) < 1e-9
    assert abs(wgsef_value(a, w, 1).item() - 112.5) < 1e-9
    assert abs(0.5 * ksupport_sq(a, 1).item() - 0.5 * a.sum().item() ** 2) < 1e-9


@pytest.mark.parametrize("solver", SOLVERS)
def test_example3_groups_and_weights(solver):
    v, gi, w = t64(EX3_V), torch.tensor(EX3_GI), t64(EX3_W)
    a = group_norms(v, gi, 5)
    assert_close(a, t64([5, 2, 1, 2, 0.5]))
    p = prox_flat(v, gi, w, 2, 0.5, solver)
    expected = t64([1.5, 2, 1 / 7, 1 / 7, 1 / 7, 1 / 7, 0, 0, 8 / 7, 0, 0, 0])
    assert_close(p, expected, atol=1e-6)
    assert_close(group_norms(p, gi, 5), t64([2.5, 2 / 7, 0, 8 / 7, 0]), atol=1e-6)
    # τ = 6/7: shrunk groups sit at a_i − τ w_i
    r = group_norms(p, gi, 5)
    assert abs((a[1] - r[1]).item() / EX3_W[1] - 6 / 7) < 1e-12
    assert abs((a[3] - r[3]).item() / EX3_W[3] - 6 / 7) < 1e-12
    assert abs(fenchel_young_gap(p, v, gi, w, 2, 0.5)) < 1e-12


# ---------------------------------------------------------------------------------------------------
# Value: k-support norm
# ---------------------------------------------------------------------------------------------------


def box_form(z, k, theta):
    """Σ z_i²/θ_i (the box form of §1.2), with 0/0 = 0."""
    return float(np.sum(np.where(z > 0, z**2 / np.maximum(theta, 1e-300), 0.0)))


@pytest.mark.parametrize("seed", range(20))
def test_ksupport_matches_box_form(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 12))
    z = rng.exponential(size=m) * (rng.random(m) < 0.8)
    if seed % 4 == 0:
        z[: m // 2] = z[0]  # ties
    k = int(rng.integers(1, m + 2))
    val = ksupport_sq(torch.tensor(z), k).item()
    if k >= np.count_nonzero(z):
        assert abs(val - np.sum(z**2)) < 1e-12
        return
    # the minimiser θ_i = min(1, z_i/ρ) with Σθ = k (ρ by bisection) attains the value ...
    lo, hi = 0.0, z.sum()
    for _ in range(200):
        rho = 0.5 * (lo + hi)
        lo, hi = (rho, hi) if np.minimum(1, z / rho).sum() > k else (lo, rho)
    theta = np.minimum(1, z / hi)
    assert abs(val - box_form(z, k, theta)) < 1e-9 * max(1.0, val)
    # ... and no feasible θ (θ ∈ (0, 1], Σθ ≤ k) does better
    for _ in range(50):
        th = rng.random(m) + 1e-3
        th = np.minimum(1, th * k / th.sum())
        assert box_form(z, k, th) >= val - 1e-9 * val


@pytest.mark.parametrize(
    "z,k,expected",
    [
        ([0.0, 0.0, 0.0], 2, 0.0),  # zeros
        ([3.0, 4.0], 5, 25.0),  # m < k
        ([3.0, 0.0, 4.0, 0.0], 2, 25.0),  # k = nnz
        ([1.0, 2.0, 3.0], 1, 36.0),  # k = 1: ‖z‖₁²
        ([10.0, 1.0, 1.0], 2, 104.0),  # one large, rest averaged
        ([2.0, 2.0, 2.0], 2, 18.0),  # ties: (Σz)²/k
        ([], 3, 0.0),
    ],
)
def test_ksupport_special_cases(z, k, expected):
    assert abs(ksupport_sq(t64(z), k).item() - expected) < 1e-12


def test_conjugate_topk():
    assert conjugate_topk(t64([1, -3, 2]), 2).item() == 6.5
    assert conjugate_topk(t64([1, -3, 2]), 5).item() == 7.0
    assert conjugate_topk(torch.tensor([3.0]), 1).dtype == torch.float32


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_invalid_k_raises(bad):
    with pytest.raises(ValueError):
        wgsef_prox_norms(t64([1.0, 2.0]), t64([1.0, 1.0]), bad, 0.1)
    with pytest.raises(ValueError):
        ksupport_sq(t64([1.0, 2.0]), bad)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError):
        wgsef_prox_norms(t64([1.0, 2.0]), t64([1.0, 1.0]), 1, -0.1)
    with pytest.raises(ValueError):
        wgsef_prox_norms(t64([1.0, 2.0]), t64([1.0]), 1, 0.1)
    with pytest.raises(ValueError):
        wgsef_prox(t64([1.0, 2.0]), torch.tensor([0, 1]), t64([1.0, 1.0]), 1, 0.1, method="magic")


# ---------------------------------------------------------------------------------------------------
# Prox: special cases
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_prox_special_cases(solver):
    f = SOLVERS[solver]
    a, w = t64([3.0, 0.0, 1.0, 2.0]), t64([1.0, 2.0, 0.5, 1.5])
    assert_close(f(a, w, 1, 0.0), a)  # λ = 0: identity
    ridge = a / (1 + 0.7 * w**2)
    assert_close(f(a, w, 3, 0.7), ridge)  # nnz(a) = 3 ≤ k
    assert_close(f(a, w, 9, 0.7), ridge)  # k ≥ m
    assert_close(f(torch.zeros(4, dtype=F64), w, 1, 0.7), torch.zeros(4, dtype=F64))  # all zero
    # all groups tied: every group shrinks by the same amount, all stay non-zero (Φ = m·φ = k)
    r = f(torch.full((5,), 2.0, dtype=F64), torch.ones(5, dtype=F64), 2, 0.3)
    assert torch.allclose(r, r[0].expand(5)) and bool((r > 0).all())
    # very large λ: top-k groups survive, ridge-shrunk
    r = f(t64([5.0, 4.0, 1.0, 0.5]), torch.ones(4, dtype=F64), 2, 1e6)
    assert_close(r, t64([5.0, 4.0, 0, 0]) / (1 + 1e6), atol=1e-15)


def test_ungrouped_entries_are_copied():
    v = t64([3.0, -7.0, 4.0, 1.0, 9.0])
    gi = torch.tensor([0, -1, 0, 1, -1])
    w = t64([1.0, 1.0])
    for method in ("sort", "bisect"):
        p = wgsef_prox(v, gi, w, 1, 0.5, method=method)
        assert p[1].item() == -7.0 and p[4].item() == 9.0
        assert abs(fenchel_young_gap(p, v, gi, w, 1, 0.5)) < 1e-12
    # a gap is infinite when an ungrouped entry moved
    assert fenchel_young_gap(torch.zeros(5, dtype=F64), v, gi, w, 1, 0.5) == math.inf


# ---------------------------------------------------------------------------------------------------
# Random cases: Fenchel–Young certificate, solver agreement, survivors
# ---------------------------------------------------------------------------------------------------


def random_case(seed, m_max=30):
    """A flat vector with groups of sizes 1..8, some zero or tied groups, a few ungrouped entries."""
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, m_max + 1))
    sizes = rng.integers(1, 9, size=m)
    gi = np.repeat(np.arange(m), sizes)
    v = rng.normal(size=gi.size) * rng.choice([0.1, 1.0, 10.0])
    zero = rng.random(m) < 0.15
    v[zero[gi]] = 0.0
    if m > 2 and rng.random() < 0.3:  # ties: copy one group's values into others of the same size
        g0 = int(rng.integers(m))
        for g in np.flatnonzero(sizes == sizes[g0]):
            v[gi == g] = v[gi == g0]
    if rng.random() < 0.3:  # ungrouped entries
        extra = rng.integers(0, gi.size + 1, size=3)
        gi = np.insert(gi, extra, -1)
        v = np.insert(v, extra, rng.normal(size=3))
    w = rng.uniform(0.3, 3.0, size=m) if rng.random() < 0.7 else np.sqrt(np.bincount(gi[gi >= 0], minlength=m))
    k = int(rng.integers(1, m + 2))
    lam = float(10 ** rng.uniform(-3, 3))
    return torch.tensor(v), torch.tensor(gi), torch.tensor(w), k, lam


def nnz_groups(x, gi, m):
    return int(torch.count_nonzero(group_norms(x, gi, m)))


@pytest.mark.parametrize("block", range(6))
def test_random_cases_certified(block):
    for seed in range(block * 50, block * 50 + 50):
        v, gi, w, k, lam = random_case(seed)
        m = w.numel()
        p = wgsef_prox(v, gi, w, k, lam, method="sort")
        pb = wgsef_prox(v, gi, w, k, lam, method="bisect")
        gap = fenchel_young_gap(p, v, gi, w, k, lam)
        assert -1e-9 <= gap <= 1e-9, (seed, gap)
        # the terms of the gap are WGSEF(p) + WGSEF*(y) = ⟨p, y⟩ (up to 1e5 here): rounding level
        terms = float((p * (v - p)).sum()) / lam
        assert abs(gap) <= 1e-13 * max(1.0, terms), (seed, gap, terms)
        assert (p - pb).abs().max().item() <= 1e-9, seed
        assert nnz_groups(p, gi, m) >= min(k, nnz_groups(v, gi, m)), seed


def test_inputs_with_grad_are_fine():
    v, gi, w, k, lam = random_case(4)
    v = v.clone().requires_grad_(True)
    p = wgsef_prox(v, gi, w, k, lam)
    assert not p.requires_grad
    assert_close(p, wgsef_prox(v.detach(), gi, w, k, lam), atol=0.0)


def test_gap_detects_a_wrong_output():
    v, gi, w, k, lam = random_case(3)
    p = wgsef_prox(v, gi, w, k, lam)
    assert fenchel_young_gap(1.01 * p, v, gi, w, k, lam) > 1e-9


# ---------------------------------------------------------------------------------------------------
# Narrowing (large m): the sampled bracket must never change the result
# ---------------------------------------------------------------------------------------------------


def large_norms(kind, m, rng):
    if kind == "uniform":
        a = rng.random(m)
    elif kind == "lognormal":
        a = rng.lognormal(0.0, 3.0, size=m)
    elif kind == "sorted":
        a = np.sort(rng.random(m))
    elif kind == "ties":
        a = rng.integers(1, 4, size=m).astype(float)
    else:  # "zeros": most groups already zero, a few large ones
        a = rng.random(m) * (rng.random(m) < 0.2) + 10 * (rng.random(m) < 0.01)
    return torch.tensor(a)


@pytest.mark.parametrize("kind", ["uniform", "lognormal", "sorted", "ties", "zeros"])
@pytest.mark.parametrize("lam", [1e-3, 0.3, 30.0])
def test_narrowing_matches_full_sort(kind, lam):
    rng = np.random.default_rng(hash((kind, lam)) % 2**32)
    m = 40_000
    a = large_norms(kind, m, rng)
    w = torch.tensor(rng.uniform(0.5, 2.0, size=m))
    k = int(rng.integers(1, m // 2))
    r = wgsef_prox_norms(a, w, k, lam)
    rf = wgsef_prox_norms(a, w, k, lam, narrow=False)
    assert (r - rf).abs().max().item() <= 1e-9 * max(1.0, a.max().item())
    gi = torch.arange(m)
    assert abs(fenchel_young_gap(r, a, gi, w, k, lam)) <= 1e-9 * max(1.0, wgsef_value(a, w, k).item())
    assert int(torch.count_nonzero(r)) >= min(k, int(torch.count_nonzero(a)))


@pytest.mark.parametrize("seed", range(4))
def test_narrowing_fallback_when_pivots_miss(monkeypatch, seed):
    """With a zero safety margin the sampled pivots often land on the wrong side of τ."""
    monkeypatch.setattr(wm, "_Z_SCORE", 0.0)
    monkeypatch.setattr(wm, "_SORT_DIRECT", 64)
    monkeypatch.setattr(wm, "_SAMPLE", 32)
    rng = np.random.default_rng(100 + seed)
    for _ in range(25):
        m = int(rng.integers(200, 3000))
        a = torch.tensor(rng.lognormal(0, 1, size=m) * (rng.random(m) < 0.9))
        w = torch.tensor(rng.uniform(0.5, 2.0, size=m))
        k = int(rng.integers(1, m))
        lam = float(10 ** rng.uniform(-3, 3))
        r = wgsef_prox_norms(a, w, k, lam)
        rf = wgsef_prox_norms(a, w, k, lam, narrow=False)
        assert (r - rf).abs().max().item() <= 1e-9 * a.max().item()


# ---------------------------------------------------------------------------------------------------
# float32
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sort", "bisect"])
def test_float32_in_float32_out(method):
    for seed in range(40):
        v, gi, w, k, lam = random_case(1000 + seed)
        p64 = wgsef_prox(v, gi, w, k, lam, method=method)
        p32 = wgsef_prox(v.float(), gi, w.float(), k, lam, method=method)
        assert p32.dtype == torch.float32
        scale = max(v.abs().max().item(), 1e-30)
        assert (p32.double() - p64).abs().max().item() <= 1e-5 * scale, seed


@pytest.mark.parametrize("lam", [1e-3, 0.3, 30.0])
def test_float32_large_m(lam):
    rng = np.random.default_rng(7)
    m = 60_000
    a = torch.tensor(rng.lognormal(0, 1, size=m))
    w = torch.tensor(rng.uniform(0.5, 2.0, size=m))
    k = m // 3
    r64 = wgsef_prox_norms(a, w, k, lam)
    r32 = wgsef_prox_norms(a.float(), w.float(), k, lam)
    assert r32.dtype == torch.float32
    assert (r32.double() - r64).abs().max().item() <= 1e-5 * a.max().item()
    assert wgsef_value(a.float(), w.float(), k).dtype == torch.float32
    assert ksupport_sq(a.float(), k).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    v, gi, w, k, lam = random_case(5, m_max=200)
    for method in ("sort", "bisect"):
        p = wgsef_prox(v.cuda(), gi.cuda(), w.cuda(), k, lam, method=method)
        assert p.device.type == "cuda"
        assert_close(p.cpu(), wgsef_prox(v, gi, w, k, lam, method=method), atol=1e-9)
    rng = np.random.default_rng(0)
    a = torch.tensor(rng.random(100_000))
    w = torch.tensor(rng.uniform(0.5, 2, size=100_000))
    assert_close(wgsef_prox_norms(a.cuda(), w.cuda(), 30_000, 0.1).cpu(),
                               wgsef_prox_norms(a, w, 30_000, 0.1), atol=1e-9)
