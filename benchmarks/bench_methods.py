"""Accuracy at the same cost: hwprune's methods x allocations against Torch-Pruning, on real data.

Two regimes (docs/benchmarks.md, "Methods against Torch-Pruning"):

* ``pretrained`` (a): the user has a trained model. The dense model is trained to convergence once per
  (model, seed) and cached; every row then gets the same short budget, 20% of the dense epochs
  (regularize + fine-tune halves for training methods, all fine-tune for one-shot ones). ``uniform``
  (a thin model from scratch) gets the dense epochs plus that budget.
* ``equal-epochs`` (b): dense D epochs, then R + F for every method; ``uniform`` trains from scratch
  for D + R + F. The thin model from scratch is the bar.

Rows: ``METHOD@ALLOCATION`` (hwprune, ``+kd`` to fine-tune with the dense model as teacher, ``+rewind``
to fine-tune at the full learning rate, ``+lowlr`` to regularize at the fine-tune's, ``+early`` in the
equal-epochs regime to prune after a fifth of the total epochs and train the pruned model for the rest;
fine-tune settings: ``+swa[F]`` averages the weights over the last F of the fine-tune (0.5 by default),
``+T<t>`` distills at temperature t, ``+ftlr<s>`` fine-tunes at s times the learning rate),
``uniform`` (from scratch), ``tp-magnitude``, ``tp-magnitude-local``, ``tp-bn-scale``,
``tp-group-norm`` (Torch-Pruning 1.6.1: global ranking, or per-layer for ``-local``; its own sparse
learning for bn-scale / group-norm, then pruning to the FLOPs, then fine-tuning). Budgets:
``flops:F`` (keep F of the FLOPs) and ``speedup:S`` (measured latency: hwprune's ``--speedup S``
through the target's profile; Torch-Pruning pruned to the FLOPs ratio whose measured onnxruntime
latency matches what hwprune's first row of that seed measured, found by bisection; every latency ratio
is the middle of three rounds of 400 interleaved calls each).

Every finished row is appended to a JSON-lines file at once, and a run skips the rows it finds there:
stop it any time and run the same command again to continue.

Reproduce:
    apt-get install -y dataset-fashion-mnist          # the data (Debian package, offline)
    pip install --no-deps torch-pruning==1.6.1        # benchmark-only dependency
    python benchmarks/bench_methods.py --regime pretrained --models resnet20 --seeds 0,1,2 \\
        --results benchmarks/results/methods-pretrained.jsonl
    python benchmarks/bench_methods.py --regime equal-epochs --models resnet20 --seeds 0,1,2 \\
        --results benchmarks/results/methods-equal-epochs.jsonl
    python benchmarks/bench_methods.py --summarize benchmarks/results/methods-pretrained.jsonl
    python benchmarks/bench_methods.py --summarize A.jsonl B.jsonl   # two machines' runs pooled, pairs kept per file
    python benchmarks/bench_methods.py --quick        # a first look: seed 0, 25% of the FLOPs, 4 rows
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hwprune  # noqa: E402
from hwprune.budget import Budget  # noqa: E402
from hwprune.budget.cost import count_flops, count_params  # noqa: E402
from hwprune.data import load_dataset  # noqa: E402
from hwprune.errors import DataError  # noqa: E402
from hwprune.runtimes.onnxruntime import export_onnx  # noqa: E402
from hwprune.runtimes.onnxruntime import measure_onnx_latency  # noqa: E402
from hwprune.models import build_model  # noqa: E402
from hwprune.training.pipeline import FitConfig  # noqa: E402
from hwprune.target import load_target  # noqa: E402
from hwprune.training.loop import (TrainSettings, cosine_lr, epoch_loader, eval_loader, evaluate, make_optimizer,  # noqa: E402
                           train_epoch)

HERE = Path(__file__).resolve().parent
TP = ["tp-magnitude", "tp-magnitude-local", "tp-bn-scale", "tp-group-norm"]
# In the order they run: what decides the comparison first, every other method after.
ROWS = ["gradual@global+kd", "gradual+kd", "gradual@global+early+rewind", "magnitude@global+early+rewind", "magnitude@global+kd", "magnitude@uniform+kd", "magnitude@global", "tp-magnitude", "tp-magnitude-local",
        "wgsef@global+kd", "magnitude@sensitivity+kd", "magnitude@learned+kd", "tp-bn-scale", "tp-group-norm",
        "uniform", "wgsef@learned+kd", "group-lasso@global+kd", "slimming@global+kd", "polarization@global+kd",
        "autoprune@global+kd", "ista-bn@global+kd", "deephoyer@global+kd"]
VARIANTS = {"magnitude-mean": ("magnitude", {"normalize": "mean"}),  # a row name -> (method, --method-option)
            "gradual-quarter": ("gradual", {"end": 0.25})}
KD_ALPHA, KD_T = 0.7, 4.0


def _is_tp_name(name: str) -> bool:
    """Whether a saved row is Torch-Pruning's, read without :class:`Row`'s check of the flags: results files
    keep rows of flags since retired (``+kdreg``, docs/benchmarks.md), which must still summarize."""
    return name.split("@")[0].split("+")[0] in TP


def _is_number(text: str) -> bool:
    return text.replace(".", "", 1).isdigit()


@dataclass(frozen=True)
class Row:
    """A row name parsed: ``METHOD[@ALLOCATION][+kd]`` for hwprune, or a Torch-Pruning pruner."""

    name: str

    def __post_init__(self):
        # a misspelt or retired flag must not run as the default row under another name
        known = ("kd", "rewind", "lowlr", "early", "mix", "shift", "flip", "swa", "T", "ftlr")
        for f in self.flags:
            rest = next((f[len(k):] for k in known if f.startswith(k)), None)
            if rest is None or (rest and not _is_number(rest)):
                raise SystemExit(f"row {self.name}: unknown flag +{f}; expected +kd[A], +rewind, +lowlr, +early, "
                                 "+mix[A], +shift[N], +flip, +swa[F], +T<temperature> or +ftlr<scale>")

    @property
    def is_tp(self) -> bool:
        return self.method in TP

    @property
    def method(self) -> str:
        """hwprune's method, or the Torch-Pruning pruner (``tp-...``)."""
        return self.name.split("@")[0].split("+")[0]

    @property
    def allocation(self) -> str | None:
        return self.name.split("@")[1].split("+")[0] if "@" in self.name else None

    @property
    def flags(self) -> set[str]:
        return set(self.name.split("+")[1:])

    @property
    def distill(self) -> bool:
        return self.kd_weight > 0

    def _after(self, prefix: str) -> str | None:
        """What follows ``prefix`` in the flag that starts with it ("" for the bare flag), None without one."""
        return next((f[len(prefix):] for f in self.flags if f.startswith(prefix)), None)

    @property
    def kd_weight(self) -> float:
        """``+kd``: distill at the benchmark's weight (KD_ALPHA); ``+kdA``: at weight A."""
        rest = self._after("kd")
        return 0.0 if rest is None else float(rest or KD_ALPHA)

    @property
    def regularize_lr_scale(self) -> float | None:
        """``+lowlr``: the regularized stage at the fine-tune's learning rate (FitConfig's 0.4 of the
        training rate) instead of the full one: a trained model is not thrown back to the start of training."""
        return FitConfig.finetune_lr_scale if "lowlr" in self.flags else None

    @property
    def mixup(self) -> float:
        """``+mix`` / ``+mixA``: distill on mixed images, lam ~ Beta(A, A) (A = 1 for ``+mix``;
        ``FitConfig.distill_mixup``). A Torch-Pruning row with ``+kd+mix`` is fine-tuned the same way."""
        rest = self._after("mix")
        return 0.0 if rest is None else float(rest or 1.0)

    @property
    def shift(self) -> int:
        """``+shiftN``: distill on images moved by up to N pixels (``FitConfig.distill_shift``)."""
        rest = self._after("shift")
        return 0 if rest is None else int(rest or 2)

    @property
    def flip(self) -> bool:
        """``+flip``: distill on images mirrored left-right half of the time (``FitConfig.distill_flip``)."""
        return "flip" in self.flags

    @property
    def average(self) -> float:
        """``+swa`` / ``+swaF``: average the weights over the last F of the fine-tune's steps (F = 0.5 for
        ``+swa``; ``FitConfig.finetune_average``)."""
        rest = self._after("swa")
        return 0.0 if rest is None else float(rest or 0.5)

    @property
    def temperature(self) -> float:
        """``+T<t>``: distill at temperature t instead of the benchmark's KD_T."""
        rest = self._after("T")
        return KD_T if not rest else float(rest)

    @property
    def early(self) -> bool:
        """``+early`` (equal-epochs regime): prune early and train the pruned model for the rest (You et al.
        2020, "Drawing early-bird tickets"): the dense model trains a fifth of the total epochs, not D."""
        return "early" in self.flags

    @property
    def finetune_lr_scale(self) -> float | None:
        """``+rewind``: fine-tune at the full training learning rate (learning-rate rewinding, Renda et
        al. 2020) instead of FitConfig's default scale."""
        rest = self._after("ftlr")
        if rest:
            return float(rest)
        return 1.0 if "rewind" in self.flags else None


