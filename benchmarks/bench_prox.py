"""Time of the WGSEF prox solvers against the number of groups m.

Reproduce:
    python benchmarks/bench_prox.py                 # m = 1e3 … 4e6, float64 and float32, 1 thread
    python benchmarks/bench_prox.py --quick         # m ≤ 1e6
    python benchmarks/bench_prox.py --threads 4 --json prox.json

What is timed: ``wgsef_prox_norms`` (the sort solver: sampled bracket + breakpoint sweep),
``wgsef_prox_norms(..., narrow=False)`` (the plain sweep that sorts all 2m breakpoints; up to
``--full-sort-max`` groups) and ``wgsef_prox_norms_bisect`` (bisection on τ), on group norms — the
O(n) computation of the norms from the parameters and the rescaling are not included. Each entry is
the median of ``--repeats`` runs after one warm-up, all in this one process with
``torch.set_num_threads(--threads)``. The machine may be shared and noisy: compare columns within one
run, and read scaling from ns/group (flat = linear in m).

Data: group norms ``a = |N(0,1)|·LogNormal(0, 0.5)`` with 2% exact zeros, weights ``√|G|`` for group
sizes drawn from {9, 27, 64, 576, 1152} and normalised to mean square 1 (as hwprune's WGSEF
regularizer does), ``k = m/2``, prox parameter ``lam`` (= lr·λ in training).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hwprune.regularizers.wgsef_math import wgsef_prox_norms, wgsef_prox_norms_bisect  # noqa: E402

SIZES = [1_000, 10_000, 100_000, 1_000_000, 4_000_000]


def make_case(m: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, generator=g, dtype=torch.float64).abs()
    a *= torch.exp(0.5 * torch.randn(m, generator=g, dtype=torch.float64))
    a[torch.rand(m, generator=g, dtype=torch.float64) < 0.02] = 0.0
    sizes = torch.tensor([9.0, 27.0, 64.0, 576.0, 1152.0], dtype=torch.float64)
    d = sizes[torch.randint(0, 5, (m,), generator=g)]
    w = (d / d.mean()).sqrt()
    return a.to(dtype), w.to(dtype)


def median_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="stop at m = 1e6")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float64,float32", help="comma-separated: float64, float32")
    ap.add_argument("--lam", type=float, default=1e-2, help="prox parameter (lr·λ)")
    ap.add_argument("--keep", type=float, default=0.5, help="k as a fraction of m")
    ap.add_argument("--full-sort-max", type=int, default=1_000_000, help="largest m for the plain full sort")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    sizes = [m for m in SIZES if not (args.quick and m > 1_000_000)]
    dtypes = [getattr(torch, name.strip()) for name in args.dtype.split(",")]
    rows = []
    header = (f"{'dtype':8} {'m':>9} | {'sort ms':>9} {'ns/grp':>7} | {'bisect ms':>9} {'ns/grp':>7} | "
              f"{'bis/sort':>8} | {'full-sort ms':>12} {'ns/grp':>7} | {'zeros':>6} {'max|Δr|':>9}")
    print(f"WGSEF prox on group norms: torch {torch.__version__}, {args.threads} thread(s), lam={args.lam:g}, "
          f"k={args.keep:g}·m, median of {args.repeats}")
    print(header)
    print("-" * len(header))
    for dtype in dtypes:
        for m in sizes:
            a, w = make_case(m, dtype)
            k = max(1, int(args.keep * m))
            t_sort, r_sort = median_time(lambda: wgsef_prox_norms(a, w, k, args.lam), args.repeats)
            t_bis, r_bis = median_time(lambda: wgsef_prox_norms_bisect(a, w, k, args.lam), args.repeats)
            t_full = None
            if m <= args.full_sort_max:
                t_full, r_full = median_time(lambda: wgsef_prox_norms(a, w, k, args.lam, narrow=False),
                                             max(1, min(args.repeats, 3)))
                assert torch.equal(r_full, r_sort) or (r_full - r_sort).abs().max().item() < 1e-5 * a.max().item()
            row = {
                "dtype": str(dtype).replace("torch.", ""),
                "m": m,
                "k": k,
                "sort_ms": 1e3 * t_sort,
                "sort_ns_per_group": 1e9 * t_sort / m,
                "bisect_ms": 1e3 * t_bis,
                "bisect_ns_per_group": 1e9 * t_bis / m,
                "full_sort_ms": None if t_full is None else 1e3 * t_full,
                "full_sort_ns_per_group": None if t_full is None else 1e9 * t_full / m,
                "zero_fraction": float((r_sort == 0).double().mean()),
                "max_abs_diff_sort_bisect": float((r_sort.double() - r_bis.double()).abs().max()),
            }
            rows.append(row)
            if t_full is None:
                full = f"{'—':>12} {'—':>7}"
            else:
                full = f"{row['full_sort_ms']:12.2f} {row['full_sort_ns_per_group']:7.0f}"
            print(f"{row['dtype']:8} {m:9d} | {row['sort_ms']:9.2f} {row['sort_ns_per_group']:7.0f} | "
                  f"{row['bisect_ms']:9.2f} {row['bisect_ns_per_group']:7.0f} | {t_bis / t_sort:8.1f} | {full} | "
                  f"{row['zero_fraction']:6.3f} {row['max_abs_diff_sort_bisect']:9.1e}", flush=True)
        by_m = {r["m"]: r for r in rows if r["dtype"] == str(dtype).replace("torch.", "")}
        if 100_000 in by_m and sizes[-1] > 100_000:
            big = by_m[sizes[-1]]
            ratio = big["sort_ns_per_group"] / by_m[100_000]["sort_ns_per_group"]
            print(f"  {big['dtype']}: sort ns/group at m={sizes[-1]:.0e} ÷ at m=1e5 = {ratio:.2f} (1.0 = linear)")
    if args.json:
        meta = {
            "torch": torch.__version__,
            "threads": args.threads,
            "lam": args.lam,
            "keep": args.keep,
            "repeats": args.repeats,
            "machine": platform.machine(),
            "processor": platform.processor(),
            "python": platform.python_version(),
        }
        args.json.write_text(json.dumps({"config": meta, "rows": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
