"""``hwprune fit``: prune a model to a budget on a target, export it, measure it, report.

With no ``--model``/``--data`` it runs the embedded default: a small residual CNN on scikit-learn's
real 8x8 digits. ``--resume RUN_DIR`` continues an interrupted run with the settings it started with.
"""

from __future__ import annotations

from ..runtimes import RUNTIMES

import argparse
import contextlib
import shlex
import signal
import sys
from pathlib import Path

from ..errors import CheckpointError, HwpruneError
from ..apply.granularity import granularity
from ..io import atomic_write_json, check_writable_folder, folder_lock

DEFAULT_MODEL = "small-resnet"
DEFAULT_DATA = "digits"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "fit", help="train with a structured regularizer, prune to the budget, export and measure",
        description="Prune a model to exactly the budget on a hardware target. "
        "Example: hwprune fit --target host-cpu.yaml --sparsity 0.7",
    )
    p.add_argument("--target", help="target YAML: a path, or the name of a shipped target (host-cpu, jetson.yaml, ...)")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--sparsity", type=float, help="fraction of the prunable units (channels, neurons; or weight blocks "
                   "with --granularity blocks) to remove, e.g. 0.7")
    b.add_argument("--flops", type=float, help="fraction of the FLOPs to keep, e.g. 0.5")
    b.add_argument("--params", type=float, help="fraction of the parameters to keep, e.g. 0.5")
    b.add_argument("--latency-ms", type=float, help="predicted latency to reach, in ms (needs the target's profile: hwprune profile)")
    b.add_argument("--speedup", type=float, help="be S times faster than the dense model's measured latency (e.g. 3)")
    p.add_argument("--model", default=None, help=f"built-in model, minilm (all-MiniLM-L6-v2, distilled on text), "
                   f"package.module:function, or path/to/file.py:function (a function returning an nn.Module; the path "
                   f"relative to the current directory or absolute) (default: {DEFAULT_MODEL})")
    p.add_argument("--data", default=None, help=f"built-in dataset or imagefolder:PATH (default: {DEFAULT_DATA})")
    p.add_argument("--granularity", choices=["channels", "blocks"], default=None,
                   help="what a unit is: whole channels/neurons (default; the model is sliced) or weight blocks of the "
                   "target's block shape (the model is masked; export the BSR kernels with hwprune export --format tvm)")
    p.add_argument("--method", default=None,
                   help="pruning method (default: gradual; wgsef with --granularity blocks; fluctuation for "
                   "--model minilm)")
    p.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the method, e.g. --method-option weighting=uniform (repeatable)")
    from ..budget.allocation import POLICIES

    p.add_argument("--allocation", choices=sorted(POLICIES), default=None,
                   help="how many units each layer group keeps: global (the solver: importance kept against cost, "
                   "uniform widths when scores are equal), uniform (one width multiplier), sensitivity (measured "
                   "loss curves), learned (the method's scores compared across layers); default: global, "
                   "uniform for latency budgets, learned for fluctuation and weight blocks")
    p.add_argument("--allocation-option", action="append", default=[], metavar="KEY=VALUE",
                   help="floor=F / cap=C: every group keeps at least F and at most C times the uniform width")
    p.add_argument("--distill", type=float, default=None, metavar="ALPHA",
                   help="fine-tune with the dense model as teacher: loss (1-ALPHA)·CE + ALPHA·T²·KL "
                   "(classification; default 0.7, measured in docs/benchmarks.md; 0 turns it off)")
    p.add_argument("--distill-mixup", type=float, default=None, metavar="A",
                   help="distill on mixed images, lam ~ Beta(A, A) (function matching: the teacher labels the images "
                        "between the training images; 0 turns it off)")
    p.add_argument("--distill-shift", type=int, default=None, metavar="PIXELS",
                   help="distill on images moved by up to PIXELS (teacher and student see the same; 0 turns it off)")
    p.add_argument("--distill-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="distill on images mirrored left-right half of the time (not for digits or text)")
    p.add_argument("--epochs", type=int, nargs=3, metavar=("DENSE", "REGULARIZE", "FINETUNE"),
                   help="epochs per stage (default 15 15 10); DENSE 0 keeps the model's weights as they are")
    p.add_argument("--lr", type=float, default=None, help="base learning rate (default 0.05)")
    p.add_argument("--finetune-lr-scale", type=float, default=None, metavar="F",
                   help="the fine-tune's peak learning rate as a fraction of --lr (default 0.4: a short fine-tune of a "
                        "trained model); 1 when the model is pruned early and the fine-tune is most of the training "
                        "(e.g. --epochs 3 3 9 --distill 0 from scratch: docs/benchmarks.md, 'equal total epochs')")
    p.add_argument("--finetune-average", type=float, default=None, metavar="F",
                   help="average the weights over the last F of the fine-tune's steps, then re-estimate BatchNorm "
                        "(stochastic weight averaging; default 0: off; docs/benchmarks.md measured it)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default 64)")
    p.add_argument("--seed", type=int, default=None, help="random seed (data order, init; default 0)")
    p.add_argument("--workers", type=int, default=0, help="data-loading worker processes (default 0: load in the training process)")
    p.add_argument("--exclude", action="append", default=[], metavar="LAYER",
                   help="layer name or glob whose channels are kept (repeatable)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize every image to this side (default: the dataset's own, 32 for imagefolder)")
    p.add_argument("--out", default=None, help="run folder (default runs/<time>-<model>-<data>-<target>-<budget>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run with its settings")
    p.add_argument("--remeasure", action="store_true",
                   help="on a finished run: export and time it again, replacing report.json and model.onnx")
    p.add_argument("--latency-batch-size", type=int, default=None, help="batch size for latency (default: the target's)")
    p.add_argument("--latency-repeats", type=int, default=None, help="timed runs per model (default: the target's)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--profile", default=None, help="latency profile for --latency-ms/--speedup (default: the target's)")
    p.add_argument("--latency-runtime", choices=sorted(RUNTIMES), default=None,
                   help="runtime that measures latency (default onnxruntime; TVM's hand-scheduled build with --rpc)")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT", help="measure on the device behind this TVM RPC server")
    p.add_argument("--tracker", default=None, metavar="HOST:PORT", help="TVM RPC tracker to request the device from (with --key)")
    p.add_argument("--key", default=None, help="device key registered with the tracker")
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    p.set_defaults(command="fit")


_SAVED = ["target", "sparsity", "flops", "params", "latency_ms", "speedup", "model", "data", "granularity", "method",
          "method_option", "allocation", "allocation_option", "distill", "distill_mixup", "distill_shift", "distill_flip", "epochs", "lr", "finetune_lr_scale", "finetune_average", "batch_size", "seed", "exclude", "image_size", "latency_batch_size",
          "latency_repeats", "no_latency", "profile", "latency_runtime", "rpc", "tracker", "key"]


def _parse_option(item: str, flag: str = "--method-option") -> tuple[str, object]:
    """One ``KEY=VALUE`` item; the value is read as plain YAML (a number, a word, true/false).

    Example:
        >>> _parse_option("strength=1e-3"), _parse_option("hspg=true")
        (('strength', 0.001), ('hspg', True))
    """
    import yaml

    if "=" not in item:
        raise HwpruneError(f"{flag} {item!r}: expected KEY=VALUE")
    k, v = item.split("=", 1)
    try:
        value = yaml.safe_load(v)
    except yaml.YAMLError:
        raise HwpruneError(f"{flag} {item!r}: the value is not a plain number, word or true/false") from None
    if isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a word
            value = float(value)
        except ValueError:
            pass
    return k.strip().replace("-", "_"), value


def _parse_options(items: list[str], flag: str = "--method-option") -> dict:
    """``KEY=VALUE`` items to a dict (see :func:`_parse_option`).

    Example:
        >>> _parse_options(["strength=1e-3", "weighting=uniform", "hspg=true"])
        {'strength': 0.001, 'weighting': 'uniform', 'hspg': True}
    """
    return dict(_parse_option(item, flag) for item in items)


def check_method_options(method: str, items: list[str]) -> dict:
    """The settings ``--method-option`` items give ``method``, each checked against the method's settings
    (before any data is loaded); an error names the item as typed.

    Example:
        >>> check_method_options("wgsef", ["strength=abc"])
        Traceback (most recent call last):
        ...
        hwprune.errors.HwpruneError: --method-option strength=abc: wgsef strength 'abc': expected a number
    """
    from ..regularizers import make_config

    make_config(method)  # an unknown --method lists the methods there are
    options = {}
    for item in items:
        key, value = _parse_option(item)
        try:
            make_config(method, {key: value})  # unknown keys list the method's settings
        except HwpruneError as e:
            raise HwpruneError(f"--method-option {item}: {e}") from None
        options[key] = value
    try:  # settings that must agree with each other
        make_config(method, options)
    except HwpruneError as e:
        raise HwpruneError(f"--method-option {' '.join(items)}: {e}") from None
    return options


# Numeric flags and the smallest value each takes (checked before anything is loaded or written).
_AT_LEAST = {"batch_size": 1, "workers": 0, "latency_batch_size": 1, "latency_repeats": 1, "image_size": 8, "seed": 0}


def check_values(args) -> None:
    """Refuse numeric flags that cannot work, naming the flag, before any data, model or file is touched.

    Example:
        >>> import argparse
        >>> check_values(argparse.Namespace(epochs=[2, -1, 1], lr=None, **dict.fromkeys(_AT_LEAST)))
        Traceback (most recent call last):
        ...
        hwprune.errors.HwpruneError: --epochs 2 -1 1: expected three whole numbers >= 0 (DENSE REGULARIZE FINETUNE)
    """
    import math

    if args.epochs is not None and any(e < 0 for e in args.epochs):
        raise HwpruneError(f"--epochs {' '.join(map(str, args.epochs))}: expected three whole numbers >= 0 "
                           "(DENSE REGULARIZE FINETUNE)")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise HwpruneError(f"--lr {args.lr}: expected a positive learning rate, e.g. 0.05")
    scale = getattr(args, "finetune_lr_scale", None)
    if scale is not None and not (math.isfinite(scale) and 0 < scale <= 10):
        raise HwpruneError(f"--finetune-lr-scale {scale}: expected a fraction of --lr in (0, 10], e.g. 0.4 or 1")
    for key, lo in _AT_LEAST.items():
        value = getattr(args, key)
        if value is not None and value < lo:
            raise HwpruneError(f"--{key.replace('_', '-')} {value}: expected a whole number >= {lo}")


def _read_run_json(run_dir: Path) -> dict:
    """The saved flags of a run folder (``run.json``), or a clear error for a missing or broken file."""
    import json

    path = run_dir / "run.json"
    if not path.is_file():
        raise CheckpointError(f"--resume {run_dir}: no run.json there; is it a folder written by hwprune fit?")
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({type(e).__name__}); the run's flags are lost: start a new run "
                              "with --out elsewhere (the checkpoint cannot be resumed without them)") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("args"), dict):
        raise CheckpointError(f"{path} has no 'args' object: it was not written by hwprune fit; start a new run "
                              "with --out elsewhere")
    return saved