def subset(ds, n, seed):
    if n is None or n >= len(ds):
        return ds
    idx = np.random.default_rng(seed).permutation(len(ds))[:n]
    return Subset(ds, idx.tolist())


def holdout_of(train, args):
    """``--test-subset`` training images that the training subsets of seeds 0-9 never hold (a subset is
    the first ``--train-subset`` of a per-seed permutation, see :func:`subset`)."""
    used = set()
    for seed in range(10):
        used.update(np.random.default_rng(seed).permutation(len(train))[:args.train_subset].tolist())
    free = [i for i in np.random.default_rng(4321).permutation(len(train)).tolist() if i not in used]
    return Subset(train, free[:args.test_subset])


def train_dense(model, train, settings, epochs, seed, stage="bench-dense"):
    opt = make_optimizer(model, settings)
    steps = -(-len(train) // settings.batch_size)
    for e in range(epochs):
        train_epoch(model, epoch_loader(train, settings, seed, stage, e), opt,
                    lr_at=lambda s: cosine_lr(settings.lr, s, epochs * steps), step0=e * steps)
    return model


def dense_model(model_name, train, test, epochs, seed, train_size, cache: Path):
    """The dense model of (model, seed), trained once and cached (``cache``/...pt)."""
    path = cache / f"{model_name}-seed{seed}-train{train_size}-epochs{epochs}.pt"
    torch.manual_seed(seed)
    model = build_model(model_name, in_channels=1, num_classes=10, input_size=28)
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        model.load_state_dict(saved["state_dict"])
        return model, saved["accuracy"], saved["seconds"]
    t0 = time.perf_counter()
    train_dense(model, train, TrainSettings(), epochs, seed)
    acc = evaluate(model, eval_loader(test))[0]
    secs = time.perf_counter() - t0
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "accuracy": acc, "seconds": secs}, tmp)
    os.replace(tmp, path)
    return model, acc, secs


