"""Why a layer is not pruned: never a silent "no prunable groups".

After discovery every conv and linear layer is in one of three states: its output channels are units
of a prunable group; they are units of a blocked group (the group says why: the model output, an
excluded layer, an op that mixes channels); or no group reached them at all (the walk lost the
channels before the layer, or read its weight through an op it does not follow). This module turns
the groups and the walk's notes into one reason per layer that keeps its width, with what to do.

Example:
    >>> from hwprune.graph import discover_groups
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    >>> groups = discover_groups(net, torch.zeros(1, 3, 8, 8))
    >>> groups.unpruned
    {'2': 'its output is the model output'}
"""

from __future__ import annotations

import torch  # noqa: F401  (the doctest uses it)
from torch import nn

from .groups import NORMALIZED, PRODUCER

_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, nn.Linear)


class GroupList(list):
    """The groups :func:`~hwprune.graph.discover_groups` found, plus ``unpruned``: every conv or linear
    layer whose output channels stay, mapped to why (see :func:`unpruned_layers`)."""

    unpruned: dict[str, str]


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Layers with a weight matrix: the standard ones, and any module of the user's own whose
    ``weight`` parameter has two or more dimensions."""
    out = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, _WEIGHT_LAYERS) or (isinstance(w, nn.Parameter) and w.dim() >= 2
                                             and not isinstance(m, nn.Embedding)):
            out[name] = m
    return out


MODEL_OUTPUT = "its output is the model output"  # the reason every classifier's last layer has


def _reason(blocked: str) -> str:
    return MODEL_OUTPUT if blocked == "model output" else blocked


def unpruned_layers(model: nn.Module, groups: list, notes: dict[str, str] | None = None,
                    excluded: set[str] = frozenset()) -> dict[str, str]:
    """``{layer: why its output channels are kept}`` for every conv/linear layer not in a prunable group.

    ``notes`` are the walk's per-layer remarks (an op that read the layer's weight and that hwprune
    does not follow); ``excluded`` the user's excluded layers: each is listed once, as excluded (its insides
    are not listed one by one).
    """
    notes = notes or {}
    state: dict[str, tuple[bool, str | None]] = {}  # layer -> (in a prunable group, why not)
    for g in groups:
        if g.prunable:
            why = None
        elif g.blocked:
            why = _reason(g.blocked)
        else:  # not blocked, yet nothing to remove: the hardware multiple covers the whole group
            why = (f"its {g.size} {g.kind} fit in one hardware multiple ({g.multiple} for "
                   f"{'/'.join(sorted(g.layer_kinds)) or 'this layer'} in the target): nothing can be removed")
        for m in g.members:
            if m.role in (PRODUCER, NORMALIZED):  # the layer's own outputs
                ok, first = state.get(m.module, (False, None))
                state[m.module] = (ok or g.prunable, first or why)
    out = {}
    for name, layer in _weight_layers(model).items():
        if any(name == e or name.startswith(e + ".") for e in excluded):
            continue
        ok, why = state.get(name, (False, None))
        if ok:
            continue
        if why is not None:
            out[name] = why
        elif name in notes:
            out[name] = notes[name]
        else:
            out[name] = ("no channel reaches it: it is not called in the traced forward, or an op before it "
                         "lost the channels (run discover_groups on the model to see the groups)")
    weights = _weight_layers(model)
    for e in sorted(excluded):  # the user's own choice is a reason too; without it "nothing prunable" reads like a bug
        if any(name == e or name.startswith(e + ".") for name in weights):
            out[e] = "excluded with --exclude (it keeps its channels; stop excluding it to prune it)"
    return out


def explain(unpruned: dict[str, str], limit: int = 12) -> str:
    """The per-layer reasons as indented lines, most common reason first; for error messages.

    Example:
        >>> print(explain({"fc": "its output is the model output", "c1": "excluded layer 'c1'"}))
          - fc: its output is the model output
          - c1: excluded layer 'c1'
    """
    lines = [f"  - {layer}: {why}" for layer, why in list(unpruned.items())[:limit]]
    if len(unpruned) > limit:
        lines.append(f"  - ... and {len(unpruned) - limit} more")
    return "\n".join(lines)
