"""Accuracy at a FLOPs budget: every hwprune method against Torch-Pruning, on real data, side by side.

Reproduce:
    apt-get install -y dataset-fashion-mnist          # the data (Debian package, offline)
    pip install --no-deps torch-pruning==1.6.1        # benchmark-only dependency
    python benchmarks/bench_methods.py --quick        # < 30 min on 2 cores: ResNet-20, 1 seed, small subset
    python benchmarks/bench_methods.py                # the full protocol (docs/benchmarks.md), days on 2 cores
    python benchmarks/bench_methods.py --models resnet20 --seeds 0,1,2 --train-subset 1500 --test-subset 2000 \
        --epochs 10 3 2 --json out.json               # three seeds of ResNet-20, 43 min (docs/benchmarks.md)
    python benchmarks/bench_methods.py --summarize benchmarks/results/methods-resnet20-3seeds.json

Protocol (the same for every method, in one process):
1. per (model, seed): train the dense model for D epochs on a fixed training subset of Fashion-MNIST;
2. per budget (keep 50% / 25% of the FLOPs) and method, start from a copy of that dense model and
   spend the same R + F epochs: hwprune methods regularize for R epochs and fine-tune F (one-shot
   methods fine-tune R + F; ``uniform`` trains the thin model from scratch for D + R + F);
   Torch-Pruning's BN-scale and group-norm pruners do sparse learning (their ``regularize``) for R
   epochs, then prune progressively (global, round_to = the target's multiple) until the FLOPs target,
   then fine-tune F; its magnitude pruner prunes the dense model and fine-tunes R + F;
3. measure on the full 10k test set: top-1, achieved FLOPs and params (hwprune's counter for all),
   onnxruntime latency of the pruned model against the dense one (interleaved, same process),
   accuracy right after pruning ("shock"), wall time.
Several seeds give mean ± std. Same optimizer (SGD momentum 0.9, cosine, lr 0.05, wd 5e-4, batch 64).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hwprune  # noqa: E402
from hwprune.budget import Budget  # noqa: E402
from hwprune.cost import count_flops, count_params  # noqa: E402
from hwprune.data import load_dataset  # noqa: E402
from hwprune.export.onnx import export_onnx  # noqa: E402
from hwprune.latency import measure_onnx_latency  # noqa: E402
from hwprune.models import build_model  # noqa: E402
from hwprune.pipeline import FitConfig  # noqa: E402
from hwprune.target import load_target  # noqa: E402
from hwprune.train import (TrainSettings, cosine_lr, epoch_loader, eval_loader, evaluate, make_optimizer,  # noqa: E402
                           train_epoch)

OURS = ["wgsef", "polarization", "autoprune", "ista-bn", "slimming", "group-lasso", "deephoyer", "magnitude",
        "magnitude-mean", "uniform"]
# Rows that are one hwprune method with options: name -> (method, --method-option values)
VARIANTS = {"magnitude-mean": ("magnitude", {"normalize": "mean"})}
TP = ["tp-group-norm", "tp-bn-scale", "tp-magnitude"]


def subset(ds, n, seed):
    if n is None or n >= len(ds):
        return ds
    idx = np.random.default_rng(seed).permutation(len(ds))[:n]
    return Subset(ds, idx.tolist())


def train_dense(model, train, settings, epochs, seed):
    opt = make_optimizer(model, settings)
    steps = -(-len(train) // settings.batch_size)
    for e in range(epochs):
        train_epoch(model, epoch_loader(train, settings, seed, "bench-dense", e), opt,
                    lr_at=lambda s: cosine_lr(settings.lr, s, epochs * steps), step0=e * steps)
    return model


def run_ours(method, dense, train, test, budget, args, seed, out_dir):
    d, r, f = args.epochs
    # The dense model is shared (epochs_dense=0: keep its weights). A from-scratch method trains for
    # all stages' epochs (FitConfig sums them), so uniform gets D + R + F through its fine-tune share.
    method, options = VARIANTS.get(method, (method, {}))
    cfg = FitConfig(budget=budget, method=method, method_options=options, epochs_dense=0, epochs_regularize=r,
                    epochs_finetune=f + (d if method == "uniform" else 0), seed=seed, train=TrainSettings())
    res = hwprune.fit(copy.deepcopy(dense), train, test_data=test, target=args.target, config=cfg, out_dir=out_dir,
                      progress=None, measure=False, run_info={"model": "bench"})
    return res.model, res.report.get("accuracy.after_projection")


def run_tp(kind, dense, train, test, flops_keep, args, seed, x):
    import torch_pruning as tp

    model = copy.deepcopy(dense)
    settings = TrainSettings()
    ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]  # the classifier
    multiple = load_target(args.target).multiple_for("conv")
    if kind == "tp-group-norm":
        imp, cls, kw = tp.importance.GroupMagnitudeImportance(p=2), tp.pruner.GroupNormPruner, {}
    elif kind == "tp-bn-scale":
        imp, cls, kw = tp.importance.BNScaleImportance(), tp.pruner.BNScalePruner, {}
    else:
        imp, cls, kw = tp.importance.MagnitudeImportance(p=2), tp.pruner.MagnitudePruner, {}
    pruner = cls(model, x, importance=imp, pruning_ratio=1.0, max_pruning_ratio=0.95, iterative_steps=400,
                 global_pruning=True, ignored_layers=ignored, round_to=multiple if multiple > 1 else None, **kw)
    steps = -(-len(train) // settings.batch_size)
    sparse_epochs = args.epochs[1] if kind != "tp-magnitude" else 0
    if sparse_epochs:  # sparse learning with the pruner's own regularizer
        opt = make_optimizer(model, settings)
        for e in range(sparse_epochs):
            model.train()
            for xb, yb in epoch_loader(train, settings, seed, "bench-tp-sl", e):
                lr = cosine_lr(settings.lr * 0.4, e * steps, sparse_epochs * steps)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                pruner.regularize(model)
                opt.step()
    base = count_flops(dense, x)
    model.eval()
    while count_flops(model, x) > flops_keep * base and pruner.current_step < pruner.iterative_steps:
        pruner.step()
    shock = evaluate(model, eval_loader(test))[0]
    ft = args.epochs[2] + (args.epochs[1] if kind == "tp-magnitude" else 0)
    opt = make_optimizer(model, settings)
    for e in range(ft):
        train_epoch(model, epoch_loader(train, settings, seed, "bench-tp-ft", e), opt,
                    lr_at=lambda s: cosine_lr(settings.lr * 0.4, s, ft * steps), step0=e * steps)
    return model, shock


def latency_ratio(dense, pruned, x, target, workdir):
    d = export_onnx(dense.eval(), x, Path(workdir) / "dense.onnx")
    p = export_onnx(pruned.eval(), x, Path(workdir) / "pruned.onnx")
    r = measure_onnx_latency({"dense": str(d), "pruned": str(p)}, load_target(target), repeats=100, warmup=10)
    return r.stats["pruned"].median_ms, r.stats["pruned"].median_ms / r.stats["dense"].median_ms


FIELDS = ("acc", "flops", "params", "lat", "ratio", "shock", "secs")  # one list per row, a value per seed


def record(rows: dict[tuple, dict[str, list]], key: tuple, **values) -> None:
    """Append one seed's ``values`` to the row ``key`` (a field not given stays shorter: not measured)."""
    row = rows.setdefault(key, {f: [] for f in FIELDS})
    for field, value in values.items():
        row[field].append(value)


