"""The task interface the pipeline trains, evaluates and exports through.

A task owns the data and knows what the model computes. The pipeline calls:

* ``example``: inputs to discover groups, count FLOPs and export with (a tensor or a tuple);
* ``steps_per_epoch(settings)`` and ``train_epoch(...)``: one epoch of the task's loss, with the
  regularizer's hooks after every step (see :func:`hwprune.training.loop.train_epoch`);
* ``evaluate(model)``: the quality measure on held-out data, higher is better (``metric`` names it);
* ``recalibrate(model, ...)``: refresh statistics a pruned model needs (BatchNorm), or nothing;
* ``calibration_forward(model, n, seed)``: run ``n`` training inputs through the model, no gradients
  (for methods that score units by what the layers see, e.g. ``fluctuation``);
* ``export_onnx`` / ``onnx_max_abs_diff`` / ``latency_feeds``: the exported model, its check against
  torch, and inputs to time it with;
* ``report(dense, pruned)``: extra measurements for ``report.json`` (may be empty).

Example:
    >>> task = ClassificationTask(data.train, data.test)          # doctest: +SKIP
    >>> hwprune.fit(model, task, target="host-cpu", sparsity=0.5)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from typing import Any, Callable

from torch import nn


class Task:
    """Base class; see the module docstring for what each method is for."""

    name: str = "task"
    metric: str = "accuracy"  # the quality measure ``evaluate`` returns (higher is better)
    metric_label: str = "test acc"
    example: Any = None  # a tensor or a tuple of tensors
    latency_batch_sizes: tuple[int, ...] | None = None  # None: the target's batch size
    default_distill: float = 0.0  # weight of the dense teacher in the fine-tune's loss (FitConfig.distill)

    def steps_per_epoch(self, settings) -> int:
        raise NotImplementedError

    def train_epoch(self, model: nn.Module, optimizer, *, settings, seed: int, stage: str, epoch: int,
                    lr_at: Callable[[int], float], step0: int, regularizer=None, on_step=None, device="cpu",
                    after_backward=None, teacher=None):
        """One epoch; ``on_step(step, loss)`` after every step with its task loss, ``after_backward()``
        between the backward pass and the optimizer step (see :func:`hwprune.training.loop.train_epoch`);
        ``teacher``: a :class:`~hwprune.tasks.classification.Distillation` (classification only)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> float | None:
        return None

    def recalibrate(self, model: nn.Module, settings, seed: int, device="cpu") -> None:
        """Nothing to refresh by default."""

    def calibration_forward(self, model: nn.Module, samples: int, seed: int, device="cpu") -> None:
        """Run ``samples`` training inputs (a seeded choice, the same on every rank) through ``model``
        in evaluation mode without gradients; hooks on the model see them."""
        from ..errors import HwpruneError

        raise HwpruneError(f"the {self.name} task cannot run calibration passes; choose a method that does not need them")

    def probe_loss(self, model: nn.Module, seed: int, device="cpu") -> float:
        """The task loss on a fixed sample of training inputs, in evaluation mode (the ``sensitivity``
        allocation's probe)."""
        from ..errors import HwpruneError

        raise HwpruneError(f"the {self.name} task cannot measure sensitivity curves; use --allocation global")

    def make_optimizer(self, model: nn.Module, settings, no_decay=(), extra_groups=(), special_groups=()):
        from ..training.loop import make_optimizer

        return make_optimizer(model, settings, no_decay, extra_groups, special_groups)

    def export_onnx(self, model: nn.Module, path: str | os.PathLike) -> None:
        raise NotImplementedError

    def onnx_max_abs_diff(self, path: str | os.PathLike, model: nn.Module) -> tuple[float, int]:
        """(largest |onnxruntime - torch| over the check inputs, number of inputs checked)."""
        raise NotImplementedError

    def latency_feeds(self, session, batch_size: int):
        """onnxruntime feeds for timing, or None for random normal inputs of the model's input shape."""
        return None

    def report(self, dense: nn.Module, pruned: nn.Module) -> dict[str, Any]:
        return {}


def as_args(example) -> tuple:
    """An example input as a tuple of positional arguments."""
    return example if isinstance(example, tuple) else (example,)