def _conflicts(args, saved_args: dict) -> list[str]:
    """The flags given now that differ from a run's saved ones (flags not given do not count)."""
    out = []
    for key in _SAVED:
        typed = getattr(args, key)
        if key in saved_args and typed not in (None, [], False) and typed != saved_args[key]:
            was = "default" if saved_args[key] in (None, [], False) else repr(saved_args[key])
            out.append(f"--{key.replace('_', '-')} {typed!r} differs from the run's {was}")
    return out


def _resume_args(args):
    run_dir = Path(args.resume)
    saved = _read_run_json(run_dir)["args"]
    conflicts = _conflicts(args, saved)
    if conflicts:
        raise CheckpointError(f"--resume: {conflicts[0]}; a resumed run keeps its settings (start a new run to change them)")
    for key in _SAVED:
        setattr(args, key, saved.get(key))
    args.out = str(run_dir)
    return args


def _run_json_is_new(out: Path, args) -> bool:
    """A folder that already holds a run must be asked for with that run's flags (it then resumes);
    checked before anything is written. Returns whether run.json is to be written.

    A run.json with no checkpoint beside it binds nothing: its run stopped before its first epoch (at a
    check that needs the model, such as an unreachable --speedup, or killed), so nothing trained is
    lost when the new run replaces it. Otherwise a corrected command would be refused in that folder."""
    from ..training.checkpoint import Checkpointer

    if args.resume:
        return False
    if not (out / "run.json").exists() or not Checkpointer(out).exists():
        return True
    conflicts = _conflicts(args, _read_run_json(out)["args"])
    if conflicts:
        raise CheckpointError(f"{out} holds another run ({conflicts[0]}); resume it with hwprune fit --resume {out}, "
                              "or choose another --out folder")
    return False