def fmt(values, pct=False, digits=2):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    k = 100 if pct else 1
    m = statistics.mean(values) * k
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) * k:.{digits}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-20, 1 seed, 1.5k train / 1k test subsets, epochs 3 3 2")
    ap.add_argument("--models", default="resnet20,vgg16-bn")
    ap.add_argument("--budgets", default="0.5,0.25", help="fractions of FLOPs to keep")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(OURS + TP))
    ap.add_argument("--train-subset", type=int, default=12000)
    ap.add_argument("--test-subset", type=int, default=None)
    ap.add_argument("--epochs", type=int, nargs=3, default=[10, 8, 6], metavar=("DENSE", "REG", "FT"))
    ap.add_argument("--target", default="host-cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-dense-reference", dest="dense_reference", action="store_false",
                    help="skip the dense model trained for all D + R + F epochs (the equal-budget reference)")
    ap.add_argument("--summarize", type=Path, default=None, metavar="JSON",
                    help="print the tables of an earlier run's --json file and exit")
    args = ap.parse_args(argv)
    if args.summarize:
        return summarize(args.summarize)
    if args.quick:
        args.models, args.seeds, args.train_subset, args.epochs = "resnet20", "0", 1500, [3, 3, 2]
        args.test_subset = args.test_subset or 1000
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    if any(m in TP for m in methods):
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            sys.exit("torch-pruning is not installed: pip install --no-deps torch-pruning==1.6.1")
    data = load_dataset("fashion-mnist")
    test = subset(data.test, args.test_subset, 1234)
    rows: dict[tuple, dict[str, list]] = {}
    t_all = time.perf_counter()
    for model_name in args.models.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            train = subset(data.train, args.train_subset, seed)
            torch.manual_seed(seed)
            dense = build_model(model_name, in_channels=1, num_classes=10, input_size=28)
            t0 = time.perf_counter()
            train_dense(dense, train, TrainSettings(), args.epochs[0], seed)
            acc_dense = evaluate(dense, eval_loader(test))[0]
            x = torch.zeros(1, 1, 28, 28)
            record(rows, (model_name, "dense", 1.0), acc=acc_dense, flops=1.0, params=count_params(dense),
                   secs=time.perf_counter() - t0)
            print(f"[{model_name} seed {seed}] dense {100 * acc_dense:.2f}% ({time.perf_counter() - t0:.0f}s)", flush=True)
            if args.dense_reference:
                # What no pruning reaches with every method's epoch budget: the dense model trained from
                # scratch for D + R + F (uniform at width 1). Without it, "pruned beats dense" can be just
                # more training.
                t0 = time.perf_counter()
                torch.manual_seed(seed)
                ref = build_model(model_name, in_channels=1, num_classes=10, input_size=28)
                train_dense(ref, train, TrainSettings(), sum(args.epochs), seed)
                acc_ref = evaluate(ref, eval_loader(test))[0]
                record(rows, (model_name, "dense-same-epochs", 1.0), acc=acc_ref, flops=1.0, params=count_params(ref),
                       secs=time.perf_counter() - t0)
                print(f"[{model_name} seed {seed}] dense, {sum(args.epochs)} epochs {100 * acc_ref:.2f}%", flush=True)
            for keep in [float(b) for b in args.budgets.split(",")]:
                for method in methods:
                    t0 = time.perf_counter()
                    with tempfile.TemporaryDirectory() as tmp:
                        if method in TP:
                            pruned, shock = run_tp(method, dense, train, test, keep, args, seed, x)
                        else:
                            pruned, shock = run_ours(method, dense, train, test, Budget("flops", keep), args, seed, Path(tmp) / "run")
                        secs = time.perf_counter() - t0
                        acc = evaluate(pruned, eval_loader(test))[0]
                        lat, ratio = latency_ratio(dense, pruned, x, args.target, tmp)
                    flops = count_flops(pruned, x) / count_flops(dense, x)
                    record(rows, (model_name, method, keep), acc=acc, flops=flops, params=count_params(pruned), lat=lat,
                           ratio=ratio, shock=shock, secs=secs)
                    print(f"[{model_name} seed {seed} keep {keep}] {method:14s} acc {100 * acc:.2f}%  flops "
                          f"{flops:.3f}  latency {ratio:.3f}x  shock {100 * (shock or 0):.1f}%  ({secs:.0f}s)", flush=True)
    print(f"\ntotal {time.perf_counter() - t_all:.0f}s; seeds {args.seeds}; train subset {args.train_subset}; "
          f"epochs {args.epochs}; test {len(test)} images\n")
    if args.json:
        args.json.write_text(json.dumps([{"model": k[0], "method": k[1], "keep": k[2], **v} for k, v in rows.items()], indent=1))
    print_tables(rows)
    return 0


