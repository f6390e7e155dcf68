"""Adapting λ of scale-factor methods along the sparsity schedule without overshooting.

Polarization and Ye et al.'s ISTA push BatchNorm scales towards zero, AutoPrune its masks below zero. Their zero count answers λ
late: a factor has to fall all the way first, which takes about 1/(η·λ) steps. A controller that only
watches the count keeps raising λ during that fall, and on a well-trained network (whose loss barely
defends any factor) whole layers then reach zero together: in a measured run the generic
StrengthController raised polarization's λ 16-fold while the first factors fell, and every factor of
the network collapsed to zero. :class:`PacedController` also watches how fast the factors fall and
holds the fall to a pace at which the loss can still choose which factors to keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import SparsitySchedule


@dataclass
class SpeedMeter:
    """How fast the alive factors fall: the ``quantile`` (0.9: the fastest tenth) of
    ``(|v_prev| − |v|)/scale`` over the factors above ``alive_above``, smoothed over a few steps.

    Example:
        >>> m = SpeedMeter(scale=1.0)
        >>> m.update(torch.tensor([1.0, 0.5])); round(m.update(torch.tensor([0.9, 0.45])), 3)
        0.0
        0.029
    """

    scale: float = 1.0
    quantile: float = 0.9
    smoothing: float = 0.3
    value: float = 0.0
    _prev: torch.Tensor | None = None

    def state_dict(self) -> dict:
        return {"value": self.value, "prev": self._prev, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.value, self._prev, self.scale = float(state["value"]), state["prev"], float(state["scale"])

    def update(self, values: torch.Tensor, alive_above: float = 0.0) -> float:
        v = values.detach().abs().double().cpu()
        prev, self._prev = self._prev, v.clone()
        if prev is None or prev.shape != v.shape:
            return self.value
        alive = prev > alive_above
        if bool(alive.any()):
            fall = float(torch.quantile((prev - v)[alive] / self.scale, self.quantile))
            self.value = (1 - self.smoothing) * self.value + self.smoothing * fall
        return self.value


@dataclass
class PacedController:
    """λ along a :class:`~hwprune.regularizers.base.SparsitySchedule`, at a bounded pace.

    Every ``interval`` steps, with error = (wanted − current)/target: λ × exp(gain·error), at most
    doubled and at least halved (behind the schedule it grows, ahead it shrinks); but if the factors
    fall faster than ``max_speed`` (see :class:`SpeedMeter`), λ × max_speed/speed instead.

    Example:
        >>> c = PacedController(SparsitySchedule(0.5, 100), max_speed=0.01)
        >>> c.update(10, 0.0, 1.0, speed=0.0) > 1.0, c.update(20, 0.0, 1.0, speed=0.02)
        (True, 0.5)
    """

    schedule: SparsitySchedule
    max_speed: float
    interval: int = 5
    gain: float = 1.0

    @classmethod
    def for_schedule(cls, schedule: SparsitySchedule) -> "PacedController":
        """A factor may take no less than half the schedule's ramp to fall from its scale to zero."""
        ramp = max(1.0, schedule.ramp * schedule.total_steps)
        return cls(schedule, max_speed=2.0 / ramp)

    def update(self, step: int, current: float, strength: float, speed: float = 0.0) -> float:
        target = self.schedule.target
        if target <= 0 or step % self.interval:
            return strength
        if speed > self.max_speed:
            return strength * max(0.5, self.max_speed / speed)
        error = (self.schedule.wanted(step) - current) / target
        return strength * min(2.0, max(0.5, math.exp(self.gain * error)))
