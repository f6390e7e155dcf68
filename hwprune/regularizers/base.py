"""The regularizer interface and its registry.

A method is a config dataclass (its hyper-parameters, with defaults that work on the built-in models)
plus one :class:`Regularizer` implementation. The pipeline drives it through one lifecycle:

* ``attach(resumed)`` once the regularized stage starts (or resumes): install gates, auxiliary masks, or
  rescale parameters (methods that need nothing leave it empty);
* ``calibrate(forward)`` right after, for methods with ``calibrates = True``: statistics of real
  inputs (``forward(n)`` runs ``n`` training inputs through the model, no gradients);
* per step: ``loss = task_loss + reg.penalty()``, ``optimizer.step()``, ``reg.after_step(lr, step)``
  (proximal operators, clamps, auxiliary updates);
* between steps a :class:`StrengthController` reads ``reg.zero_fraction()`` and moves
  ``reg.strength`` along the sparsity schedule (methods with ``solves_strength`` do it themselves);
* ``reg.project(groups, budget, cost)`` chooses the kept units (default: lowest ``scores()`` go);
* ``reg.finalize(groups, keep)`` just before masking and slicing: fold gates or constants into the
  remaining weights, remove hooks. After it the model is a plain model again.

Lifecycle flags: ``trains = False`` skips the regularized epochs (one-shot methods such as
magnitude pruning, whose fine-tuning gets those epochs instead); ``from_scratch = True`` re-initializes
the sliced model and trains it for all epochs (the uniform-width baseline).

A regularizer never slices or masks the model itself.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import HwpruneError
from ..graph.groups import UnitIndex


@dataclass
class RegContext:
    """What a regularizer may use: the model, its unit index, and the budget expressed in units."""

    model: nn.Module
    index: UnitIndex
    keep_units: int  # units the budget keeps (k of WGSEF)
    unit_costs: np.ndarray | None = None  # marginal cost of each unit (FLOPs / latency), for weighting
    total_steps: int = 1
    schedule: "SparsitySchedule | None" = None  # wanted fraction of zero units at each step
    planned_keep: list[int] | None = None  # per prunable group: the kept count the allocation plans now


class Regularizer:
    """Base class. Subclasses set ``name`` and ``Config`` and override what they need."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]

    def __init__(self, config, ctx: RegContext):
        self.config = config
        self.ctx = ctx
        self.index = ctx.index
        self.strength = float(getattr(config, "strength", 0.0))

    # --- training hooks -----------------------------------------------------------------------
    def penalty(self) -> torch.Tensor | None:
        """A differentiable term added to the loss, or None."""
        return None

    # Methods that compute, each step, the strength that meets ``ctx.schedule`` set this to True;
    # the others are steered by a StrengthController.
    solves_strength: ClassVar[bool] = False
    # Largest factor the StrengthController may change the strength by per interval: methods whose
    # control_value answers at once can afford fast moves; a delayed answer calls for calm ones.
    controller_max_step: ClassVar[float] = 1.4
    trains: ClassVar[bool] = True  # False: no regularized epochs (one-shot pruning)
    calibrates: ClassVar[bool] = False  # True: needs forward passes over training data before scoring
    from_scratch: ClassVar[bool] = False  # True: re-initialize the sliced model and train it anew

    def attach(self, resumed: bool = False) -> None:
        """Install what the method needs on the model (gates, masks, hooks). ``resumed``: the model's
        weights come from a checkpoint taken after a previous ``attach``, so one-time transformations
        of the weights (rescaling) must not be applied again; hooks are installed either way."""

    def calibrate(self, forward) -> None:
        """Measure what the method needs on real inputs before scoring (``calibrates = True`` only):
        ``forward(n)`` runs ``n`` training inputs through the model without gradients."""

    def finalize(self, groups, keep: dict[str, np.ndarray]) -> None:
        """Before masking and slicing: fold gates/constants into the kept weights, remove hooks."""

    # The allocation policy (hwprune.budget.allocation) a run uses with this method unless --allocation says
    # otherwise: the global solver for most; methods whose scores are built to be compared across
    # layers (fluctuation's standardised scores) keep ``learned``.
    default_allocation: ClassVar[str] = "global"
    allocation_fixed: ClassVar[bool] = False  # True: the method is its allocation (a width multiplier)

    @classmethod
    def check_allocation(cls, config, policy: str) -> None:
        """Refuse an allocation policy this method's ``config`` cannot be projected with (a
        :class:`~hwprune.errors.HwpruneError`); called by :meth:`project` and, before any training, by
        :class:`~hwprune.training.config.FitConfig` for ``--allocation``. Every policy works by default."""

    def project(self, groups, budget, cost=None, allocation=None, sensitivity=None, share_cost=None):
        """The units to keep for ``budget``: ``allocation`` (default :attr:`default_allocation`)
        decides each group's kept count, and within a group the lowest :meth:`scores` go first."""
        from ..budget import project

        return project(groups, self.scores(), budget, cost, allocation=allocation or self.default_allocation,
                       sensitivity=sensitivity, share_cost=share_cost)

    def param_groups(self) -> list[dict]:
        """Optimizer groups with special settings for existing model parameters, e.g.
        ``[{"params": [gamma], "momentum": 0.0}]``; those parameters leave the default groups."""
        return []

    def after_step(self, lr: float, step: int) -> None:
        """Called after every optimizer step (proximal operators and clamps go here)."""

    def extra_parameters(self) -> list[dict]:
        """Optimizer parameter groups the method adds (e.g. auxiliary masks)."""
        return []

    def no_weight_decay(self) -> list[torch.Tensor]:
        """Tensors that must not get plain weight decay (it would fight the regularizer)."""
        return self.index.producer_tensors()

    # --- measurements -------------------------------------------------------------------------
    def unit_norms(self) -> torch.Tensor:
        return self.index.sq_norms().clamp_min(0).sqrt()

    def scores(self) -> np.ndarray:
        """Importance of each unit; the projection removes low scores first."""
        return self.unit_norms().double().cpu().numpy()

    def zero_fraction(self) -> float:
        """Fraction of units the method has already removed (exact zeros for proximal methods)."""
        return float((self.unit_norms() == 0).double().mean()) if self.index.n_units else 0.0

    def control_value(self) -> float:
        """What the StrengthController steers along the schedule (same units as the schedule's target).
        Default: :meth:`zero_fraction`. Subgradient methods, whose units only approach zero, return
        :func:`separation_progress` instead: it answers the strength at once, a count of near-zero
        units only after a delay, and a delayed answer makes the controller overshoot."""
        return self.zero_fraction()

    # --- state (checkpoints) ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"strength": self.strength}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strength = float(state["strength"])


