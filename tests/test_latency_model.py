"""The latency cost model: it reproduces its tables, is monotone, its savings match its differences, its
calibration passes through the measured points, and it drives the projection to a latency budget."""

import numpy as np
import pytest
import torch

from hwprune.budget import Budget, check_budget, project
from hwprune.errors import BudgetError, ProfileError
from hwprune.graph import discover_groups
from hwprune.latency.budget import min_width_keep
from hwprune.latency.model import LatencyModel, monotone
from hwprune.latency.shapes import layer_uses
from hwprune.models import build_model
from hwprune.latency.profile import LayerTable, Profile
from hwprune.target import load_target


def _cost(op, widths):
    """A made-up latency surface with a fixed part, like a real layer: 2 us plus 1 ns per MAC-ish."""
    return 0.002 + 1e-6 * float(np.prod(widths)) * (9 if op != "linear" else 1)


def _synthetic_profile(uses) -> Profile:
    tables = {}
    for u in uses:
        grid = [list(g) for g in u.grids]
        ms = np.zeros([len(g) for g in grid])
        for idx in np.ndindex(*ms.shape):
            ms[idx] = _cost(u.op, [g[i] for g, i in zip(grid, idx)])
        if u.key in tables:  # layers sharing a shape: widen the grid to the union
            old = tables[u.key]
            grid = [sorted(set(a) | set(b)) for a, b in zip(old.grid, grid)]
            ms = np.zeros([len(g) for g in grid])
            for idx in np.ndindex(*ms.shape):
                ms[idx] = _cost(u.op, [g[i] for g, i in zip(grid, idx)])
        tables[u.key] = LayerTable(u.key, u.op, u.shape, grid, ms)
    return Profile("host-cpu", "2026-01-01T00:00:00+00:00", {}, "synthetic", True, {"name": "onnxruntime"}, {}, 1, 0, 1,
                   0.0, tables)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = build_model("small-resnet", in_channels=1, num_classes=10, input_size=8, width=0.5).eval()
    x = torch.zeros(1, 1, 8, 8)
    groups = discover_groups(net, x, target=load_target("host-cpu"))
    uses, _, _ = layer_uses(net, x, groups)
    prof = _synthetic_profile(uses)
    return net, x, groups, uses, prof, LatencyModel.build(prof, net, x, groups)


def test_predictions_are_the_table_values_at_grid_points(setup):
    net, x, groups, uses, prof, lm = setup
    n = lm.n_units
    # dense: every layer at its full widths, read straight from the tables
    assert lm(np.ones(n)) == pytest.approx(sum(_cost(u.op, u.full) for u in uses), rel=1e-12)
    _, mins = min_width_keep(groups)
    lows = [tuple(g[0] for g in u.grids) for u in uses]
    assert lm(mins) == pytest.approx(sum(_cost(u.op, w) for u, w in zip(uses, lows)), rel=1e-12)


def test_monotone_in_every_unit(setup):
    *_, lm = setup
    rng = np.random.default_rng(0)
    for _ in range(5):
        keep = np.ones(lm.n_units)
        last = lm(keep)
        for u in rng.permutation(lm.n_units)[: lm.n_units // 2]:
            keep[u] = 0
            now = lm(keep)
            assert now <= last + 1e-12
            last = now
    assert np.all(lm.unit_savings(np.ones(lm.n_units)) > 0)


def test_unit_savings_match_the_difference_of_removing_a_unit(setup):
    *_, lm = setup
    keep = np.ones(lm.n_units)
    savings = lm.unit_savings(keep)
    for u in (0, lm.n_units // 2, lm.n_units - 1):
        less = keep.copy()
        less[u] = 0
        # piecewise-linear tables: removing one channel walks down one segment exactly
        assert savings[u] == pytest.approx(lm(keep) - lm(less), rel=1e-6)


def test_monotone_smoothing_hides_noise_but_not_real_growth():
    assert monotone(np.array([1.0, 0.9, 2.0])).tolist() == [1.0, 1.0, 2.0]
    t = LayerTable("linear", "linear", {}, [[8, 16, 24], [10]], np.array([[1.0], [0.5], [3.0]]))
    assert t.predict(16, 10) == 0.5  # raw
    assert t.predict(16, 10, table=monotone(t.ms)) == 1.0  # smoothed


def test_calibration_passes_through_both_measured_points(setup):
    net, x, groups, uses, prof, lm = setup
    _, mins = min_width_keep(groups)
    cal = lm.calibrated(dense_ms=0.5, min_ms=0.06, min_keep=mins)
    assert cal(np.ones(lm.n_units)) == pytest.approx(0.5)
    assert cal(mins) == pytest.approx(0.06)
    assert cal.scale > 0 and np.allclose(cal.unit_savings(np.ones(lm.n_units)), cal.scale * lm.unit_savings(np.ones(lm.n_units)))
    with pytest.raises(ProfileError, match="calibration failed"):
        lm.calibrated(dense_ms=0.05, min_ms=0.06, min_keep=mins)


def test_projection_meets_a_latency_budget_preferring_costly_units(setup):
    net, x, groups, uses, prof, lm = setup
    n = lm.n_units
    dense = lm(np.ones(n))
    budget = Budget("latency", 0.5 * dense)
    proj = project(groups, np.ones(n), budget, lm)  # equal importance: only the cost decides
    assert proj.achieved <= budget.value + 1e-9 and proj.achieved > 0.3 * dense
    # with equal scores the cheapest-per-ms chunks go first: the removed units save more than average
    removed = ~proj.keep_mask
    savings = lm.unit_savings(np.ones(n))
    assert savings[removed].mean() > savings.mean()


def test_budget_below_the_floor_is_rejected_with_the_range(setup):
    net, x, groups, uses, prof, lm = setup
    _, mins = min_width_keep(groups)
    floor = lm(mins)
    with pytest.raises(BudgetError, match=r"predicted floor.*Reachable range: \[.*\] ms"):
        check_budget(groups, Budget("latency", floor * 0.9), lm)
    check_budget(groups, Budget("latency", floor * 1.1), lm)


def test_budget_at_or_above_the_dense_latency_is_rejected(setup):
    """--latency-ms above the dense model's latency asks for nothing; it used to train a run that removed
    no unit (and grow the latency loop's budget round after round)."""
    net, x, groups, uses, prof, lm = setup
    dense = lm(np.ones(lm.n_units))
    for ms in (dense, 3 * dense):
        with pytest.raises(BudgetError, match=r"asks for nothing: the dense model is already .* ms"):
            check_budget(groups, Budget("latency", ms), lm)
    check_budget(groups, Budget("latency", 0.99 * dense), lm)


def test_missing_or_too_small_tables_name_the_layer(setup):
    net, x, groups, uses, prof, lm = setup
    key = uses[1].key
    partial = Profile(**{**prof.__dict__, "layers": {k: v for k, v in prof.layers.items() if k != key}})
    with pytest.raises(ProfileError, match=f"'{uses[1].name}' \\({key}\\): no table.*hwprune profile --target host-cpu"):
        LatencyModel.build(partial, net, x, groups)
    t = prof.layers[key]
    narrow = LayerTable(key, t.op, t.shape, [g[:2] for g in t.grid], t.ms[:2, :2] if t.ms.ndim == 2 else t.ms[:2])
    short = Profile(**{**prof.__dict__, "layers": {**prof.layers, key: narrow}})
    with pytest.raises(ProfileError, match="needs cin .* the profile has"):
        LatencyModel.build(short, net, x, groups)
