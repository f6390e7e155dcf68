"""The allocation solver's time: incremental costs against the generic path, side by side in one run.

The solver varies one group's width at a time. Cost models that are sums of terms over per-variable
kept counts (FLOPs, params: bilinear; the latency model: one table per layer) expose ``partial_cost``,
and the solver re-evaluates only the terms the varied group touches. Any other cost goes through the
generic path: a keep vector per candidate, and the whole cost for each. This benchmark runs both on the
same problems (the generic one by hiding ``partial_cost`` behind a wrapper), checks that they choose
the same widths, and prints the time ratio.

Reproduce:
    python benchmarks/bench_allocation.py            # about 2 minutes on the 2-core machine
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hwprune.budget import Budget  # noqa: E402
from hwprune.budget.cost import flops_model  # noqa: E402
from hwprune.budget.projection import project  # noqa: E402
from hwprune.graph import discover_groups  # noqa: E402
from hwprune.latency.model import LatencyModel  # noqa: E402
from hwprune.latency.profile import Profile  # noqa: E402
from hwprune.models import build_model  # noqa: E402
from hwprune.target import load_target  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Generic:
    """The same cost without ``partial_cost``: the solver's generic path."""

    def __init__(self, cost):
        self._cost = cost
        self.name, self.in_ms, self.stepwise = cost.name, cost.in_ms, cost.stepwise
        self.saves_compute = cost.saves_compute

    def __call__(self, keep):
        return self._cost(keep)

    def unit_savings(self, keep):
        return self._cost.unit_savings(keep)

    def __getattr__(self, name):
        if name in ("partial_cost", "cost_of_counts", "batch"):
            raise AttributeError(name)
        return getattr(self._cost, name)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def cases():
    target = load_target("host-cpu")
    x = torch.zeros(1, 1, 28, 28)
    resnet56 = build_model("resnet56", in_channels=1, num_classes=10, input_size=28)
    g56 = discover_groups(resnet56, x, target=target)
    fm56 = flops_model(resnet56, (x,), g56)
    yield "resnet56, flops 0.5, global", g56, fm56, Budget("flops", 0.5), None
    lm = LatencyModel.build(Profile.load(ROOT / "profiles" / "host-cpu.json"), resnet56, x, g56)
    dense_ms = lm(np.ones(lm.n_units))
    yield "resnet56, latency 0.7x, global", g56, lm, Budget("latency", 0.7 * dense_ms), fm56
    try:
        from efficientnet_pytorch import EfficientNet
    except ImportError:
        return
    eff = EfficientNet.from_name("efficientnet-b0").eval()
    xe = torch.zeros(1, 3, 32, 32)
    ge = discover_groups(eff, xe, target=target)
    yield "efficientnet-b0, flops 0.5, global", ge, flops_model(eff, (xe,), ge), Budget("flops", 0.5), None


def main() -> int:
    torch.set_num_threads(1)
    print("| problem | groups | units | generic path (s) | incremental (s) | ratio | same widths |")
    print("|---|---|---|---|---|---|---|")
    for name, groups, cost, budget, share in cases():
        scores = np.random.default_rng(0).random(cost.A.shape[1])
        fast, t_fast = _timed(lambda: project(groups, scores, budget, cost, allocation="global", share_cost=share))
        slow, t_slow = _timed(lambda: project(groups, scores, budget, Generic(cost), allocation="global",
                                              share_cost=share))
        same = all(np.array_equal(fast.keep[k], slow.keep[k]) for k in fast.keep)
        print(f"| {name} | {sum(g.prunable for g in groups)} | {cost.A.shape[1]} | {t_slow:.2f} | {t_fast:.2f} | "
              f"{t_slow / t_fast:.1f}x | {same} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