def print_tables(rows: dict[tuple, dict[str, list]]) -> None:
    """The per-method table (mean ± std over seeds), then hwprune's best against Torch-Pruning's best
    at each budget as paired differences: every seed shares one dense model and one data subset, so the
    per-seed difference removes the variance they share."""
    head = "| model | FLOPs kept (asked) | method | top-1 (%) | FLOPs kept | params | ORT latency vs dense | acc. right after pruning (%) | wall s |"
    print(head)
    print("|" + "---|" * 9)
    for (model_name, method, keep), r in rows.items():
        print(f"| {model_name} | {keep:g} | {method} | {fmt(r['acc'], True)} | {fmt(r['flops'], digits=3)} | "
              f"{fmt(r['params'], digits=0)} | {fmt(r['ratio'], digits=3)} | {fmt(r['shock'], True, 1)} | {fmt(r['secs'], digits=0)} |")
    print("\n| model | FLOPs kept | hwprune's best | its best pruning method (not uniform) | Torch-Pruning's best | best − TP best (pts, paired) | that method − TP best |")
    print("|" + "---|" * 7)
    for model_name, keep in sorted({(k[0], k[2]) for k in rows if k[2] < 1}, key=lambda mk: (mk[0], -mk[1])):
        acc = {k[1]: r["acc"] for k, r in rows.items() if k[0] == model_name and k[2] == keep}

        def best(names):
            return max(names, key=lambda m: statistics.mean(acc[m])) if names else None

        ours, reg, tp = (best([m for m in acc if m in OURS]), best([m for m in acc if m in OURS and m != "uniform"]),
                         best([m for m in acc if m in TP]))
        if ours is None or tp is None:
            continue

        def paired(a):
            return fmt([x - y for x, y in zip(acc[a], acc[tp])], True) if a else "–"

        print(f"| {model_name} | {keep:g} | {ours} {fmt(acc[ours], True)} | {reg} {fmt(acc[reg], True) if reg else '–'} | "
              f"{tp} {fmt(acc[tp], True)} | {paired(ours)} | {paired(reg)} |")


def summarize(path: Path) -> int:
    """Print the tables again from a ``--json`` file, without training anything."""
    rows = {(r["model"], r["method"], r["keep"]): {k: v for k, v in r.items() if k not in ("model", "method", "keep")}
            for r in json.loads(path.read_text())}
    print_tables(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
