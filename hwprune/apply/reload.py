"""Reloading a pruned model into PyTorch: from a run's ``pruned.pt`` (:func:`load_pruned`), or from a sliced
model's weights alone (:func:`load_sliced`).

``pruned.pt`` (what ``hwprune fit`` writes) holds the weights and the plan: :func:`load_pruned` replays the
plan onto a fresh copy of the dense architecture (sliced, or masked for a block run) and loads the weights.
Loading those weights straight into the dense model fails with "size mismatch": its layers are wider.

A sliced model's ``state_dict`` says how wide every layer is. :func:`resize_like` rediscovers the
groups of a freshly built (dense) model and slices each one to the width the saved tensors have, so
that ``load_state_dict`` fits. Which units are kept does not matter (the weights are loaded right
after); only the count does. A plan is not needed, and the same call serves CNNs, ViTs and
transformers.

Example:
    >>> pruned = load_pruned(build_model("small-resnet", in_channels=1, num_classes=10, input_size=8),
    ...                      "runs/demo")                             # doctest: +SKIP
    >>> fresh = build_vit()                                           # doctest: +SKIP
    >>> load_sliced(fresh, torch.load("pruned.pt")["state_dict"], torch.zeros(1, 3, 32, 32))  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, HwpruneError, PlanError


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
    from ..graph import discover_groups, hf
    from .slicing import slice_model

    if example_inputs is None and not hf.is_hf_model(model):  # a Hugging Face model is matched by pattern, not traced
        raise PlanError("resize_like/load_sliced: give example_inputs (an input of the model, e.g. "
                        "torch.zeros(1, 3, 32, 32)); the model is traced on it to find its groups")
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
    load_weights(model, state_dict, "the state_dict", strict=strict)
    return model


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, *, strict: bool = True) -> nn.Module:
    """``model.load_state_dict`` with a one-paragraph :class:`PlanError` naming ``source`` and the first key
    that does not fit (torch's own message lists every key on many lines)."""
    if not isinstance(state_dict, Mapping):
        raise PlanError(f"{source}: expected a state_dict (parameter name -> tensor), found {type(state_dict).__name__}")
    try:
        model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as e:
        details = [l.strip() for l in str(e).splitlines()[1:] if l.strip()]
        first = (details[0] if details else str(e).strip())[:300].rstrip(".")
        more = f" (and {len(details) - 1} more problems)" if len(details) > 1 else ""
        raise PlanError(f"{source}: the weights do not fit the model rebuilt from the plan: {first}{more}. The "
                        "plan and the weights must come from the same run (and a fresh model of the dense architecture "
                        "the run started from): was one of them changed, or copied from another run?") from None
    return model


def read_weights_file(weights: Path, error: type[HwpruneError] = CheckpointError) -> dict:
    """``pruned.pt`` as ``hwprune fit`` wrote it (a dict with ``state_dict`` and ``plan``), read without running
    code (``weights_only``); anything else raises ``error`` naming the file and what to do."""
    try:
        saved = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, a pickle that asks for code (refused by weights_only), ...
        raise error(f"{weights}: not a readable hwprune weights file ({type(e).__name__}: "
                    f"{(str(e).splitlines() or [''])[0][:120]}); it was changed after hwprune fit wrote it: "
                    "run the fit again (another --out)") from None
    if not isinstance(saved, dict) or "state_dict" not in saved:
        found = type(saved).__name__ + (" with keys " + ", ".join(map(str, saved))[:80] if isinstance(saved, dict) else "")
        raise error(f"{weights}: not an hwprune weights file (expected a dict with 'state_dict' and 'plan', found "
                    f"{found}); it was changed after hwprune fit wrote it: run the fit again (another --out)")
    return saved


def load_pruned(model: nn.Module, path: str | os.PathLike, target=None) -> nn.Module:
    """Reload a pruned model saved by ``hwprune fit``: ``path`` is a run folder or its ``pruned.pt`` (the weights
    and the plan). ``model`` is a fresh copy of the dense architecture the run started from (e.g.
    ``build_model(...)`` with the run's ``plan.json`` ``meta.model``/``meta.model_args``); it is sliced to the plan
    (masked for a block run), loaded with the weights in place and returned.

    Example:
        >>> net = load_pruned(build_model("small-resnet", in_channels=1, num_classes=10, input_size=8),
        ...                   "runs/demo")                              # doctest: +SKIP
    """
    from .plan import Plan, apply_plan

    path = Path(path)
    weights = path / "pruned.pt" if path.is_dir() else path
    if not weights.is_file():
        raise CheckpointError(f"{weights}: no such file; give a run folder written by hwprune fit (one that holds "
                              "pruned.pt: the run finished fine-tuning) or its pruned.pt")
    saved = read_weights_file(weights)
    if "plan" in saved:
        plan = Plan.from_dict(saved["plan"], f"{weights} (its 'plan')")
    elif (weights.parent / "plan.json").is_file():
        plan = Plan.load(weights.parent / "plan.json")
    else:
        raise CheckpointError(f"{weights}: holds no plan and has no plan.json beside it; for the weights of a sliced "
                              "model alone use load_sliced(model, state_dict, example_inputs)")
    apply_plan(model, plan, target)
    return load_weights(model, saved["state_dict"], str(weights))
