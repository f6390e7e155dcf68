"""How far one latency measurement strays on this machine: the same pair of models timed again and again.

bench_methods.py bisects Torch-Pruning to the latency ratio hwprune's row measured, so one stray
measurement moves a whole comparison (docs/benchmarks.md, "The equal-latency rows again"). This times
ResNet-20 at half width against the full one (onnxruntime, 1 thread, batch 1, 400 interleaved calls
each, as bench_methods.latency_ratio does), N times in one round and N/3 times in three rounds (the
middle one kept, as hwprune's measure_onnx_latency does), and prints the spread of each. Run it beside whatever load the benchmark ran with.

Reproduce: python benchmarks/bench_latency_noise.py [--n 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_methods as bm  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30, help="single measurements (the median-of-three column takes n/3)")
    ap.add_argument("--target", default="host-cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    x = torch.zeros(1, 1, 28, 28)
    dense = bm.build_model("resnet20", in_channels=1, num_classes=10, input_size=28).eval()
    thin = bm.build_model("resnet20", in_channels=1, num_classes=10, input_size=28, width=0.5).eval()
    print(f"ResNet-20 at half width: {bm.count_flops(thin, x) / bm.count_flops(dense, x):.3f} of the FLOPs")
    with tempfile.TemporaryDirectory() as d:
        columns = {
            "one measurement": [bm.latency_ratio(dense, thin, x, args.target, d, rounds=1)[1] for _ in range(args.n)],
            "median of three": [bm.latency_ratio(dense, thin, x, args.target, d, rounds=3)[1]
                                for _ in range(max(args.n // 3, 2))],
        }
    print("| ratio to dense | n | median | min | max | sd |\n|---|---|---|---|---|---|")
    for name, v in columns.items():
        print(f"| {name} | {len(v)} | {statistics.median(v):.3f} | {min(v):.3f} | {max(v):.3f} | {statistics.stdev(v):.3f} |")


if __name__ == "__main__":
    main()
