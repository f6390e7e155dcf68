"""Predicted against measured latency across latency budgets, on the target's profile.

Latency depends on the kept widths, not on the weights, so no training is needed to test the latency
model: for each speedup it projects the default model (small-resnet on digits, freshly initialised;
the unit norms decide which channels go) to the budget with the calibrated latency model, slices it,
exports ONNX, and times every pruned model and the dense one together (interleaved, one process).

    python benchmarks/bench_latency_model.py                          # profiles/host-cpu.json
    python benchmarks/bench_latency_model.py --profile my.json --speedups 2 4
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hwprune.budget import Budget, project  # noqa: E402
from hwprune.runtimes.onnxruntime import export_onnx  # noqa: E402
from hwprune.graph import discover_groups  # noqa: E402
from hwprune.graph.groups import UnitIndex  # noqa: E402
from hwprune.runtimes.onnxruntime import measure_onnx_latency  # noqa: E402
from hwprune.latency.budget import latency_model_for, min_width_keep  # noqa: E402
from hwprune.models import build_model  # noqa: E402
from hwprune.apply.slicing import slice_model  # noqa: E402
from hwprune.target import load_target  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="host-cpu")
    p.add_argument("--profile", default=None, help="default: the target's profile")
    p.add_argument("--model", default="small-resnet")
    p.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2, 3, 4, 6])
    p.add_argument("--repeats", type=int, default=400)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    target = load_target(args.target)
    torch.manual_seed(0)
    net = build_model(args.model, in_channels=1, num_classes=10, input_size=8).eval()
    x = torch.zeros(1, 1, 8, 8)
    groups = discover_groups(net, x, target=target)
    lm = latency_model_for(net, x, groups, target, runtime="onnxruntime", profile_path=args.profile,
                           repeats=args.repeats, progress=print)
    cal = lm.calibration
    print(f"calibration: dense {cal['dense_ms']:.4f} ms, narrowest {cal['min_ms']:.4f} ms -> scale {cal['scale']:.3f}, "
          f"overhead {cal['overhead_ms']:.4f} ms")
    scores = UnitIndex(net, groups).sq_norms().sqrt().double().numpy()
    predicted, paths, keeps = {}, {}, {}
    keep_min, vec_min = min_width_keep(groups)
    with tempfile.TemporaryDirectory() as tmp:
        paths["dense"] = str(export_onnx(net, x, Path(tmp) / "dense.onnx"))
        predicted["dense"], keeps["dense"] = lm(np.ones(lm.n_units)), np.ones(lm.n_units)
        for s in args.speedups:
            budget = Budget("speedup", s).as_latency(cal["dense_ms"])
            proj = project(groups, scores, budget, lm)
            name = f"speedup {s:g}"
            pruned = slice_model(copy.deepcopy(net), groups, proj.keep).eval()
            paths[name] = str(export_onnx(pruned, x, Path(tmp) / f"s{s}.onnx"))
            predicted[name], keeps[name] = proj.achieved, proj.keep_mask.astype(float)
        narrow = slice_model(copy.deepcopy(net), groups, keep_min).eval()
        paths["narrowest"] = str(export_onnx(narrow, x, Path(tmp) / "narrowest.onnx"))
        res = measure_onnx_latency(paths, target, repeats=args.repeats)
    # the same tables, anchored on dense and narrowest timed in this session with the pruned models
    now = lm.calibrated(res.stats["dense"].median_ms, res.stats["narrowest"].median_ms, vec_min)
    print(f"\n{'budget':12s} {'budget ms':>9s} | {'planned ms':>10s} {'measured':>9s} {'error':>7s} | "
          f"{'same-session ms':>15s} {'error':>7s}")
    for name in keeps:
        b = cal["dense_ms"] / float(name.split()[1]) if name != "dense" else cal["dense_ms"]
        m = res.stats[name].median_ms
        p_now = now(keeps[name])
        print(f"{name:12s} {b:9.4f} | {predicted[name]:10.4f} {m:9.4f} {100 * (m / predicted[name] - 1):+6.1f}% | "
              f"{p_now:15.4f} {100 * (m / p_now - 1):+6.1f}%")
    print("planned: the calibration measured before projecting (what chose the widths); same-session: the same "
          "tables anchored on dense and narrowest timed together with the pruned models")
    print(f"\nlatency: {res.runtime}; {res.measured_on}; median of {args.repeats} runs, models taking turns in blocks of 10 calls")


if __name__ == "__main__":
    main()
