"""The Plan: which units of each group are kept. It links fit, apply and export.

A plan is plain JSON. Replaying it onto a fresh copy of the model rediscovers the groups, checks that
every group and member still matches (same names, sizes and parameter dims) and slices.

A plan has a ``granularity``: ``channels`` (units are channels and neurons; replay slices) or
``blocks`` (units are weight blocks of one layer, ``block: [rows, cols]`` per group; replay masks and
the model keeps its shapes, see :mod:`hwprune.graph.blocks`). Plans written before blocks existed have no
``granularity`` key and read as ``channels``.

Example:
    >>> plan = Plan.load("runs/digits/plan.json")                       # doctest: +SKIP
    >>> pruned = apply_plan(build_model("small-resnet", ...), plan)      # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..errors import PlanError
from ..graph.groups import Group
from ..io import atomic_write_json

FORMAT = "hwprune-plan"
VERSION = 1


@dataclass
class GroupPlan:
    """Kept units of one group, with the group's members for validation on replay."""

    name: str
    size: int
    keep: list[int]
    members: list[str]
    block: list[int] | None = None  # [rows, cols] of a block group

    @property
    def removed(self) -> int:
        return self.size - len(self.keep)


@dataclass
class Plan:
    """Kept units per group, the input shape used to trace, and the excluded layers."""

    groups: list[GroupPlan]
    input_shape: list[int]
    exclude: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    granularity: str = "channels"

    @classmethod
    def from_groups(cls, groups: list[Group], keep: dict[str, np.ndarray], input_shape, exclude=(), meta=None) -> "Plan":
        """Build a plan from discovered groups (channel groups or :class:`~hwprune.graph.blocks.BlockGroup`)
        and kept unit indices per group name."""
        from .granularity import GRANULARITIES

        unit = GRANULARITIES[next((g.kind for g in groups if g.kind in GRANULARITIES), "channels")]
        plans = [
            GroupPlan(g.name, g.size, sorted(int(i) for i in keep[g.name]), g.signature, unit.block_of(g))
            for g in groups
            if g.name in keep
        ]
        return cls(plans, [int(s) for s in input_shape], list(exclude), dict(meta or {}), unit.name)

    def keep_by_group(self) -> dict[str, np.ndarray]:
        return {g.name: np.asarray(g.keep, dtype=np.int64) for g in self.groups}

    @property
    def units(self) -> int:
        return sum(g.size for g in self.groups)

    @property
    def removed_units(self) -> int:
        return sum(g.removed for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "granularity": self.granularity,
            "input_shape": self.input_shape,
            "exclude": self.exclude,
            "meta": self.meta,
            "groups": [
                {"name": g.name, "size": g.size, "keep": g.keep, "members": g.members,
                 **({"block": g.block} if g.block is not None else {})}
                for g in self.groups
            ],
        }

    @classmethod
    def from_dict(cls, d: Any, source: str = "<plan>") -> "Plan":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PlanError(f"{source}: not an hwprune plan (expected \"format\": \"{FORMAT}\")")
        if d.get("version") != VERSION:
            raise PlanError(f"{source}: plan version {d.get('version')!r}; this hwprune reads version {VERSION}")
        from .granularity import GRANULARITIES

        granularity = d.get("granularity", "channels")
        if granularity not in GRANULARITIES:
            raise PlanError(f"{source}: granularity {granularity!r}; expected one of {', '.join(GRANULARITIES)}")
        unit = GRANULARITIES[granularity]
        try:
            groups = [
                GroupPlan(str(g["name"]), int(g["size"]), [int(i) for i in g["keep"]], [str(m) for m in g["members"]],
                          unit.read_block(g))
                for g in d["groups"]
            ]
            return cls(groups, [int(s) for s in d["input_shape"]], [str(e) for e in d.get("exclude", [])],
                       dict(d.get("meta", {})), granularity)
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"{source}: malformed plan ({type(e).__name__}: {e})") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as JSON, atomically."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Plan":
        """Read a plan written by :meth:`save`."""
        try:
            d = json.loads(Path(path).read_text())
        except OSError as e:
            raise PlanError(f"{path}: cannot read the plan: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
        return cls.from_dict(d, str(path))


def read_block(g: dict) -> list[int]:
    block = g["block"]
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(v, int) and v > 0 for v in block)):
        raise ValueError(f"group '{g.get('name')}': block {block!r} is not [rows, cols]")
    return block


def check_plan(plan: Plan, groups: list[Group]) -> None:
    """Raise :class:`PlanError` listing every group of the plan that does not match the model."""
    by_name = {g.name: g for g in groups}
    problems = []
    for gp in plan.groups:
        g = by_name.get(gp.name)
        if g is None:
            problems.append(f"group '{gp.name}' is not in the model")
        elif g.size != gp.size:
            problems.append(f"group '{gp.name}' has {g.size} units in the model, {gp.size} in the plan")
        elif g.signature != gp.members:
            problems.append(f"group '{gp.name}' couples other layers in the model than in the plan")
        elif gp.keep and (min(gp.keep) < 0 or max(gp.keep) >= g.size):
            problems.append(f"group '{gp.name}' keeps units outside [0, {g.size})")
    if problems:
        raise PlanError("the plan does not fit this model: " + "; ".join(problems[:10]) + (
            f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))


def apply_plan(model: nn.Module, plan: "Plan | str | os.PathLike | dict", target=None) -> nn.Module:
    """Slice ``model`` (in place) to the plan (a :class:`Plan`, a ``plan.json`` path, or a plan dict such as
    ``pruned.pt``'s ``"plan"``); the model must be the architecture the plan came from.
    A block plan masks instead: the dropped blocks become zeros and the shapes stay.

    Example:
        >>> pruned = apply_plan(fresh_model, Plan.load("plan.json"))    # doctest: +SKIP
    """
    from .granularity import granularity

    if isinstance(plan, (str, os.PathLike)):
        plan = Plan.load(plan)
    elif isinstance(plan, dict):  # pruned.pt's "plan", or a plan.json read by hand
        plan = Plan.from_dict(plan)
    elif not isinstance(plan, Plan):
        raise PlanError(f"apply_plan: expected a Plan, a plan.json path or a plan dict, found {type(plan).__name__}")
    return granularity(plan.granularity).replay(model, plan, target)
