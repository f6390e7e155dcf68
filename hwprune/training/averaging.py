"""Weight averaging over the end of the fine-tune (stochastic weight averaging, Izmailov et al.,
UAI 2018, "Averaging weights leads to wider optima and better generalization").

The fine-tune's last steps wander around a minimum; the mean of the weights they visit usually sits
nearer its centre than any one of them. :class:`WeightAverage` keeps that mean (every floating-point
parameter, equal weight per step) and copies it into the model at the end; BatchNorm's running
statistics belong to no single step, so the caller re-estimates them afterwards.

Example:
    >>> import torch
    >>> m = torch.nn.Linear(1, 1, bias=False)
    >>> avg = WeightAverage()
    >>> for w in (1.0, 2.0, 6.0):
    ...     _ = m.weight.data.fill_(w)
    ...     avg.update(m)
    >>> avg.count, avg.copy_to(m), m.weight.item()
    (3, None, 3.0)
"""

from __future__ import annotations

import torch
from torch import nn


class WeightAverage:
    """The running mean of a model's floating-point parameters, one sample per :meth:`update`."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Add the model's current parameters to the mean (mean += (p - mean) / n: no sum that grows)."""
        self.count += 1
        for name, p in model.named_parameters():
            if not p.is_floating_point():
                continue
            if name not in self.mean:
                self.mean[name] = p.detach().clone()
            else:
                self.mean[name].add_(p.detach() - self.mean[name], alpha=1.0 / self.count)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the mean (nothing to do before the first update)."""
        if not self.count:
            return
        params = dict(model.named_parameters())
        wrong = sorted(k for k, v in self.mean.items() if k not in params or params[k].shape != v.shape)
        if wrong:
            raise ValueError(f"the weight average holds parameters the model lacks or shapes it differs in: "
                             f"{', '.join(wrong[:5])} (an average from another model)")
        for name, value in self.mean.items():
            params[name].copy_(value)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": {k: v.clone() for k, v in self.mean.items()}}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.count = int(state.get("count", 0))
        self.mean = {k: v.clone() for k, v in (state.get("mean") or {}).items()}


def first_averaged_step(total_steps: int, fraction: float) -> int | None:
    """The first step whose weights enter the average when the last ``fraction`` of ``total_steps`` is
    averaged (at least the last step), or None when ``fraction`` is 0 (averaging off).

    Example:
        >>> first_averaged_step(96, 0.5), first_averaged_step(96, 0.01), first_averaged_step(96, 0.0)
        (48, 95, None)
    """
    if fraction <= 0 or total_steps <= 0:
        return None
    return max(0, min(total_steps - 1, total_steps - int(round(fraction * total_steps))))