def _write_run_json(out: Path, args, command: str | None) -> None:
    """Write run.json for this run (the flags it resumes with). Replacing a run.json of other flags (its
    run never trained: see :func:`_run_json_is_new`) also drops that run's latency calibration, which was
    measured for its model, target and settings and would otherwise be reused by this one."""
    import json

    saved = {k: getattr(args, k) for k in _SAVED}
    if (out / "run.json").exists():
        try:
            before = _read_run_json(out)["args"]
        except CheckpointError:  # unreadable: another run's for all we know
            before = None
        if before != json.loads(json.dumps(saved)):  # compared as JSON reads them back (tuples as lists)
            (out / "latency_model.json").unlink(missing_ok=True)
    atomic_write_json(out / "run.json", {"args": saved, "command": command})


def _finished(out: Path) -> bool:
    """Whether the run in ``out`` has finished (its last checkpoint says 'done'). report.json is written
    just before that checkpoint, so a folder without it is not read any further."""
    from ..training.checkpoint import Checkpointer

    ckpt = Checkpointer(out)
    if not (out / "report.json").is_file() or not ckpt.exists():
        return False
    payload = ckpt.load()
    return payload is not None and payload.get("stage") == "done"


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill PID``, a scheduler stopping the job), raised where Ctrl-C raises KeyboardInterrupt
    so that both end the same way: the resume hint, the last checkpoint kept. Exit status 143, as the
    signal's own."""

    exit_status = 128 + signal.SIGTERM