def epochs_of(args):
    """(regularize, fine-tune, dense-for-from-scratch) epochs every row gets in this regime."""
    if args.regime == "pretrained":
        short = max(2, round(0.2 * args.dense_epochs))
        return short // 2, short - short // 2, args.dense_epochs
    d, r, f = args.epochs
    return r, f, d


def early_epochs(args) -> int:
    """Dense epochs of an ``+early`` row: a fifth of the regime's total (3 of 15)."""
    return max(1, round(0.2 * sum(args.epochs)))


def run_ours(row: Row, dense, train, test, budget, args, seed, out_dir):
    r, f, d = epochs_of(args)
    if row.early:  # the same total: D + R + F = early + R + (the rest)
        f = sum(args.epochs) - early_epochs(args) - r
    method, options = VARIANTS.get(row.method, (row.method, {}))
    from_scratch = method == "uniform"
    cfg = FitConfig(budget=budget, method=method, method_options=options, epochs_dense=0, epochs_regularize=r,
                    epochs_finetune=f + (d if from_scratch else 0), seed=seed, train=TrainSettings(),
                    allocation=row.allocation, distill=row.kd_weight, distill_temperature=row.temperature,
                    finetune_average=row.average,
                    distill_mixup=row.mixup, distill_shift=row.shift, distill_flip=row.flip,
                    profile=args.profile)
    if row.finetune_lr_scale is not None:
        cfg.finetune_lr_scale = row.finetune_lr_scale
    if row.regularize_lr_scale is not None:
        cfg.regularize_lr_scale = row.regularize_lr_scale
    res = hwprune.fit(copy.deepcopy(dense), train, test_data=test, target=args.target, config=cfg, out_dir=out_dir,
                      progress=None, measure=False, run_info={"model": "bench"})
    proj = res.report.get("projection") or {}
    return res.model, res.report.get("accuracy.after_projection"), proj.get("allocation"), proj.get("status")


