"""Reloading a sliced model from its weights alone: resize a fresh model to the saved widths.

A sliced model's ``state_dict`` says how wide every layer is. :func:`resize_like` rediscovers the
groups of a freshly built (dense) model and slices each one to the width the saved tensors have, so
that ``load_state_dict`` fits. Which units are kept does not matter (the weights are loaded right
after); only the count does. A plan is not needed, and the same call serves CNNs, ViTs and
transformers.

Example:
    >>> fresh = build_vit()                                           # doctest: +SKIP
    >>> load_sliced(fresh, torch.load("pruned.pt")["state_dict"], torch.zeros(1, 3, 32, 32))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from ..errors import PlanError


def _saved_count(group, state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """How many units of ``group`` the saved tensors keep (None when no member is in the file)."""
    for m in group.members:
        key = f"{m.module}.{m.param}" if m.module else m.param
        t = state_dict.get(key)
        if t is None or t.dim() <= m.dim:
            continue
        saved = int(t.shape[m.dim])
        # Keeping units 0..n-1 leaves every index whose unit is < n (and those of no unit, -1).
        alive = np.array([int((m.unit_of < n).sum()) for n in range(group.size + 1)])
        hits = np.flatnonzero(alive == saved)
        if len(hits) == 0:
            raise PlanError(f"'{key}' has {saved} entries along dim {m.dim}: no number of units of group "
                            f"'{group.name}' gives that width; the weights come from another architecture")
        return int(hits[0])
    return None


def resize_like(model: nn.Module, state_dict: Mapping[str, torch.Tensor], example_inputs=None, *,
                exclude=()) -> nn.Module:
    """Slice ``model`` (in place) so that every group has the width it has in ``state_dict``."""
    from ..graph import discover_groups
    from .slicing import slice_model

    groups = discover_groups(model, example_inputs, exclude=exclude)
    keep = {}
    for g in groups:
        if g.blocked is not None:
            continue
        n = _saved_count(g, state_dict)
        if n is not None and n < g.size:
            if n == 0:
                raise PlanError(f"group '{g.name}': the saved weights keep no unit")
            keep[g.name] = np.arange(n)
    return slice_model(model, groups, keep)


def load_sliced(model: nn.Module, state_dict: Mapping[str, torch.Tensor], example_inputs=None, *,
                exclude=(), strict: bool = True) -> nn.Module:
    """Resize a fresh ``model`` to the saved widths, then load the weights; returns the model."""
    resize_like(model, state_dict, example_inputs, exclude=exclude)
    model.load_state_dict(state_dict, strict=strict)
    return model