@contextlib.contextmanager
def _sigterm_as_interrupt():
    def stop(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread (an embedding program's worker): its signals are not ours
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args) -> int:
    with _sigterm_as_interrupt():
        return _run(args)


def _run(args) -> int:
    from ..training import pipeline as fit_module
    from ..budget import KINDS, Budget
    from ..data import load_dataset
    from ..training.pipeline import FitConfig, fit
    from ..models import build_model
    from ..target import load_target
    from ..training.loop import TrainSettings

    from ..training import distributed

    dist = distributed.init_from_env()
    if dist.enabled:  # share the cores: torchrun starts one process per rank on this machine
        import os

        torch_threads = max(1, (os.cpu_count() or 1) // dist.world)
        import torch as _torch

        _torch.set_num_threads(torch_threads)
    check_values(args)
    if args.remeasure and args.no_latency:  # as typed: a resumed run's own --no-latency is read below
        raise HwpruneError("--remeasure exports and times a finished run again; --no-latency says not to time it: "
                           "drop one of them")
    from ..models import model_tag, resolve_file_reference

    if args.model:  # file.py:function -> its absolute path: resume and export rebuild it from any directory
        args.model = resolve_file_reference(args.model)
    if args.resume:
        args = _resume_args(args)
    seed = 0 if args.seed is None else args.seed
    if not args.target:
        raise HwpruneError("--target is required, e.g. --target host-cpu.yaml (hwprune targets lists them)")
    budgets = [(kind.name, getattr(args, kind.arg)) for kind in KINDS.values() if getattr(args, kind.arg, None) is not None]
    if len(budgets) != 1:
        raise HwpruneError("give one budget: --sparsity S (fraction of units removed), --flops F or --params P (fraction "
                           "kept), --latency-ms X or --speedup S")
    budget = Budget(*budgets[0])  # validates the value before anything is loaded
    from ..text.job import TEXT_MODELS, TextJob

    data_name = args.data or DEFAULT_DATA
    model_name = args.model or DEFAULT_MODEL
    # Everything the flags alone decide is checked here, before any data is loaded and before run.json
    # is written: a run that could only fail must not leave a run folder behind.
    if not args.method:  # saved in run.json as chosen: a resumed run keeps it
        args.method = (TextJob.method if model_name in TEXT_MODELS
                       else granularity(args.granularity or "channels").default_method)
    settings = TrainSettings()
    config = FitConfig(budget=budget, method=args.method,
                       method_options=check_method_options(args.method, args.method_option), train=settings, seed=seed, exclude=tuple(args.exclude),
                       latency_batch_size=args.latency_batch_size, latency_repeats=args.latency_repeats,
                       granularity=args.granularity or "channels",
                       latency_runtime=args.latency_runtime, profile=args.profile, allocation=args.allocation,
                       allocation_options=_parse_options(args.allocation_option or [], "--allocation-option"),
                       **{key: getattr(args, key) for key in ("distill", "distill_mixup", "distill_shift", "distill_flip",
                                                               "finetune_average")
                          if getattr(args, key, None) is not None})
    finished = bool(args.out) and _finished(Path(args.out))  # reads the checkpoint: once
    if args.remeasure and not finished:
        # it would train a whole new run (or finish an interrupted one) where only a re-export was asked for
        raise HwpruneError("--remeasure exports and times a finished run again: "
                           + (f"{args.out} holds no finished run (continue an interrupted one with hwprune fit "
                              f"--resume {args.out}, without --remeasure)" if args.out else
                              "a new run has nothing to measure yet (leave --remeasure off)"))
    if args.out:  # a folder of another run is refused, a finished one reported, before any data is loaded
        _run_json_is_new(Path(args.out), args)
        if not args.remeasure and finished:
            out = Path(args.out)
            print(f"{out}: this run is finished; its report is {out / 'report.md'} (and report.json). Nothing was "
                  f"changed. To export it again: hwprune export {out}; to export and time it again, replacing "
                  f"report.json and model.onnx: hwprune fit --resume {out} --remeasure")
            return 0
    target = load_target(args.target)
    from ..runtimes.tvm.rpc import resolve_remote

    remote = resolve_remote(target, rpc=args.rpc, tracker=args.tracker, key=args.key)
    measure = args.remeasure or not args.no_latency  # a --no-latency run measures when asked to --remeasure
    if remote is not None and measure:  # a missing linker or a wrong address fails now, not after training
        from ..runtimes.tvm.rpc import check_device

        check_device(target, remote)
    quiet = args.quiet or not dist.is_main
    say = (lambda m: None) if quiet else (lambda m: print(m, flush=True))
    say(f"target {target.name}: {target.description}")
    import torch

    job = None
    if model_name in TEXT_MODELS:  # a pretrained transformer distilled on text (hwprune/text/job.py)
        from ..text.job import minilm_job

        if budget.kind in ("latency", "speedup") or args.rpc or args.tracker:
            raise HwpruneError(f"--model {model_name} prunes attention heads and MLP neurons (or, with --granularity "
                               "blocks, weight blocks of its linear layers) with --sparsity, --flops or --params, timed "
                               "here; latency budgets and RPC devices work with the CNN models")
        job = minilm_job(args.data, seed)
        data_name, train_data, test_data = job.data, job.task, None
        model = job.model
        say(f"data {job.data}: {job.description}")
    else:
        bundle = load_dataset(data_name, seed=seed, image_size=args.image_size)
        say(f"data {bundle.name}: {bundle.description}")
        train_data, test_data = bundle.train, bundle.test
        torch.manual_seed(seed)
        model = build_model(model_name, in_channels=bundle.in_channels, num_classes=bundle.num_classes, input_size=bundle.input_size)
    say(f"model {model_name}: {sum(p.numel() for p in model.parameters()):,} parameters")
    if job is not None:
        settings.lr, settings.batch_size, settings.weight_decay = job.lr, job.batch_size, job.weight_decay
    if args.lr is not None:
        settings.lr = args.lr
    if args.batch_size is not None:
        settings.batch_size = args.batch_size
    settings.num_workers = args.workers
    if job is not None:
        config.epochs_dense, config.epochs_regularize, config.epochs_finetune = job.epochs
        config.method_options = {**job.method_options.get(args.method, {}), **config.method_options}
        config.finetune_lr_scale = 1.0
    if args.epochs:
        config.epochs_dense, config.epochs_regularize, config.epochs_finetune = args.epochs
    if getattr(args, "finetune_lr_scale", None) is not None:
        config.finetune_lr_scale = args.finetune_lr_scale
    out = Path(args.out) if args.out else fit_module._default_dir(config, {"model": model_tag(model_name), "data": data_name, "target": target.name})
    if dist.enabled:  # every rank must use rank 0's folder (the default one has a time stamp)
        import torch.distributed as tdist

        box = [str(out)]
        tdist.broadcast_object_list(box, src=0)
        out = Path(box[0])
    command = "hwprune " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv and "hwprune" in sys.argv[0] else None
    # How to rebuild the model from the run folder alone (hwprune export reads it from the plan's meta).
    info = {"model": model_name, "data": data_name, "command": command,
            "model_args": {} if job is not None else {"in_channels": bundle.in_channels, "num_classes": bundle.num_classes,
                                                       "input_size": bundle.input_size}}
    check_writable_folder(out)
    _run_json_is_new(out, args)  # a refusal here leaves the folder untouched (no lock file either)
    # Held through the fit: a second fit into this folder is refused before it writes anything; run.json is
    # checked again under the lock (another fit may have written it in between).
    with folder_lock(out) if dist.is_main else contextlib.nullcontext():
        if _run_json_is_new(out, args) and dist.is_main:
            _write_run_json(out, args, command)
        try:
            result = fit(model, train_data, test_data=test_data, target=target, config=config, out_dir=out,
                         progress=say, run_info=info, measure=measure, remote=remote)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
            print(f"\nhwprune: interrupted. Resume with: hwprune fit --resume {out}", file=sys.stderr)
            return getattr(e, "exit_status", 130)
        finally:
            distributed.shutdown()
    if result.report is None:  # not rank 0: rank 0 reports
        return 0
    print()
    print(result.report.table())
    print(f"\nrun folder: {result.run_dir}  (report.md, report.json, plan.json, model.onnx, plots)")
    return 0