def tp_prune(kind, dense, train, flops_keep, args, seed, x):
    """Torch-Pruning's pruner of ``kind`` (with its sparse learning where it has one) pruned to
    ``flops_keep`` of the dense FLOPs. Returns the pruned model (not fine-tuned)."""
    import torch_pruning as tp

    model = copy.deepcopy(dense)
    settings = TrainSettings()
    ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]  # the classifier
    multiple = load_target(args.target).multiple_for("conv")
    if kind == "tp-group-norm":
        imp, cls = tp.importance.GroupMagnitudeImportance(p=2), tp.pruner.GroupNormPruner
    elif kind == "tp-bn-scale":
        imp, cls = tp.importance.BNScaleImportance(), tp.pruner.BNScalePruner
    else:
        imp, cls = tp.importance.MagnitudeImportance(p=2), tp.pruner.MagnitudePruner
    pruner = cls(model, x, importance=imp, pruning_ratio=1.0, max_pruning_ratio=0.95, iterative_steps=400,
                 global_pruning=kind != "tp-magnitude-local", ignored_layers=ignored,
                 round_to=multiple if multiple > 1 else None)
    r, _, _ = epochs_of(args)
    sparse_epochs = r if kind in ("tp-bn-scale", "tp-group-norm") else 0
    steps = -(-len(train) // settings.batch_size)
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
    return model


def tp_finetune(row: Row, model, dense, train, args, seed):
    """Plain cross-entropy fine-tuning, as a Torch-Pruning user writes it; ``+kd`` (and ``+mix``) rows get
    hwprune's fine-tune loss instead (the dense model as teacher), to separate the cut from the recipe."""
    from hwprune.tasks.classification import Distillation

    r, f, _ = epochs_of(args)
    settings = TrainSettings()
    steps = -(-len(train) // settings.batch_size)
    ft = f + (0 if row.method in ("tp-bn-scale", "tp-group-norm") else r)  # one-shot pruners fine-tune R + F
    opt = make_optimizer(model, settings)
    kd = (Distillation(copy.deepcopy(dense).eval(), row.kd_weight, row.temperature, mixup=row.mixup,
                       shift=row.shift, flip=row.flip) if row.distill else None)
    for e in range(ft):
        if kd is not None and kd.changes_inputs:
            kd.reseed(seed, e)
        train_epoch(model, epoch_loader(train, settings, seed, "bench-tp-ft", e), opt,
                    lr_at=lambda s: cosine_lr(settings.lr * 0.4, s, ft * steps), step0=e * steps,
                    loss_fn=kd.loss if kd else None, batch_fn=kd.view if kd and kd.changes_inputs else None)
    return model


def latency_ratio(dense, pruned, x, target, workdir, repeats=400, rounds=3):
    """(pruned ms, pruned / dense): onnxruntime, the two models taking turns for ``repeats`` timed calls
    each in every one of ``rounds`` rounds, the round with the median ratio kept (hwprune's own
    ``measure_onnx_latency`` rounds). One round is not enough on the shared 2-core machine: a ResNet-20
    at 29% of the FLOPs once measured 0.458x the dense latency where others with its FLOPs measure
    0.60-0.64x, and Torch-Pruning is bisected to the ratio hwprune's row measured (docs/benchmarks.md,
    "The equal-latency rows again")."""
    d = export_onnx(dense.eval(), x, Path(workdir) / "dense.onnx")
    p = export_onnx(pruned.eval(), x, Path(workdir) / "pruned.onnx")
    r = measure_onnx_latency({"dense": str(d), "pruned": str(p)}, load_target(target), repeats=repeats * rounds,
                             warmup=20, rounds=rounds)
    return r.stats["pruned"].median_ms, r.stats["pruned"].median_ms / r.stats["dense"].median_ms


def tp_at_latency(kind, dense, train, goal, args, seed, x, workdir):
    """Bisection on the FLOPs ratio until Torch-Pruning's model runs at ``goal`` x the dense latency
    (measured, within 3%), at most 7 prunings; the closest one is kept."""
    lo, hi, best = 0.05, 1.0, None
    for _ in range(7):
        mid = 0.5 * (lo + hi)
        model = tp_prune(kind, dense, train, mid, args, seed, x)
        _, ratio = latency_ratio(dense, model, x, args.target, workdir)
        if best is None or abs(ratio - goal) < abs(best[1] - goal):
            best = (model, ratio)
        if abs(ratio / goal - 1) <= 0.03:
            break
        lo, hi = (mid, hi) if ratio < goal else (lo, mid)
    return best[0]


def latency_goal(results: Path, key: dict, speedup: float) -> float:
    """What Torch-Pruning must match at a speedup budget: the measured latency ratio of the first
    hwprune row of this (model, seed, budget) in the results (hwprune's latency model plans against a
    prediction, so its measured speed-up differs from the one asked), else 1/speedup."""
    if results.is_file():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            if all(r.get(k) == key[k] for k in ("regime", "model", "seed", "budget")) and r["row"] != "dense" and not _is_tp_name(r["row"]):
                return float(r["ratio"])
    return 1.0 / speedup


def parse_budget(text: str) -> tuple[str, float]:
    kind, value = text.split(":")
    if kind not in ("flops", "speedup"):
        raise SystemExit(f"--budgets {text}: expected flops:F or speedup:S")
    return kind, float(value)


def done_keys(path: Path) -> set[tuple]:
    if not path.is_file():
        return set()
    return {key_of(json.loads(line)) for line in path.read_text().splitlines() if line.strip()}


def key_of(r: dict) -> tuple:
    return r["regime"], r["model"], r["seed"], r["budget"], r["row"]


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--regime", choices=["pretrained", "equal-epochs"], default="pretrained")
    ap.add_argument("--models", default="resnet20")
    ap.add_argument("--budgets", default="flops:0.5,flops:0.25,speedup:2")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rows", default=",".join(ROWS), help="row names in the order to run (see the module docstring)")
    ap.add_argument("--train-subset", type=int, default=1500)
    ap.add_argument("--test-subset", type=int, default=2000)
    ap.add_argument("--holdout", action="store_true",
                    help="score rows on held-out *training* images (never in any row's training subset) instead of the "
                         "test set: for choosing settings without looking at the test set")
    ap.add_argument("--dense-epochs", type=int, default=40, help="pretrained regime: epochs of the cached dense model")
    ap.add_argument("--epochs", type=int, nargs=3, default=[10, 3, 2], metavar=("DENSE", "REG", "FT"),
                    help="equal-epochs regime")
    ap.add_argument("--target", default="host-cpu")
    ap.add_argument("--profile", default=None,
                    help="latency profile of a speedup budget (default: the target's; a model the target's profile "
                         "does not cover needs its own: hwprune profile --target host-cpu --model vgg16-bn "
                         "--data fashion-mnist --out FILE)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", type=Path, default=None, help="JSON-lines file: rows are appended, done rows skipped")
    ap.add_argument("--cache", type=Path, default=HERE / "cache", help="where trained dense models are kept")
    ap.add_argument("--summarize", type=Path, nargs="+", default=None, metavar="JSONL",
                    help="print the tables of a results file; several files (runs on different machines, whose "
                         "dense models differ) are pooled with each file's seeds kept apart: seed a0 is seed 0 of the first")
    ap.add_argument("--quick", action="store_true",
                    help="a first look (5 minutes on one core of the 2-core machine): seed 0, 25%% of the FLOPs, dense 10 epochs, "
                         "hwprune's default and one-shot rows against Torch-Pruning's two magnitude pruners")
    args = ap.parse_args(argv)
    if args.summarize:
        return summarize(args.summarize)
    if args.quick:
        args.seeds, args.budgets, args.dense_epochs = "0", "flops:0.25", 10
        args.rows = "gradual@global+kd,magnitude@global+kd,tp-magnitude,tp-magnitude-local"
        args.results = args.results or HERE / "results" / "methods-quick.jsonl"
    torch.set_num_threads(args.threads)
    rows = [Row(r) for r in args.rows.split(",") if r]
    if any(r.is_tp for r in rows):
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            sys.exit("torch-pruning is not installed: pip install --no-deps torch-pruning==1.6.1")
    results = args.results or HERE / "results" / f"methods-{args.regime}{'-holdout' if args.holdout else ''}.jsonl"
    done = done_keys(results)
    try:
        data = load_dataset("fashion-mnist")
    except DataError as err:  # no traceback for a missing dataset: the message says what to install
        sys.exit(f"bench_methods: {err}")
    test = (holdout_of(data.train, args) if args.holdout else subset(data.test, args.test_subset, 1234))
    # the accuracy right after the cut (and hwprune's per-epoch log) on a slice of it: evaluating 10,000 images
    # after every epoch would add a third to a row's time
    probe = Subset(test, list(range(min(len(test), 2000))))
    x = torch.zeros(1, 1, 28, 28)
    budgets = [parse_budget(b) for b in args.budgets.split(",") if b]
    common = {"regime": args.regime, "train_subset": args.train_subset, "test_subset": len(test),
              **({"eval": "holdout"} if args.holdout else {}),
              "epochs": list(epochs_of(args)), "threads": args.threads}
    for model_name in args.models.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            train = subset(data.train, args.train_subset, seed)
            dense_epochs = args.dense_epochs if args.regime == "pretrained" else args.epochs[0]
            dense, acc_dense, secs = dense_model(model_name, train, test, dense_epochs, seed, args.train_subset, args.cache)
            acc_dense = evaluate(dense, eval_loader(test))[0]  # the cache's was measured on its first run's test set
            key = dict(common, model=model_name, seed=seed, budget="dense", row="dense")
            if key_of(key) not in done:
                append_row(results, dict(key, acc=acc_dense, flops=1.0, params=count_params(dense), secs=secs))
            print(f"[{model_name} seed {seed}] dense {100 * acc_dense:.2f}% ({dense_epochs} epochs)", flush=True)
            for kind, value in budgets:
                budget_name = f"{kind}:{value:g}"
                for row in rows:
                    key = dict(common, model=model_name, seed=seed, budget=budget_name, row=row.name)
                    if key_of(key) in done:
                        continue
                    t0 = time.perf_counter()
                    extra = {}
                    with tempfile.TemporaryDirectory() as tmp:
                        if row.is_tp:
                            pruned = (tp_prune(row.method, dense, train, value, args, seed, x) if kind == "flops" else
                                      tp_at_latency(row.method, dense, train, latency_goal(results, key, value), args,
                                                    seed, x, tmp))
                            shock = evaluate(pruned, eval_loader(probe))[0]
                            pruned = tp_finetune(row, pruned, dense, train, args, seed)
                        else:
                            budget = Budget("flops", value) if kind == "flops" else Budget("speedup", value)
                            start = dense
                            if row.early:
                                if args.regime != "equal-epochs":
                                    sys.exit(f"row {row.name}: +early belongs to the equal-epochs regime")
                                start = dense_model(model_name, train, test, early_epochs(args), seed,
                                                    args.train_subset, args.cache)[0]
                            pruned, shock, policy, status = run_ours(row, start, train, probe, budget, args, seed,
                                                                      Path(tmp) / "run")
                            extra = {"allocation": policy, "status": status}
                        secs = time.perf_counter() - t0
                        acc = evaluate(pruned, eval_loader(test))[0]
                        lat, ratio = latency_ratio(dense, pruned, x, args.target, tmp)
                    flops = count_flops(pruned, x) / count_flops(dense, x)
                    append_row(results, dict(key, acc=acc, flops=flops, params=count_params(pruned), lat_ms=lat,
                                             ratio=ratio, shock=shock, secs=secs, **extra))
                    print(f"[{model_name} seed {seed} {budget_name}] {row.name:26s} acc {100 * acc:.2f}%  flops "
                          f"{flops:.3f}  latency {ratio:.3f}x  shock {100 * (shock or 0):.1f}%  ({secs:.0f}s)", flush=True)
    return summarize([results])


# --- tables -------------------------------------------------------------------------------------------

def fmt(values, pct=False, digits=2):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    k = 100 if pct else 1
    m = statistics.mean(values) * k
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) * k:.{digits}f}"