def separation(scores: np.ndarray, keep: int) -> float:
    """Mean score of the units the budget removes (the smallest) over the median score of the units it
    keeps: 1 when all units look alike, 0 when the removed ones are exactly zero."""
    n = len(scores)
    keep = max(1, min(int(keep), n))
    if keep >= n:
        return 0.0
    s = np.sort(np.asarray(scores, dtype=np.float64))
    ref = float(np.median(s[n - keep:]))
    return float(np.mean(s[: n - keep]) / ref) if ref > 0 else 0.0


class SeparationProgress:
    """``target · (1 − r / r0)``, clipped to [0, target], with r the :func:`separation` now and r0 at
    the start: how far the units the budget removes have been pushed towards zero, in the schedule's
    units. It moves as soon as the strength acts."""

    def __init__(self, target: float, keep: int):
        self.target, self.keep, self.r0 = target, keep, None

    def __call__(self, scores: np.ndarray) -> float:
        r = separation(scores, self.keep)
        if self.r0 is None:
            self.r0 = max(r, 1e-12)
        return float(min(self.target, max(0.0, self.target * (1.0 - r / self.r0))))


class MinWidthGuard:
    """The ``min_keep`` highest-scoring units of every group: no regularizer may zero them.

    A hardware minimum width is part of the feasible set: without this guard a strong regularizer can
    zero a whole residual stream, and the network cannot recover (a zero channel gets no gradient).
    """

    def __init__(self, index: UnitIndex):
        self.group_id = torch.as_tensor(index.group_of_unit(), dtype=torch.long)
        self.min_keep = torch.as_tensor([g.min_keep for g in index.groups], dtype=torch.long)
        self.offsets = torch.as_tensor(index.offsets[:-1], dtype=torch.long)
        self.count = int(self.min_keep.sum())

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Boolean per unit: True for the protected ones (ties broken by index)."""
        s = scores.detach().double().cpu()
        order = np.lexsort((-s.numpy(), self.group_id.numpy()))
        order_t = torch.as_tensor(order, dtype=torch.long)
        rank = torch.empty_like(order_t)
        rank[order_t] = torch.arange(len(order_t)) - self.offsets[self.group_id[order_t]]
        return (rank < self.min_keep[self.group_id]).to(scores.device)


REGISTRY: dict[str, type[Regularizer]] = {}


def register(cls: type[Regularizer]) -> type[Regularizer]:
    """Class decorator: make a method selectable by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in REGISTRY:
        raise ValueError(f"regularizer '{cls.name}' is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def make_config(name: str, overrides: dict[str, Any] | None = None):
    """The config of method ``name`` with ``overrides`` applied; unknown names and keys are errors.

    Example:
        >>> make_config("wgsef", {"weighting": "uniform"}).weighting
        'uniform'
    """
    if name not in REGISTRY:
        raise HwpruneError(f"unknown method '{name}'; available: {', '.join(sorted(REGISTRY))}")
    cfg_cls = REGISTRY[name].Config
    valid = {f.name: f for f in dataclasses.fields(cfg_cls)}
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise HwpruneError(f"method '{name}' has no setting {', '.join(unknown)}; "
                           + (f"its settings: {', '.join(valid)}" if valid else "it has no settings"))
    defaults = cfg_cls()
    for key, value in overrides.items():
        problem = _type_problem(getattr(defaults, key), value, str(valid[key].type))
        if problem:
            raise HwpruneError(f"{name} {key} {value!r}: {problem}")
    try:
        return cfg_cls(**overrides)
    except (TypeError, ValueError) as e:
        raise HwpruneError(f"method '{name}': {e}") from None


def _type_problem(default, value, annotation: str = "") -> str | None:
    """Why ``value`` cannot stand where the setting's default is ``default`` (None when it can): numbers
    must be finite numbers, switches true/false, names words. A setting whose default is None (chosen
    by the method) takes None or what its annotation names.

    Example:
        >>> _type_problem(1e-4, "abc"), _type_problem(1e-4, float("nan")), _type_problem(1e-4, 3)
        ('expected a number', 'expected a finite number', None)
        >>> _type_problem(None, "abc", "float | None"), _type_problem(None, None, "float | None")
        ('expected a number', None)
    """
    import math

    if default is None:
        if value is None:
            return None
        if "float" in annotation or "int" in annotation:
            default = 0.0 if "float" in annotation else 0
        else:
            return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "expected true or false"
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "expected a number"
        if not math.isfinite(value):
            return "expected a finite number"
        if isinstance(default, int) and not isinstance(default, bool) and int(value) != value:
            return "expected a whole number"
        return None
    if isinstance(default, str) and not isinstance(value, str):
        return "expected a word (one of the names the setting takes)"
    return None


def build_regularizer(name: str, ctx: RegContext, overrides: dict[str, Any] | None = None) -> Regularizer:
    """Instantiate a registered method on a model's units."""
    config = make_config(name, overrides)
    return REGISTRY[name](config, ctx)


@dataclass
class SparsitySchedule:
    """The fraction of units that should be zero at each step: a linear ramp from 0 to ``target``
    over the first ``ramp`` of the regularized steps, then flat. Gradual, so the network adapts."""

    target: float
    total_steps: int
    ramp: float = 0.6

    def wanted(self, step: int) -> float:
        horizon = max(1.0, self.ramp * self.total_steps)
        return self.target * min(1.0, step / horizon)


@dataclass
class StrengthController:
    """Steers the strength of a method that cannot solve for it, along a :class:`SparsitySchedule`.

    Every ``interval`` steps the strength is multiplied by ``exp(gain · (wanted − current) / target)``,
    clipped to [0.7, 1.4]: behind schedule it grows, ahead it shrinks. The clip limits wind-up: sparsity
    answers the strength with a delay, and a controller that doubles while waiting overshoots (seen
    with slimming: the strength went from 1e-4 to 10 and the network collapsed). No grid search.
    """

    schedule: SparsitySchedule
    interval: int = 10
    gain: float = 2.0
    max_step: float = 1.4
    min_strength: float = 1e-8
    max_strength: float = 1e4
    history: list = field(default_factory=list)
    loss_ref: float | None = None  # the task loss when regularization started
    loss_ema: float | None = None

    def update(self, step: int, current: float, strength: float, loss: float | None = None) -> float:
        """The strength for the next steps. ``loss``: this step's task loss (the harm guard's input)."""
        if loss is not None and math.isfinite(loss):
            self.loss_ema = loss if self.loss_ema is None else 0.9 * self.loss_ema + 0.1 * loss
            if self.loss_ref is None and step >= self.interval:
                self.loss_ref = self.loss_ema
        target = self.schedule.target
        if target <= 0 or step % self.interval:
            return strength
        error = (self.schedule.wanted(step) - current) / target
        factor = min(self.max_step, max(1.0 / self.max_step, math.exp(self.gain * error)))
        if self.loss_ref is not None and self.loss_ema is not None:
            # Do no harm: the strength rises only as far as the task tolerates. Past 1.5x the starting
            # loss (+0.02) it stops rising; past twice that it halves (slimming at s = 8 collapsed the
            # network to chance without this guard).
            limit = 1.5 * self.loss_ref + 0.02
            if self.loss_ema > 2 * limit:
                factor = min(factor, 0.5)
            elif self.loss_ema > limit:
                factor = min(factor, 1.0)
        new = min(self.max_strength, max(self.min_strength, strength * factor))
        self.history.append((step, current, new))
        return new

    def state_dict(self) -> dict:
        return {"history": [list(h) for h in self.history], "loss_ref": self.loss_ref, "loss_ema": self.loss_ema}

    def load_state_dict(self, state: dict) -> None:
        self.history = [tuple(h) for h in state.get("history", [])]
        self.loss_ref, self.loss_ema = state.get("loss_ref"), state.get("loss_ema")
