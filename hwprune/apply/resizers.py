"""What slicing cannot know about a layer type: how to update its size attributes after its tensors
shrank (``out_channels``, ``num_heads``), and fix-ups that run on the whole model after a slice (a
transformer's head counts and config). Layer modules register here; :mod:`.slicing` reads it.

Example:
    >>> from torch import nn
    >>> @resizer(nn.Identity)
    ... def _nothing(m, old):
    ...     pass
    >>> find_resizer(nn.Identity()) is _nothing
    True
"""

from __future__ import annotations

from typing import Callable

from torch import nn

Resizer = Callable[[nn.Module, dict[str, tuple[int, ...]]], None]
RESIZERS: list[tuple[tuple[type, ...], Resizer]] = []
# Run on the whole model after every slice: for attributes that live above the sliced layers (a
# transformer attention block's head count, a model config). Registered by hwprune.apply.hf.
AFTER_SLICE: list[Callable[[nn.Module], None]] = []


def resizer(*types: type):
    """Register how a layer type updates its attributes after its tensors were sliced."""

    def deco(fn: Resizer) -> Resizer:
        RESIZERS.append((types, fn))
        return fn

    return deco


def after_slice(fn: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
    """Register a fix-up that runs on the whole model after slicing."""
    AFTER_SLICE.append(fn)
    return fn


def find_resizer(module: nn.Module) -> Resizer | None:
    """The first registered resizer whose layer types ``module`` is an instance of, or None."""
    for types, fn in RESIZERS:
        if isinstance(module, types):
            return fn
    return None