def summarize(paths: list[Path]) -> int:
    """Per regime and model: the table of every row (mean ± std over the seeds that have it), then, per
    budget, hwprune's rows against Torch-Pruning's best as paired per-seed differences. With several files
    a seed is labelled by its file (a0, b0, ...): rows are paired only within a file, whose dense model
    they share."""
    recs, seen = [], set()
    for i, path in enumerate(paths):
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if len(paths) > 1:
                    r["seed"] = f"{chr(97 + i)}{r['seed']}"
                if key_of(r) not in seen:  # two runs sharing a file both write the dense row of a seed
                    seen.add(key_of(r))
                    recs.append(r)
    if len(paths) > 1:
        print("\nPooled: " + "; ".join(f"seeds {chr(97 + i)}N are {p}" for i, p in enumerate(paths)))
    for regime, model_name in sorted({(r["regime"], r["model"]) for r in recs}):
        mine = [r for r in recs if r["regime"] == regime and r["model"] == model_name]
        seeds = sorted({r["seed"] for r in mine})
        scored = ("held-out training" if mine[0].get("eval") == "holdout" else "test")
        print(f"\n### {model_name}, regime {regime}, seeds {','.join(map(str, seeds))}; train {mine[0]['train_subset']}"
              f" / {scored} {mine[0]['test_subset']} images; epochs (regularize, fine-tune, dense) {mine[0]['epochs']}\n")
        print("| budget | row | seeds | top-1 (%) | FLOPs kept | params | ORT latency vs dense | acc. right after pruning (%) | wall s |")
        print("|" + "---|" * 9)
        groups: dict[tuple, list] = {}
        for r in mine:
            groups.setdefault((r["budget"], r["row"]), []).append(r)
        order = {name: i for i, name in enumerate(["dense"] + ROWS + TP)}
        for (budget, row), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "dense", kv[0][0], order.get(kv[0][1], 99))):
            print(f"| {budget} | {row} | {len(rs)} | {fmt([r['acc'] for r in rs], True)} | "
                  f"{fmt([r.get('flops') for r in rs], digits=3)} | {fmt([r.get('params') for r in rs], digits=0)} | "
                  f"{fmt([r.get('ratio') for r in rs], digits=3)} | {fmt([r.get('shock') for r in rs], True, 1)} | "
                  f"{fmt([r.get('secs') for r in rs], digits=0)} |")
        header = ["\n| budget | Torch-Pruning's best | hwprune row | hwprune − TP best (pts, paired over seeds) "
                  "| TP's latency / hwprune's (paired) |", "|---|---|---|---|---|"]
        for budget in sorted({b for b, _ in groups if b != "dense"}):
            acc = {row: {r["seed"]: r["acc"] for r in rs} for (b, row), rs in groups.items() if b == budget}
            lat = {row: {r["seed"]: r.get("ratio") for r in rs} for (b, row), rs in groups.items() if b == budget}
            tps = [t for t in TP if t in acc]
            if not tps:
                continue
            tp_best = max(tps, key=lambda t: statistics.mean(acc[t].values()))
            if header:  # printed once, and only when some budget has Torch-Pruning rows
                print("\n".join(header))
                header = []
            for row in [r for r in acc if not _is_tp_name(r)]:
                common = sorted(set(acc[row]) & set(acc[tp_best]))
                diffs = [acc[row][s] - acc[tp_best][s] for s in common]
                speed = [lat[tp_best][s] / lat[row][s] for s in common if lat[tp_best][s] and lat[row][s]]
                print(f"| {budget} | {tp_best} {fmt(list(acc[tp_best].values()), True)} | {row} "
                      f"{fmt(list(acc[row].values()), True)} | {fmt(diffs, True)} (n={len(common)}) | "
                      f"{fmt(speed, digits=2)} |")
        if regime == "equal-epochs":
            _against_uniform(groups)
    return 0


def _against_uniform(groups: dict) -> None:
    """Regime (b)'s bar: every pruning row against the thin model trained from scratch, paired per seed."""
    print("\nRegime (b) against its bar, the thin model trained from scratch (per seed, then mean ± std):\n")
    print("| budget | row | uniform from scratch | the row | row − uniform (pts, paired) |")
    print("|---|---|---|---|---|")
    for budget in sorted({b for b, _ in groups if b != "dense"}):
        acc = {row: {r["seed"]: r["acc"] for r in rs} for (b, row), rs in groups.items() if b == budget}
        if "uniform" not in acc:
            continue
        for row in [r for r in acc if r != "uniform" and not _is_tp_name(r)]:
            common = sorted(set(acc[row]) & set(acc["uniform"]))
            if not common:
                continue
            diffs = [acc[row][s] - acc["uniform"][s] for s in common]
            print(f"| {budget} | {row} | {fmt([acc['uniform'][s] for s in common], True)} | "
                  f"{fmt([acc[row][s] for s in common], True)} | {fmt(diffs, True)} (n={len(common)}) |")


if __name__ == "__main__":
    sys.exit(main())
