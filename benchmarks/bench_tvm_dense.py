"""TVM dense path against onnxruntime and torch on the models hwprune prunes, in one process.

For each model (dense, and pruned to the widths a plan keeps) it builds the TVM hand-scheduled library
(and, with --default, TVM's untuned default build), exports the ONNX model, and times every backend per
call from Python (``time.perf_counter`` around one call, after a warm-up), the backends taking turns
in rounds so that drift on a shared machine hits all alike. Reported: medians, the TVM / onnxruntime
ratio, and the build ("tuning") time: the hand schedule has no tuning, only a compile.

    python benchmarks/bench_tvm_dense.py                  # the default set (about 2 minutes here)
    python benchmarks/bench_tvm_dense.py --quick          # fewer runs
    python benchmarks/bench_tvm_dense.py --plan runs/X/plan.json   # widths of a real fit run

"Pruned" without --plan keeps the same fraction of every prunable group (rounded to the target's
multiples of 8): latency depends on the widths, not on which channels are kept or their values.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hwprune.runtimes.clock import take_turns, wall_clock, warm_up  # noqa: E402
from hwprune.runtimes.onnxruntime import export_onnx, ort_session  # noqa: E402
from hwprune.graph import discover_groups  # noqa: E402
from hwprune.models import build_model  # noqa: E402
from hwprune.apply.plan import Plan, apply_plan  # noqa: E402
from hwprune.apply.slicing import slice_model  # noqa: E402
from hwprune.target import host_description, load_target  # noqa: E402
from hwprune.runtimes.tvm.dense import build_dense  # noqa: E402

# (name, model, in_channels, input size, kept fraction of every group; 1.0 = dense)
CASES = [
    ("small-resnet (digits 1x8x8)", "small-resnet", 1, 8, 1.0),
    ("small-resnet pruned 30%", "small-resnet", 1, 8, 0.3),
    ("resnet20 (3x32x32)", "resnet20", 3, 32, 1.0),
    ("resnet20 pruned 50%", "resnet20", 3, 32, 0.5),
    ("mobilenetv2 w0.5 (3x32x32)", "mobilenetv2", 3, 32, 1.0),
]


def uniform_keep(groups, fraction: float) -> dict:
    keep = {}
    for g in groups:
        if g.prunable:
            keep[g.name] = np.arange(g.round_keep(fraction * g.size))
    return keep


def make_model(arch, channels, size, fraction, target, plan_path=None):
    torch.manual_seed(0)
    width = 0.5 if arch == "mobilenetv2" else 1.0
    net = build_model(arch, in_channels=channels, num_classes=10, input_size=size, width=width).eval()
    x = torch.zeros(1, channels, size, size)
    if plan_path:
        return apply_plan(net, Plan.load(plan_path), target=target).eval(), x
    if fraction < 1.0:
        groups = discover_groups(net, x, target=target)
        net = slice_model(copy.deepcopy(net), groups, uniform_keep(groups, fraction)).eval()
    return net, x


def time_all(calls: dict, blocks: dict, warmup: int, rounds: int, per_round: int) -> dict:
    """Median ms per call. ``calls`` are timed one call at a time from Python; ``blocks`` time a block of
    calls themselves (TVM's time_evaluator, one call per sample) and return the per-call ms. All take
    turns in the same rounds. Medians, not means: on a loaded machine a mean includes preemptions."""
    warm_up(calls.values(), warmup)
    samplers = {**{k: wall_clock(f) for k, f in calls.items()}, **{k: (lambda n, b=b: b()) for k, b in blocks.items()}}
    times = take_turns(samplers, rounds * per_round, per_round)
    return {k: float(np.median(v)) for k, v in times.items()}


def bench_case(label, arch, channels, size, fraction, target, args, tmp):
    import tvm

    net, x = make_model(arch, channels, size, fraction, target, args.plan if fraction < 1.0 else None)
    hand = build_dense(net, x, target)
    onnx_path = export_onnx(net, x, Path(tmp) / f"{arch}-{fraction}.onnx")
    sess = ort_session(onnx_path, threads=1)
    xn = x.numpy()
    xt = tvm.runtime.tensor(xn)
    vm = hand.vm()
    ref = net(x).detach().numpy()
    assert np.abs(hand.run(x) - ref).max() < 1e-4 * max(1, np.abs(ref).max()), label
    calls = {
        "tvm": lambda: vm["main"](xt),
        "ort": lambda: sess.run(None, {"input": xn}),
        "torch": lambda: net(x),
    }
    default_build = None
    if args.default:
        default_build = build_dense(net, x, target, schedule="default")
        dvm = default_build.vm()
        calls["tvm-default"] = lambda: dvm["main"](xt)
    ev = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=args.per_round)
    blocks = {"tvm-evaluator": lambda: [float(t) * 1e3 for t in ev(xt).results]}
    with torch.no_grad():
        med = time_all(calls, blocks, args.warmup, args.rounds, args.per_round)
    return {"label": label, "med": med, "build": hand.build_seconds,
            "default_build": default_build.build_seconds if default_build else None,
            "kernels": hand.kernel_calls}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer timed runs")
    p.add_argument("--default", action="store_true", help="also build and time TVM's untuned default pipeline (slow)")
    p.add_argument("--plan", default=None, help="plan.json of a small-resnet/digits fit run: its widths for 'pruned'")
    args = p.parse_args(argv)
    args.warmup, args.rounds, args.per_round = (10, 5, 20) if args.quick else (30, 10, 50)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export's deprecation notices (--default)
    target = load_target("host-cpu")
    import onnxruntime
    import tvm

    print(f"machine: {host_description()}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"TVM {tvm.__version__}; batch 1, 1 thread everywhere")
    print(f"TVM: {build_dense.__module__} hand schedule, target {dict(target.tvm.target)}; no tuning "
          f"(tuning time 0 s; the build time is the compile)")
    cases = CASES if args.plan is None else [c for c in CASES if c[1] == "small-resnet"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            rows.append(bench_case(*case, target, args, tmp))
    head = f"{'model':30s} {'ORT ms':>8s} {'TVM ms':>8s} {'TVM/ORT':>8s} {'torch ms':>9s} {'torch/ORT':>9s} {'TVM eval ms':>11s} {'build s':>8s}"
    if args.default:
        head += f" {'default ms':>10s} {'default/ORT':>11s} {'build s':>8s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        m = r["med"]
        line = (f"{r['label']:30s} {m['ort']:8.4f} {m['tvm']:8.4f} {m['tvm'] / m['ort']:8.2f} {m['torch']:9.4f} "
                f"{m['torch'] / m['ort']:9.2f} {m['tvm-evaluator']:11.4f} {r['build']:8.1f}")
        if args.default:
            line += f" {m['tvm-default']:10.4f} {m['tvm-default'] / m['ort']:11.1f} {r['default_build']:8.1f}"
        print(line)
    print("ms: median per call from Python (perf_counter around one call), backends interleaved in rounds;")
    print("TVM eval: the same library timed by TVM's time_evaluator in the same rounds (one call per sample, "
          "no Python in the loop);")
    print("pruned = every prunable group kept at the fraction, rounded to multiples of 8" if args.plan is None
          else f"pruned = widths of {args.plan}")


if __name__ == "__main__":
    main()
