"""``FitConfig``: everything that decides the result of a run, checked before any work and compared
on resume (its :meth:`FitConfig.fingerprint` is stored in every checkpoint).

Example:
    >>> from hwprune.budget import Budget
    >>> FitConfig(budget=Budget("flops", 0.5), allocation="uniform").allocation_config().policy
    'uniform'
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..apply.granularity import granularity
from ..budget import KINDS, Budget
from ..errors import BudgetError, HwpruneError
from .loop import TrainSettings


@dataclass
class FitConfig:
    """Everything that decides the result of a run (compared on resume)."""

    budget: Budget
    method: str | None = None  # None: the granularity's default (gradual for channels, wgsef for blocks)
    method_options: dict[str, Any] = field(default_factory=dict)
    epochs_dense: int = 15
    epochs_regularize: int = 15
    epochs_finetune: int = 10
    finetune_lr_scale: float = 0.4
    # the regularized stage's peak learning rate, as a fraction of TrainSettings.lr
    regularize_lr_scale: float = 1.0
    train: TrainSettings = field(default_factory=TrainSettings)
    seed: int = 0
    exclude: tuple[str, ...] = ()
    latency_batch_size: int | None = None
    latency_repeats: int | None = None
    granularity: str = "channels"  # or "blocks": weight blocks of the target's block shape
    latency_runtime: str | None = None  # "onnxruntime" (default here) or "tvm" (always on an RPC device)
    profile: str | None = None  # latency profile for a latency budget (default: the target's)
    # how many units each group keeps (hwprune.budget.allocation); None: the method's default (global for most)
    allocation: str | None = None
    allocation_options: dict[str, Any] = field(default_factory=dict)  # floor / cap
    # Knowledge distillation while fine-tuning a classifier: the loss is (1 - a)·CE + a·T²·KL(teacher ‖
    # student) with the dense model as teacher, a = ``distill``, T = ``distill_temperature``. None: the
    # task's default (Task.default_distill: see docs/benchmarks.md for what decided it).
    distill: float | None = None
    distill_temperature: float = 4.0
    # distill on changed images (Distillation.mixup, .shift, .flip): mixed pairs, lam ~ Beta(a, a) for a > 0;
    # moved by up to this many pixels; mirrored left-right. Off by default (docs/benchmarks.md measured them).
    distill_mixup: float = 0.0
    distill_shift: int = 0
    distill_flip: bool = False
    # average the weights over this last fraction of the fine-tune's steps, then re-estimate BatchNorm
    # (stochastic weight averaging; hwprune.training.averaging). 0: off.
    finetune_average: float = 0.0

    def __post_init__(self):
        unit = granularity(self.granularity)  # an unknown name is refused here
        if self.method is None:
            self.method = unit.default_method
        if self.allocation is not None or self.allocation_options:
            self.allocation_config()  # unknown names and options are refused before any work
            from ..regularizers.base import REGISTRY

            method_cls = REGISTRY.get(self.method)
            if (method_cls is not None and method_cls.allocation_fixed
                    and self.allocation not in (None, method_cls.default_allocation)):
                raise HwpruneError(f"--method {self.method} is a width multiplier: it takes no --allocation "
                                   f"{self.allocation} (use --method magnitude --allocation {self.allocation} to prune "
                                   "by score)")
            if method_cls is not None and self.allocation is not None:  # refused now, not after the dense epochs
                from ..regularizers.base import make_config

                method_cls.check_allocation(make_config(self.method, self.method_options), self.allocation)
            # The curves are measured at the regularized stage's start (budget/sensitivity.py refuses block
            # groups there): refused here, not after the dense epochs have been trained.
            if self.allocation == "sensitivity" and unit.sparse:
                raise HwpruneError(f"--allocation sensitivity works on channels, neurons and heads, not weight blocks; "
                                   f"use --allocation learned or global with --granularity {unit.name}")
        if self.distill is not None and not (isinstance(self.distill, (int, float)) and 0.0 <= self.distill <= 1.0):
            raise HwpruneError(f"--distill {self.distill!r}: expected the weight of the teacher's loss, in [0, 1]")
        for name in ("finetune_lr_scale", "regularize_lr_scale"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise HwpruneError(f"FitConfig.{name} {value!r}: expected a positive fraction of the learning rate")
        if not (isinstance(self.distill_mixup, (int, float)) and 0 <= self.distill_mixup < float("inf")):
            raise HwpruneError(f"--distill-mixup {self.distill_mixup!r}: expected the Beta(a, a) concentration of the "
                               "mixing weight, a number >= 0 (0 turns mixing off; 1 mixes uniformly)")
        if not (isinstance(self.finetune_average, (int, float)) and 0.0 <= self.finetune_average <= 1.0):
            raise HwpruneError(f"--finetune-average {self.finetune_average!r}: expected the fraction of the fine-tune's "
                               "last steps whose weights are averaged, in [0, 1] (0 turns averaging off)")
        if not (isinstance(self.distill_shift, int) and self.distill_shift >= 0):
            raise HwpruneError(f"--distill-shift {self.distill_shift!r}: expected a whole number of pixels >= 0 "
                               "(0 turns moving off)")
        if not (isinstance(self.distill_temperature, (int, float)) and self.distill_temperature > 0):
            raise HwpruneError(f"--distill-temperature {self.distill_temperature!r}: expected a positive number")
        if unit.budget_kinds is not None and self.budget.kind not in unit.budget_kinds:
            raise BudgetError(f"{self.budget.spec.flag} with --granularity {unit.name}: a {unit.noun} run takes "
                              f"{' or '.join(KINDS[k].flag for k in unit.budget_kinds)} (the fraction of weight blocks "
                              "removed); FLOPs and parameter budgets work on channels")

    def allocation_config(self, default: str = "global"):
        """The :class:`~hwprune.budget.allocation.AllocationConfig` of this run (``default``: the method's)."""
        from ..budget.allocation import AllocationConfig

        return AllocationConfig.from_options(self.allocation or default, self.allocation_options)

    def fingerprint(self) -> dict[str, Any]:
        d = asdict(self)
        d["budget"] = {"kind": self.budget.kind, "value": self.budget.value}
        d["exclude"] = list(self.exclude)
        # settings added after runs existed are left out at their defaults, so those runs resume unchanged
        for key, default in (("granularity", "channels"), ("allocation", None), ("allocation_options", {}),
                             ("distill", None), ("distill_temperature", 4.0), ("distill_mixup", 0.0),
                             ("distill_shift", 0), ("distill_flip", False), ("finetune_average", 0.0)):
            if d[key] == default:
                del d[key]
        return json.loads(json.dumps(d, default=str))
