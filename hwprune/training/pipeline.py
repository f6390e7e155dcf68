"""``hwprune.fit``: the whole job in one call, with checkpoints so that an interrupted run resumes.

Stages: ``dense`` (train or keep a pretrained model) → ``regularize`` (the method pushes units to
zero while λ is adapted towards the budget) → projection to exactly the budget and slicing →
``finetune`` (the smaller dense model) → ``export`` (ONNX, checked with onnxruntime) → latency
measured on the target's runtime → report.

``granularity="blocks"`` swaps the units: weight blocks of the target's block shape instead of
channels (:mod:`hwprune.graph.blocks`), and the projection masks instead of slicing; the masked model is
fine-tuned with its zero blocks held at zero. Everything else is the same code. A checkpoint is written atomically after every epoch;
calling ``fit`` again on the same run folder continues where it stopped.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .. import __version__
from . import distributed
from ..budget import KINDS, Budget, check_budget, project
from .checkpoint import Checkpointer
from .config import FitConfig
from .averaging import WeightAverage, first_averaged_step
from .state import RunState
from ..budget.cost import count_flops, count_params, flops_model, params_model
from ..errors import BudgetError, CheckpointError, DivergedError, ExportError, HwpruneError
from ..apply.granularity import granularity
from ..apply.plan import Plan, apply_plan
from ..regularizers import RegContext, Regularizer, SparsitySchedule, StrengthController, build_regularizer, make_config
from ..report import Report, layer_table, plot_history, plot_norms
from ..io import folder_lock
from ..report.sections import latency_by_batch, latency_model_check, latency_section, throughput_section
from ..apply.slicing import reinitialize, slice_model
from ..target import Target, load_target
from ..tasks import ClassificationTask, Task
from ..tasks.base import as_args
from .loop import TrainSettings, cosine_lr


@dataclass
class FitResult:
    """What ``fit`` returns: the pruned model, its plan, the report and the run folder."""

    model: nn.Module
    plan: Plan
    report: Report
    run_dir: Path


def _say(progress, msg: str) -> None:
    if progress:
        progress(msg)


def slow_batchnorm(model: nn.Module, momentum: float = 0.1) -> bool:
    """True when some BatchNorm keeps running statistics that move slower than PyTorch's default.

    Example:
        >>> slow_batchnorm(nn.BatchNorm2d(4)), slow_batchnorm(nn.BatchNorm2d(4, momentum=0.01))
        (False, True)
    """
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               and m.momentum is not None and m.momentum < momentum for m in model.modules())


def _env() -> dict[str, str]:
    import onnxruntime

    return {
        "hwprune": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
    }


def fit(
    model: nn.Module,
    train_data,
    *,
    target: Target | str,
    sparsity: float | None = None,
    flops: float | None = None,
    params: float | None = None,
    latency_ms: float | None = None,
    speedup: float | None = None,
    test_data=None,
    out_dir: str | os.PathLike | None = None,
    config: FitConfig | None = None,
    method: str | None = None,
    granularity: str | None = None,
    allocation: str | None = None,
    progress: Callable[[str], None] | None = print,
    run_info: dict[str, Any] | None = None,
    measure: bool = True,
    remote=None,
) -> FitResult:
    """Train ``model`` with a structured regularizer, prune it to exactly the budget, fine-tune, export
    ONNX, measure latency on the target and write a report into ``out_dir``.

    Give exactly one budget: ``sparsity`` (fraction of prunable units removed), ``flops`` or ``params``
    (fraction kept), ``latency_ms`` or ``speedup`` (predicted from the target's measured profile, see
    :mod:`hwprune.latency.budget`). ``granularity="blocks"`` prunes weight blocks of the target's block
    shape instead of channels (``sparsity`` is then the fraction of blocks removed) and masks instead of
    slicing. ``allocation``: how many units each layer group keeps (:mod:`hwprune.budget.allocation`:
    ``global``, ``uniform``, ``sensitivity``, ``learned``; default: the method's). ``remote``: a :class:`~hwprune.runtimes.tvm.rpc.RemoteSpec` (RPC device) on which latency is measured
    with TVM. ``train_data``/``test_data``: datasets or DataLoaders of ``(input, label)``; with a
    DataLoader its dataset and collate function are used, and hwprune draws the order itself (seeded
    per epoch, so that a resumed run replays exactly). ``train_data`` may instead be a
    :class:`~hwprune.tasks.Task` (e.g. distilling a sentence encoder), which owns its data. If
    ``out_dir`` holds a checkpoint of the same configuration, the run continues from it.

    Example:
        >>> from hwprune.models import build_model
        >>> from hwprune.data import load_dataset
        >>> data = load_dataset("digits")
        >>> net = build_model("small-resnet", in_channels=1, num_classes=10, input_size=8)
        >>> result = hwprune.fit(net, data.train, test_data=data.test, target="host-cpu",
        ...                      sparsity=0.7, out_dir="runs/demo")          # doctest: +SKIP
        >>> print(result.report)                                              # doctest: +SKIP
    """
    given = {"sparsity": sparsity, "flops": flops, "params": params, "latency_ms": latency_ms, "speedup": speedup}
    budgets = [(kind.name, given[kind.arg]) for kind in KINDS.values() if given[kind.arg] is not None]
    if config is None:
        if len(budgets) != 1:
            raise BudgetError("give exactly one budget: sparsity=, flops=, params=, latency_ms= or speedup=")
        config = FitConfig(budget=Budget(*budgets[0]), granularity=granularity or "channels")
    elif budgets:
        raise BudgetError("give the budget either in config or as sparsity=/flops=/params=/latency_ms=/speedup=, not both")
    elif granularity is not None:
        config = dataclasses.replace(config, granularity=granularity)
    if method is not None:
        config = dataclasses.replace(config, method=method)  # never the caller's object
    if allocation is not None:
        config = dataclasses.replace(config, allocation=allocation)
    make_config(config.method, config.method_options)  # reject unknown methods/options before any work
    target = load_target(target) if not isinstance(target, Target) else target
    task = train_data if isinstance(train_data, Task) else ClassificationTask(train_data, test_data)
    run = _Run(model, task, target, config, Path(out_dir or _default_dir(config, run_info)), progress,
               run_info or {}, measure, remote)
    if not run.dist.is_main:  # the ranks of one torchrun job share rank 0's folder (and its lock)
        return run.execute()
    with folder_lock(run.run_dir):
        return run.execute()


def check_collapse(reg) -> None:
    """Stop if the regularizer drove every unit of a layer to zero: the network cannot recover
    from that (a zero channel gets no gradient), and the projection would keep dead units."""
    scores = np.asarray(reg.scores(), dtype=np.float64)
    if not len(scores) or not np.isfinite(scores).all():
        bad = [] if not len(scores) else [g.name for g, v in zip(reg.index.groups, reg.index.split(torch.as_tensor(scores)).values())
                                          if not torch.isfinite(v).all()]
        raise DivergedError(f"unit scores became NaN or infinite{' in ' + ', '.join(bad[:3]) if bad else ''}; "
                            "the run stopped and the last good checkpoint is kept")
    scale = float(np.median(scores[scores > 0])) if (scores > 0).any() else 0.0
    for g, v in reg.index.split(torch.as_tensor(scores)).items():
        if float(v.max()) <= 1e-8 * scale:
            raise DivergedError(
                f"layer group '{g}' collapsed to zero width during regularized training; the run stopped and the last "
                "good checkpoint is kept. Lower the method's strength (--method-option strength=...) or the "
                "learning rate, and start again"
            )


def _check_task_support(task, config: FitConfig, remote, distributed_run: bool) -> None:
    """What works for the classification task only, refused up front for other tasks (distillation)."""
    from ..runtimes import RUNTIMES

    missing = []
    if config.budget.spec.cost == "latency":
        missing.append("latency budgets")
    if remote is not None or not RUNTIMES[config.latency_runtime or "onnxruntime"].task_inputs:
        missing.append("TVM / RPC latency")
    if distributed_run:
        missing.append("several processes (torchrun)")
    if config.distill:
        missing.append("--distill (the task distills in its own way, or not at all)")
    missing += [flag for flag, value in (("--distill-mixup", config.distill_mixup), ("--distill-shift",
                config.distill_shift), ("--distill-flip", config.distill_flip)) if value]
    if config.allocation == "sensitivity":
        missing.append("--allocation sensitivity")
    if missing:
        raise HwpruneError(f"the {task.name} task does not support {', '.join(missing)} yet: use a sparsity, FLOPs or "
                           "parameter budget in one process, timed with onnxruntime")


def _default_dir(config: FitConfig, info: dict) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    b = config.budget
    tag = "-".join(str(x) for x in (info.get("model"), info.get("data"), info.get("target")) if x)
    # one folder name: a data path or a model file ('imagefolder:./photos', './net.py:make') must not nest folders
    tag = re.sub(r"[^\w+-]+", "-", tag).strip("-")
    return Path("runs") / f"{stamp}-{tag}-{b.kind}{b.value:g}".replace("--", "-")


class _Run:
    """One run's state machine: each stage reads and writes the checkpoint."""

    def __init__(self, model, task: Task, target, config: FitConfig, run_dir: Path, progress, info, measure, remote=None):
        self.dist = distributed.info()
        if not isinstance(task, ClassificationTask):
            _check_task_support(task, config, remote, self.dist.enabled)
        elif (config.distill_shift or config.distill_flip) and isinstance(task.example, torch.Tensor) \
                and task.example.dim() != 4:  # refused now, not when the fine-tune starts
            raise HwpruneError(f"--distill-shift/--distill-flip move and mirror images: the model's input has shape "
                               f"{tuple(task.example.shape)}, not (N, C, H, W); leave them off for this data")
        if isinstance(task, ClassificationTask) and isinstance(task.example, torch.Tensor):
            from ..models import check_classifier

            # a model returning a dict or a tuple would fail in the first training step, with torch's traceback
            check_classifier(model, task.example.repeat(2, *[1] * (task.example.dim() - 1)))
        if self.dist.enabled:  # BN statistics over the global batch, as in one process
            distributed.convert_batchnorm(model, to_synced=True)
            progress = progress if self.dist.is_main else None
        self.template = copy.deepcopy(model).cpu()  # the untrained architecture, to rebuild from
        self.model = model
        self.task = task
        self.target, self.config, self.run_dir = target, config, run_dir
        self.progress, self.info, self.measure = progress, info, measure
        from ..latency.budget import measurement_runtime

        self.remote = remote
        self.runtime = measurement_runtime(config.latency_runtime, remote)
        self._latency = None  # the calibrated latency model of a latency budget, built once
        self.device = torch.device("cpu")
        self.ckpt = Checkpointer(run_dir)
        self.example = task.example
        self.state = RunState()
        self.dense_layers: dict = {}  # layers a block run leaves dense (for the report)
        self._t_start: float | None = None  # when this session's part of the run started
        self._resume_payload: dict | None = None  # the checkpoint, until the optimizer has read it

    # --- helpers -------------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        fp = self.config.fingerprint()
        fp["target"] = self.target.name
        fp["model"] = self.info.get("model") or type(self.template).__name__
        fp["data"] = self.info.get("data")
        return fp

    def test_accuracy(self, model) -> float | None:
        """The task's quality measure on held-out data (accuracy for classification)."""
        return self.task.evaluate(model)

    def save(self, optimizer=None, regularizer=None, controller=None) -> None:
        if self._t_start is not None:
            self.state.seconds = time.perf_counter() - self._t_start
        payload = self.state.to_payload()
        payload["model"] = self.model.state_dict()
        payload["optimizer"] = optimizer.state_dict() if optimizer is not None else None
        if regularizer is not None:
            payload["regularizer"] = {"state": regularizer.state_dict(), "controller": controller.state_dict() if controller else {}}
        payload["rng"] = torch.get_rng_state()
        payload["config"] = self.fingerprint()
        if self.dist.is_main:  # one writer; every rank holds the same state (no rank reads it mid-run)
            self.ckpt.save(payload)

    @property
    def unit(self):
        """The run's :class:`~hwprune.apply.granularity.Granularity` (channels or weight blocks)."""
        return granularity(self.config.granularity)

    def groups(self, model):
        groups, self.dense_layers = self.unit.groups(model, self.example, self.target, self.config.exclude)
        return groups

    def index(self, model, groups):
        return self.unit.index(model, groups)

    def sliced_from_plan(self, plan: Plan) -> nn.Module:
        return apply_plan(copy.deepcopy(self.template), plan, target=self.target)

    # --- the run -------------------------------------------------------------------------------
    def execute(self) -> FitResult:
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        resumed = self.resume()
        # the run's wall time adds up over resumed sessions (checkpoints carry what came before)
        self._t_start = t_start = time.perf_counter() - float(self.state.seconds or 0.0)
        # Reject an impossible budget before any training (groups depend only on the architecture).
        groups = self.groups(self.template)
        cost = self.cost_model(self.template, groups)
        try:
            check_budget(groups, self.budget(), cost)
        except BudgetError as e:
            if self.config.budget.kind != "speedup":
                raise
            raise BudgetError(f"--speedup {self.config.budget.value:g} (= {self.budget().value:.4g} ms against the measured "
                              f"dense {self._latency.calibration['dense_ms']:.4g} ms): {e}") from None
        if not resumed and not self.dist.enabled:
            self._check_exportable()
        _say(self.progress, f"run folder: {self.run_dir}" + (f" ({self._resumed_where()})" if resumed else ""))
        if self.state.stage == "dense":
            self.stage_dense()
        if self.state.stage == "regularize":
            self.stage_regularize()
        if self.state.stage == "finetune":
            self.stage_finetune()
        report = None
        if self.dist.enabled:
            distributed.convert_batchnorm(self.model, to_synced=False)
        if self.state.stage in ("export", "done") and self.dist.is_main:
            report = self.stage_export(time.perf_counter() - t_start)
        distributed.barrier()
        plan = Plan.from_dict(self.state.plan)
        return FitResult(self.model, plan, report, self.run_dir)

    def _check_exportable(self) -> None:
        """Export the untrained model to ONNX once, thrown away: every run ends with model.onnx, and an op ONNX
        cannot hold (a custom autograd function, an aten op without an ONNX form) would otherwise surface only
        after all the training. Slicing changes widths, not ops, so the dense model stands for the pruned one."""
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            try:
                self.task.export_onnx(copy.deepcopy(self.template).eval(), Path(folder) / "trial.onnx")
            except ExportError as e:
                raise ExportError(f"checked before training: {e}") from None

    def _resumed_where(self) -> str:
        """Where a resumed run picks up, for the log; the epoch counted as finished, as the
        ``[stage N/M]`` lines that follow count them (after epoch 2 comes ``[regularize 3/8]``)."""
        stage, epoch = self.state.stage, self.state.epoch
        if stage == "done":
            return "resumed a finished run: exporting and timing it again"
        return f"resumed in stage '{stage}' after epoch {epoch}" if epoch else f"resumed at the start of stage '{stage}'"

    def resume(self) -> bool:
        payload = self.ckpt.load()
        if payload is None:
            return False
        saved, now = payload.get("config") or {}, self.fingerprint()
        if saved != now:
            # a key missing from a fingerprint is a setting at its default (FitConfig.fingerprint leaves it out)
            diffs = [f"{k} {saved[k]!r} in the run, {now[k]!r} now" if k in saved and k in now else
                     f"{k} {saved[k]!r} in the run, the default now" if k in saved else
                     f"{k} the default in the run, {now[k]!r} now"
                     for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
            raise CheckpointError(
                f"{self.run_dir} holds a run with other settings ({'; '.join(diffs)}). Resume it with its own "
                f"settings (hwprune fit --resume {self.run_dir}), or choose another --out folder."
            )
        self.state.update_from(payload)
        if self.state.sliced:
            self.model = self.sliced_from_plan(Plan.from_dict(self.state.plan))
        self.model.load_state_dict(payload["model"])
        self._resume_payload = payload
        torch.set_rng_state(payload["rng"])
        return True

    def _resume_optimizer(self, optimizer, regularizer=None, controller=None) -> None:
        payload = self._resume_payload
        if payload is None:
            return
        if optimizer is not None and payload.get("optimizer") is not None:
            optimizer.load_state_dict(payload["optimizer"])
        if regularizer is not None and payload.get("regularizer"):
            regularizer.load_state_dict(payload["regularizer"]["state"])
            if controller is not None:
                controller.load_state_dict(payload["regularizer"]["controller"])
        self._resume_payload = None

    def log_epoch(self, stage, epoch, total, stats, acc, extra: dict[str, Any] | None = None) -> None:
        rec = {"stage": stage, "epoch": epoch + 1, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
               "test_accuracy": acc, "seconds": stats.seconds, "samples_per_s": stats.samples_per_s, "lr": stats.lr}
        rec.update(extra or {})
        self.state.history.append(rec)
        more = "".join(f"  {k} {v:.3g}" if isinstance(v, float) else f"  {k} {v}" for k, v in (extra or {}).items())
        acc_s = f"  {self._metric(acc)}" if acc is not None else ""
        _say(self.progress, f"[{stage} {epoch + 1}/{total}] loss {stats.loss:.4f}{acc_s}{more}  ({stats.seconds:.1f}s, {stats.samples_per_s:.0f} samples/s)")

    def _metric(self, value, label: str | None = None) -> str:
        """The task's quality measure for the log: accuracy in percent, anything else as a number.
        ``label`` replaces the task's label ("" for none)."""
        label = self.task.metric_label if label is None else label
        if self.task.metric == "accuracy":
            return f"{label} {100 * (value or 0):.2f}%".lstrip()
        return f"{label} {value if value is not None else float('nan'):.4f}".lstrip()

    def recalibrate(self) -> None:
        self.task.recalibrate(self.model, self.config.train, self.config.seed, self.device)

    def run_epochs(self, stage, total, settings: TrainSettings, regularizer=None, controller=None, lr_scale=1.0,
                   extra_fn=None, lr_floor=0.0, teacher=None, average: WeightAverage | None = None):
        optimizer = self.task.make_optimizer(
            self.model, settings, regularizer.no_weight_decay() if regularizer else (),
            regularizer.extra_parameters() if regularizer else (),
            regularizer.param_groups() if regularizer else (),
        )
        self._resume_optimizer(optimizer, regularizer, controller)
        steps_per_epoch = self.task.steps_per_epoch(settings)
        total_steps = total * steps_per_epoch
        base = settings.lr * lr_scale

        first_averaged = first_averaged_step(total_steps, self.config.finetune_average) if average is not None else None

        def on_step(step, loss):
            if controller is not None:
                loss = distributed.mean(loss)  # every rank's controller must see the same loss
                regularizer.strength = controller.update(step + 1, regularizer.control_value(), regularizer.strength, loss)
            if first_averaged is not None and step >= first_averaged:
                average.update(self.model)

        extra = [p for g in (regularizer.extra_parameters() if regularizer else ()) for p in g["params"]]
        sync_extra = (lambda: distributed.all_reduce_grads_(extra)) if self.dist.enabled and extra else None
        train_model = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(self.model, broadcast_buffers=False)

        for epoch in range(self.state.epoch, total):
            stats = self.task.train_epoch(
                train_model, optimizer, settings=settings, seed=self.config.seed, stage=stage, epoch=epoch,
                lr_at=lambda s: cosine_lr(base, s, total_steps, lr_floor * base),
                step0=epoch * steps_per_epoch, regularizer=regularizer,
                on_step=on_step if controller is not None or first_averaged is not None else None, device=self.device,
                after_backward=sync_extra,
                **({"teacher": teacher} if teacher is not None else {}),
            )
            if isinstance(regularizer, Regularizer):
                check_collapse(regularizer)  # before the checkpoint: the last good one stays
                self.recalibrate()  # the regularizer moved the channel scales faster than BN's averages
            acc = self.test_accuracy(self.model)
            self.log_epoch(stage, epoch, total, stats, acc, extra_fn() if extra_fn else None)
            self.state.epoch = epoch + 1
            if average is not None:
                self.state.weight_average = average.state_dict()  # a resumed fine-tune keeps its average
            self.save(optimizer, regularizer, controller)
        return optimizer

    def stage_dense(self) -> None:
        cfg = self.config
        if cfg.epochs_dense > 0:
            self.run_epochs("dense", cfg.epochs_dense, cfg.train, extra_fn=lambda: {"sparsity": 0.0})
        self.state.acc["dense"] = self.test_accuracy(self.model)
        self.state.dense_model = copy.deepcopy(self.model.state_dict())
        self.state.enter("regularize")
        self.save()

    def budget(self) -> Budget:
        """The budget in the projection's terms: a speedup becomes milliseconds of the measured dense model."""
        b = self.config.budget
        if b.spec.measure == "relative":
            if self._latency is None:
                self.cost_model(self.template, self.groups(self.template))
            return b.as_latency(self._latency.calibration["dense_ms"])
        return b

    def planning_budget(self) -> Budget:
        """The budget the allocation plans against: a latency budget scaled by the factor with which the
        planned widths, timed before training, met it (``state.latency_loop``); any other as it is."""
        b, loop = self.budget(), self.state.latency_loop
        return Budget("latency", b.value * loop["factor"]) if loop and b.kind == "latency" else b

    def close_latency_loop(self, plan_at) -> dict:
        """Time the widths ``plan_at(ms) -> keep`` plans (on the untrained template, beside the dense
        model) and find the budget factor whose plan measures within the budget
        (:func:`hwprune.latency.budget.close_the_loop`)."""
        from ..latency.budget import close_the_loop, measure

        groups, lm = self.groups(self.template), self._latency
        dense = copy.deepcopy(self.template).eval()  # timed beside every plan, so drift cancels in the ratio

        def time_plan(keep) -> float:
            planned = slice_model(copy.deepcopy(self.template).eval(), groups, keep).eval()
            res = measure({"dense": dense, "planned": planned}, self.example,
                          self.target, runtime=self.runtime, remote=self.remote,
                          batch_size=self.config.latency_batch_size, repeats=self.config.latency_repeats)
            # on the calibration's scale: the machine's drift since calibrating cancels in the ratio
            return res.stats["planned"].median_ms / res.stats["dense"].median_ms * lm.calibration["dense_ms"]

        return close_the_loop(plan_at, time_plan, self.budget().value, progress=self.progress)

    def cost_model(self, model, groups):
        """The cost the budget is measured in (None for a count of units), built by :data:`COSTS`."""
        name = self.config.budget.spec.cost
        return COSTS[name](self, model, groups) if name is not None else None

    def share_cost(self, model, groups, cost):
        """What weights the groups in the global allocation: the budget's own cost, except a latency
        profile (flat between hardware steps), for which the FLOPs stand in."""
        return COSTS["flops"](self, model, groups) if cost is not None and cost.stepwise else None

    def latency_cost(self, model, groups):
        """The calibrated latency model of a latency or speedup budget, built once per run."""
        if self._latency is None:
            from ..latency.budget import latency_model_for

            # widths, not weights, set latency: the untrained template is measured, once per run
            self._latency = latency_model_for(
                self.template, self.example, self.groups(self.template), self.target, runtime=self.runtime,
                profile_path=self.config.profile, remote=self.remote, cache=self.run_dir / "latency_model.json",
                batch_size=self.config.latency_batch_size, repeats=self.config.latency_repeats,
                progress=self.progress)
        return self._latency

    def allocation(self, reg):
        """The run's allocation: ``--allocation``, else, in this order, the granularity's default (weight
        blocks: ``learned``, as block runs always were), a method that is its own allocation
        (``uniform``), the budget kind's default (latency budgets: ``uniform``), the method's default."""
        from ..regularizers.base import REGISTRY

        method = REGISTRY[self.config.method]
        default = (self.unit.default_allocation or (method.default_allocation if method.allocation_fixed else None)
                   or self.config.budget.spec.allocation or method.default_allocation)
        return self.config.allocation_config(default)

    def build_regularizer(self, groups):
        index = self.index(self.model, groups)
        cost = self.cost_model(self.model, groups)
        # How many units does each group keep? Project once with the current norms (and, for the sensitivity
        # allocation, loss curves measured on the model as it is now: the trained dense model). Methods that
        # prune toward this plan (gradual, WGSEF's weighting) must get the policy's plan: curves measured only
        # at the final projection would see the plan's units already at zero and confirm whatever it was.
        # Planned once, at the stage's start, and kept in the checkpoint: a resumed stage must not re-plan
        # from half-trained norms.
        plan = self.state.stage_plan
        if plan is None:
            allocation = self.allocation(None)
            norms, share = index.sq_norms().sqrt().double().numpy(), self.share_cost(self.model, groups, cost)
            curves = self.sensitivity_curves(groups, norms) if allocation.policy == "sensitivity" else None
            if (cost is not None and cost.in_ms and self.state.latency_loop is None and not self.dist.enabled):
                # the profile's prediction checked against the clock before any training: re-planned if it missed
                self.state.latency_loop = self.close_latency_loop(lambda ms: project(
                    groups, norms, Budget("latency", ms), cost, allocation=allocation, sensitivity=curves,
                    share_cost=share).keep)
            proj = project(groups, norms, self.planning_budget(), cost, allocation=allocation, sensitivity=curves,
                           share_cost=share)
            plan = {"removed_units": proj.removed_units, "keep": [len(proj.keep[g.name]) for g in index.groups]}
            self.state.stage_plan = plan
        # cost weighting (WGSEF weighting=cost): a unit's weight grows with what removing it saves
        unit_costs = (cost.unit_savings(np.ones(index.n_units))
                      if cost is not None and cost.saves_compute else None)
        steps = self.config.epochs_regularize * self.task.steps_per_epoch(self.config.train)
        target_fraction = plan["removed_units"] / max(index.n_units, 1)
        schedule = SparsitySchedule(target_fraction, steps)
        ctx = RegContext(self.model, index, keep_units=index.n_units - plan["removed_units"], unit_costs=unit_costs,
                         total_steps=steps, schedule=schedule, planned_keep=self.unit.planned_keep(plan))
        reg = build_regularizer(self.config.method, ctx, self.config.method_options)
        adaptive = getattr(reg.config, "adaptive", False) and not reg.solves_strength
        controller = StrengthController(schedule, max_step=reg.controller_max_step) if adaptive else None
        return reg, controller, target_fraction

    def stage_regularize(self) -> None:
        """Regularized epochs, then the projection to the budget, the method's finalize, and slicing."""
        groups = self.groups(self.model)
        reg, controller, target_fraction = self.build_regularizer(groups)
        reg.attach(resumed=self.state.epoch > 0)
        if reg.calibrates:  # every rank measures the same inputs, so every rank gets the same plan
            reg.calibrate(lambda n: self.task.calibration_forward(self.model, n, self.config.seed, self.device))
        if self.state.norms_before is None:
            self.state.norms_before = reg.scores().tolist()
        if reg.trains:
            # The learning rate keeps a floor here: the gradient must be able to answer the regularizer's
            # pressure up to the last step (with a cosine to zero, accuracy fell 5 points in the last epochs).
            self.run_epochs(
                "regularize", self.config.epochs_regularize, self.config.train, reg, controller,
                extra_fn=lambda: {"sparsity": reg.zero_fraction(), "strength": reg.strength}, lr_floor=0.1,
                lr_scale=self.config.regularize_lr_scale,
            )
        else:
            self._resume_optimizer(None, reg, controller)
        self.state.norms_after = reg.scores().tolist()
        self.state.target_fraction = target_fraction
        self.state.zero_fraction = reg.zero_fraction() if reg.trains else 0.0
        self.project_and_slice(groups, reg)

    def sensitivity_curves(self, groups, scores) -> list:
        """Each group's loss increase at each allowed count, cutting the lowest ``scores`` first, measured on
        training batches (the ``sensitivity`` allocation); see :func:`hwprune.budget.sensitivity.measure_curves`."""
        from ..budget.sensitivity import measure_curves

        t0 = time.perf_counter()
        curves = measure_curves(self.model, groups, scores,
                                lambda m: self.task.probe_loss(m, self.config.seed, self.device))
        _say(self.progress, f"[sensitivity] {len(curves)} groups measured ({time.perf_counter() - t0:.1f}s)")
        return curves

    def project_and_slice(self, groups, reg) -> None:
        cost = self.cost_model(self.model, groups)
        allocation = self.allocation(reg)
        curves = self.sensitivity_curves(groups, reg.scores()) if allocation.policy == "sensitivity" else None
        proj = reg.project(groups, self.planning_budget(), cost, allocation=allocation, sensitivity=curves,
                           share_cost=self.share_cost(self.model, groups, cost))
        acc_before = self.test_accuracy(self.model)
        reg.finalize(groups, proj.keep)  # fold gates / constants; the model is plain again
        self.unit.cut(self.model, groups, proj.keep)
        self.recalibrate()
        acc_after = self.test_accuracy(self.model)
        plan = Plan.from_groups(groups, proj.keep, as_args(self.example)[0].shape, self.config.exclude,
                                meta={"target": self.target.name, "budget": self.config.budget.describe(),
                                      "method": self.config.method, **self.info})
        self.unit.shrink(self.model, groups, proj.keep)
        if reg.from_scratch:
            reinitialize(self.model, self.config.seed)
            self.unit.after_reinit(self.model, groups, proj.keep)
        plan.save(self.run_dir / "plan.json")
        multiples = sorted({g.multiple for g in groups if g.prunable})
        self.state.plan = plan.to_dict()
        self.state.projection = {
            "units": proj.units, "removed_units": proj.removed_units, "requested": proj.requested,
            "achieved": proj.achieved, "kind": proj.kind,
            "zero_fraction_before": self.state.zero_fraction,
            "target_fraction": self.state.target_fraction,
            "accuracy_before": acc_before, "accuracy_after": acc_after,
            "rounding": f"kept counts are multiples of {', '.join(map(str, multiples))} or the full width"
            if multiples != [1] else "exact: no hardware multiple",
            "allocation": proj.allocation, "status": proj.status, "reason": proj.reason,
        }
        if cost is not None and cost.in_ms:
            self.state.projection["predicted_latency_ms"] = {"dense": cost(np.ones(proj.units)),
                                                                "pruned": cost(proj.keep_mask.astype(float))}
            self.state.projection["keep_vector"] = proj.keep_mask.astype(int).tolist()
        _say(self.progress, f"[project] removed {proj.removed_units} of {proj.units} units ({proj.kind} requested "
             f"{proj.requested:g}, achieved {proj.achieved:.4f}, allocation {proj.allocation}: {proj.status}); "
             f"{self._metric(acc_before, 'accuracy' if self.task.metric == 'accuracy' else None)} -> "
             f"{self._metric(acc_after, '')} (pruning shock)" + ("; re-initialized to train from scratch" if reg.from_scratch else ""))
        self.state.finetune_plan = self.finetune_schedule(reg)
        self.state.enter("finetune")
        self.save()

    def finetune_schedule(self, reg) -> dict:
        """Epochs and learning-rate scale of the last stage. Every method gets the same total epochs:
        one-shot methods fine-tune through the regularized epochs too; from-scratch methods train the
        thin model for all epochs at the full learning rate."""
        cfg = self.config
        # from scratch means without the dense model: no teacher either
        distill = self.distill_weight > 0 and not reg.from_scratch
        if reg.from_scratch:
            return {"epochs": cfg.epochs_dense + cfg.epochs_regularize + cfg.epochs_finetune, "lr_scale": 1.0,
                    "distill": distill}
        if not reg.trains:
            return {"epochs": cfg.epochs_regularize + cfg.epochs_finetune, "lr_scale": cfg.finetune_lr_scale,
                    "distill": distill}
        return {"epochs": cfg.epochs_finetune, "lr_scale": cfg.finetune_lr_scale, "distill": distill}

    def teacher(self):
        """The dense model as the fine-tune's teacher (``FitConfig.distill``), or None."""
        from ..tasks.classification import Distillation

        teacher = copy.deepcopy(self.template)
        teacher.load_state_dict(self.state.dense_model)
        c = self.config
        return Distillation(teacher.eval(), self.distill_weight, c.distill_temperature, mixup=c.distill_mixup,
                            shift=c.distill_shift, flip=c.distill_flip)

    @property
    def distill_weight(self) -> float:
        """``--distill``, or the task's default (0 for tasks that distill in their own way)."""
        return self.config.distill if self.config.distill is not None else self.task.default_distill

    def stage_finetune(self) -> None:
        cfg = self.config
        sparsity = self.state.projection["removed_units"] / max(self.state.projection["units"], 1)
        schedule = self.state.finetune_plan or {"epochs": cfg.epochs_finetune, "lr_scale": cfg.finetune_lr_scale}
        hold = self.unit.finetune_hold(self.model, Plan.from_dict(self.state.plan))
        teacher = self.teacher() if schedule.get("distill") and self.state.dense_model is not None else None
        average = None
        if cfg.finetune_average > 0:
            average = WeightAverage()
            average.load_state_dict(self.state.weight_average)
        if schedule["epochs"] > 0:
            self.run_epochs("finetune", schedule["epochs"], cfg.train, regularizer=hold, lr_scale=schedule["lr_scale"],
                            extra_fn=lambda: {"sparsity": sparsity}, teacher=teacher, average=average)
            if average is not None and average.count:
                # the mean of the weights of the last steps; its BatchNorm statistics are nobody's yet
                average.copy_to(self.model)
                self.recalibrate()
                self.state.acc["before_average"] = self.state.history[-1].get("test_accuracy")
                # spent: later checkpoints need not carry a second copy of the weights (an interruption
                # before the next save resumes from the last epoch's checkpoint, which still has it)
                self.state.weight_average = None
            elif slow_batchnorm(self.model):
                # BatchNorm averages that move 1% a step (TF ports: EfficientNet-Lite) still describe the
                # model from a hundred steps ago after a short fine-tune: 81.4% -> 87.6% once re-estimated
                # (docs/benchmarks.md, EfficientNet-Lite1). At PyTorch's 0.1 they follow; left as they are.
                self.recalibrate()
        self.state.acc["pruned"] = self.test_accuracy(self.model)
        from ..io import atomic_torch_save

        atomic_torch_save(self.run_dir / "pruned.pt", {"state_dict": self.model.state_dict(), "plan": self.state.plan})
        self.state.enter("export")
        self.save()

    def stage_export(self, seconds: float) -> Report:
        from ..runtimes import RUNTIMES

        dense = copy.deepcopy(self.template)
        dense.load_state_dict(self.state.dense_model)
        dense.eval()
        self.model.eval()
        self.task.export_onnx(dense, self.run_dir / "dense.onnx")
        self.task.export_onnx(self.model, self.run_dir / "model.onnx")
        diff, n_checked = self.task.onnx_max_abs_diff(self.run_dir / "model.onnx", self.model)
        _say(self.progress, f"[export] model.onnx: onnxruntime vs torch max |diff| {diff:.2e} on {n_checked} real inputs")
        latencies = []
        # A latency budget also times the narrowest model alongside: the latency model's anchors
        # re-measured in the same session as the pruned model (a shared machine drifts by tens of %).
        anchor = self.config.budget.spec.cost == "latency"
        if self.measure:
            rt = RUNTIMES[self.runtime]
            models = {"dense": dense, "pruned": self.model}
            if anchor:
                models["narrowest"] = self._narrowest()
            sizes = ([self.config.latency_batch_size] if self.config.latency_batch_size else
                     list(self.task.latency_batch_sizes or [None]))
            where = self.remote.describe() if self.remote is not None else "this machine"
            for bs in sizes:
                _say(self.progress, f"[latency] timing dense and pruned on {rt.name}, {where}, interleaved"
                     f"{f' (batch {bs})' if bs else ''} ...")
                latencies.append(rt.time_models(
                    models, self.example, self.target, remote=self.remote, batch_size=bs,
                    repeats=self.config.latency_repeats, export=self.task.export_onnx, feeds=self.task.latency_feeds,
                    exported={"dense": self.run_dir / "dense.onnx", "pruned": self.run_dir / "model.onnx"}))
        report = self.build_report(dense, diff, n_checked, latencies, seconds)
        report.save(self.run_dir)
        norms_b, norms_a = self.state.norms_before, self.state.norms_after
        if norms_b is not None and norms_a is not None:
            plot_norms(np.asarray(norms_b), np.asarray(norms_a), self.run_dir / "norms.png")
        if self.state.history:
            plot_history(self.state.history, self.run_dir / "history.png")
        self.state.stage = "done"
        self.save()
        return report

    def _narrowest(self) -> nn.Module:
        """The architecture with every prunable group at its minimum width (a latency anchor)."""
        from ..latency.budget import min_width_keep

        groups = self.groups(self.template)
        return slice_model(copy.deepcopy(self.template), groups, min_width_keep(groups)[0]).eval()

    def _latency_info(self) -> dict:
        if self._latency is None:
            try:
                self.cost_model(self.template, self.groups(self.template))
            except HwpruneError:
                return {}
        return self._latency.describe()

    def _same_session_prediction(self, dense_ms: float, narrowest_ms: float) -> tuple[float, float, float]:
        """The pruned model's latency predicted by the planning model re-anchored on the dense and
        narrowest models timed in the same session as the pruned one: (ms, scale, overhead ms)."""
        from ..latency.budget import min_width_keep

        _, vec_min = min_width_keep(self.groups(self.template))
        now = self._latency.calibrated(dense_ms, narrowest_ms, vec_min)
        return now(np.asarray(self.state.projection["keep_vector"], dtype=float)), now.scale, now.overhead_ms

    def build_report(self, dense, diff, n_checked, latencies, seconds) -> Report:
        b = self.config.budget
        proj = self.state.projection
        flops_d, flops_p = count_flops(dense, self.example), count_flops(self.model, self.example)
        params_d, params_p = count_params(dense), count_params(self.model)
        # weight blocks keep dense shapes: count what the sparse formats store and compute
        blocks = self.unit.report(self.model, self.example, Plan.from_dict(self.state.plan),
                                  self.dense_layers)
        if blocks is not None:
            params_p -= blocks["params_removed"]
            flops_p -= blocks["macs_removed"]
        achieved = {"sparsity": proj["removed_units"] / max(proj["units"], 1), "flops": flops_p / flops_d,
                    "params": params_p / params_d}
        data: dict[str, Any] = {
            "run": {
                "model": self.info.get("model") or type(self.template).__name__, "data": self.info.get("data"),
                "target": self.target.name, "method": self.config.method, "budget": b.describe(),
                "command": self.info.get("command"), "seconds": seconds, "config": self.fingerprint(),
            },
            "requested": {b.kind: b.value},
            "achieved": achieved,
            self.task.metric: {"dense": self.state.acc.get("dense"), "pruned": self.state.acc.get("pruned"),
                         "after_projection": proj["accuracy_after"], "before_projection": proj["accuracy_before"],
                         **({"before_average": self.state.acc["before_average"]}
                            if self.state.acc.get("before_average") is not None else {})},
            "params": {"dense": params_d, "pruned": params_p},
            "flops": {"dense": flops_d, "pruned": flops_p, "unit": "multiply-accumulates per sample (conv + linear)"},
            "projection": proj,
            "onnx": {"max_abs_diff": diff, "checked_inputs": n_checked, "file": "model.onnx"},
            "target": {"name": self.target.name, "device": self.target.device.name, "local": self.target.is_local},
            "throughput": throughput_section(self.state.history, self.dist.world, self.config.train.num_workers),
            "env": _env(),
        }
        if blocks is None and self.dense_layers:
            data["full_width_layers"] = self.dense_layers  # conv/linear layers whose outputs stay, with why
        if blocks is not None:
            data["blocks"] = blocks
            data["params"]["counted"] = data["flops"]["counted"] = "weights in kept blocks (a block plan keeps dense shapes)"
        data.update(self.task.report(dense, self.model))
        latency = latencies[0] if latencies else None
        if latency is not None:
            data["latency_ms"] = {"dense": latency.stats["dense"].median_ms, "pruned": latency.stats["pruned"].median_ms}
            data["latency"] = latency_section(latency)
            ms_d, ms_p = data["latency_ms"]["dense"], data["latency_ms"]["pruned"]
            if b.spec.cost == "latency":
                achieved["latency"], achieved["speedup"] = ms_p, ms_d / ms_p
        predicted = proj.get("predicted_latency_ms")
        if predicted is not None:
            same_session = narrowest = None
            if latency is not None and "narrowest" in latency.stats and self._latency is not None:
                same_session, narrowest = self._same_session_prediction, latency.stats["narrowest"].median_ms
            data["latency_model"] = latency_model_check(predicted, self.budget().value, self._latency_info(),
                                                        data.get("latency_ms"), same_session, narrowest)
            if self.state.latency_loop:
                data["latency_model"]["loop"] = self.state.latency_loop
            if b.spec.measure == "relative":
                data["requested"]["latency_ms"] = self.budget().value
        if len(latencies) > 1:
            data["latency_by_batch"] = latency_by_batch(latencies)
        return Report(data, layer_table(dense, self.model), self.state.history)


# The cost model each budget kind is measured in (BudgetKind.cost), built for a run's model and groups.
COSTS: dict[str, Callable[[_Run, nn.Module, list], Any]] = {
    "flops": lambda run, model, groups: flops_model(model, as_args(run.example), groups),
    "params": lambda run, model, groups: params_model(model, groups),
    "latency": _Run.latency_cost,
}

