"""The WGSEF prox's share of a training step, on the built-in models.

Reproduce:
    python benchmarks/bench_prox_step.py            # all models, 1 thread
    python benchmarks/bench_prox_step.py --quick    # small-resnet and resnet20 only

For each model, in this one process: the median time of a plain training step (forward, backward,
SGD with momentum) on a real batch, and the median time of WGSEF's ``after_step`` on the same model,
split into its parts: the per-unit norms, the search for this step's λ (adaptive mode: ~20 prox
calls, warm-started), and the final prox plus rescaling of the parameters. The share is
after_step / (step + after_step). Machines are shared and noisy: read the ratios, not the times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hwprune.graph import discover_groups  # noqa: E402
from hwprune.graph.groups import UnitIndex  # noqa: E402
from hwprune.models import build_model  # noqa: E402
from hwprune.regularizers import RegContext, SparsitySchedule, build_regularizer  # noqa: E402
from hwprune.target import load_target  # noqa: E402

CASES = [  # model, in_channels, input size, batch
    ("small-resnet", 1, 8, 64),
    ("resnet20", 1, 28, 128),
    ("resnet56", 1, 28, 128),
    ("mobilenetv2", 1, 28, 64),
    ("vgg16-bn", 1, 28, 64),
]


def timed(fn, repeats):
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def bench(name, cin, size, batch, repeats):
    torch.manual_seed(0)
    model = build_model(name, in_channels=cin, num_classes=10, input_size=size)
    x, y = torch.randn(batch, cin, size, size), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    t_step = timed(step, repeats)
    groups = discover_groups(model, x[:1], target=load_target("host-cpu"))
    index = UnitIndex(model, groups)
    n = index.n_units
    schedule = SparsitySchedule(0.5, 100, ramp=0.01)  # wants half the units zero from the first steps
    reg = build_regularizer("wgsef", RegContext(model, index, keep_units=n // 2, schedule=schedule, total_steps=100))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def after():
        model.load_state_dict(state)  # same input every time (not timed separately: a copy)
        reg.after_step(0.01, 50)

    t_copy = timed(lambda: model.load_state_dict(state), repeats)
    t_after = max(timed(after, repeats) - t_copy, 0.0)
    t_norms = timed(lambda: index.sq_norms(), repeats)
    a = index.sq_norms().sqrt().double()
    free = ~reg.protect.mask(a / reg.w)
    t_solve = timed(lambda: reg._solve(a[free], reg.w[free], n // 2), repeats)
    return dict(model=name, units=n, groups=sum(g.prunable for g in groups), batch=batch, step_ms=1e3 * t_step,
                after_ms=1e3 * t_after, norms_ms=1e3 * t_norms, solve_ms=1e3 * t_solve,
                share=t_after / (t_step + t_after))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = CASES[:2] if args.quick else CASES
    print(f"WGSEF after_step vs a training step, {args.threads} thread(s), median of {args.repeats}")
    head = f"{'model':13s} {'units':>6s} {'groups':>6s} {'batch':>5s} | {'step ms':>8s} | {'after ms':>8s} " \
           f"{'norms':>6s} {'λ solve':>7s} | {'share':>6s}"
    print(head)
    print("-" * len(head))
    for case in cases:
        r = bench(*case, args.repeats)
        print(f"{r['model']:13s} {r['units']:6d} {r['groups']:6d} {r['batch']:5d} | {r['step_ms']:8.1f} | "
              f"{r['after_ms']:8.2f} {r['norms_ms']:6.2f} {r['solve_ms']:7.2f} | {100 * r['share']:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
