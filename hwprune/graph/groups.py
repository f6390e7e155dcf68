"""Groups of coupled units, and vectorised access to their parameters.

A *unit* is a set of parameter slices that live or die together: one channel of a residual stream
(every conv filter that writes it, every BN entry, every input slice that reads it), one conv group of
a depthwise conv, one neuron. A :class:`Group` is a set of units with the same members (all channels
of one stream). :class:`UnitIndex` turns a model plus its groups into a few tensor ops per parameter:
per-unit squared norms, per-unit scaling, masking. Regularizers use it and never touch pruning code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

PRODUCER = "producer"  # trainable entries that make the unit's output: regularized and masked
# Weights followed directly by a BatchNorm: the BN undoes their scale, so shrinking them does nothing
# to the function in training and only makes BN's running statistics stale. They live or die with the
# unit (masked, sliced) but the regularizer acts on the BN's gamma/beta instead.
NORMALIZED = "normalized"
CONSUMER = "consumer"  # input slices of the layers that read the unit: masked and sliced, not regularized
BUFFER = "buffer"  # running statistics: sliced only
# A list attribute of split sizes (MixNet's `splits`): index i is the i-th piece, its "units" are the
# piece's channels; slicing writes the kept count of each piece back. Not a tensor.
SIZES = "sizes"


@dataclass(eq=False)
class Member:
    """One parameter dimension touched by a group.

    ``unit_of[i]`` is the unit (within the group) that index ``i`` along ``dim`` belongs to, or -1.
    """

    module: str
    param: str
    dim: int
    role: str
    unit_of: np.ndarray

    @property
    def key(self) -> str:
        """``module.param:dim``, the name plans and reports use."""
        return f"{self.module}.{self.param}:{self.dim}" if self.module else f"{self.param}:{self.dim}"


class KeepCounts:
    """What the hardware lets a group keep, from its ``size``, ``multiple`` and ``blocked`` (shared by
    channel groups and weight-block groups, :class:`hwprune.graph.blocks.BlockGroup`)."""

    size: int
    multiple: int
    blocked: str | None

    @property
    def prunable(self) -> bool:
        """Not blocked, and the hardware multiple leaves room to remove something."""
        return self.blocked is None and self.min_keep < self.size

    @property
    def min_keep(self) -> int:
        """Fewest units that may remain: one multiple, never zero (a layer is never removed)."""
        return min(max(1, self.multiple), self.size)

    def allowed_keep_counts(self) -> list[int]:
        """Kept counts the hardware allows, ascending: multiples of ``multiple`` and the full size."""
        counts = list(range(self.min_keep, self.size + 1, max(1, self.multiple)))
        if counts[-1] != self.size:
            counts.append(self.size)
        return counts

    def round_keep(self, count: float) -> int:
        """The allowed kept count closest to ``count`` (ties keep more)."""
        allowed = np.asarray(self.allowed_keep_counts())
        return int(allowed[np.argmin(np.abs(allowed - count) - 1e-9 * allowed)])


@dataclass(eq=False)
class Group(KeepCounts):
    """Units that share the same members, e.g. all channels of one residual stream.

    ``multiple``: kept counts must be multiples of it (or the full size); ``blocked``: why the group is
    not prunable (model input/output, excluded layer, channel-mixing op), or None.
    """

    name: str
    size: int
    members: list[Member]
    layer_kinds: frozenset[str] = frozenset()
    multiple: int = 1
    blocked: str | None = None
    kind: str = "channels"
    layers: tuple[str, ...] = field(default=())

    @property
    def signature(self) -> list[str]:
        return [m.key for m in self.members]

    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role in (PRODUCER, NORMALIZED)]

    def describe(self) -> str:
        state = f"blocked: {self.blocked}" if self.blocked else f"multiple {self.multiple}"
        return f"{self.name}: {self.size} {self.kind} ({state}); members: {', '.join(self.signature)}"


def get_tensor(model: nn.Module, module: str, param: str) -> torch.Tensor:
    """The parameter or buffer ``param`` of the submodule ``module`` ('' is the model itself)."""
    owner = model.get_submodule(module) if module else model
    return getattr(owner, param)


class UnitNumbering:
    """The global numbering of the units of all prunable groups: group ``g`` owns ids
    ``offsets[g] .. offsets[g] + groups[g].size``. :class:`UnitIndex` (channels, heads, neurons) and
    :class:`~hwprune.graph.blocks.BlockIndex` (weight blocks) share it.

    Example:
        >>> from types import SimpleNamespace as G
        >>> n = UnitNumbering(None, [G(name="a", size=2, prunable=True), G(name="b", size=3, prunable=True)])
        >>> n.n_units, n.group_of_unit().tolist(), n.keep_from_plan({"b": [0, 2]}).tolist()
        (5, [0, 0, 1, 1, 1], [True, True, True, False, True])
    """

    def __init__(self, model: nn.Module, groups: list):
        self.model = model
        self.groups = [g for g in groups if g.prunable]
        sizes = [g.size for g in self.groups]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n_units = int(self.offsets[-1])

    def _spans(self):
        for g, off in zip(self.groups, self.offsets):
            yield g, int(off), int(off) + g.size

    def group_of_unit(self) -> np.ndarray:
        """The index (into ``self.groups``) of each global unit."""
        return np.repeat(np.arange(len(self.groups)), [g.size for g in self.groups])

    def keep_from_plan(self, keep_by_group: dict[str, np.ndarray]) -> torch.Tensor:
        """A boolean per global unit from kept unit indices per group name (groups not named keep all)."""
        keep = torch.ones(self.n_units, dtype=torch.bool)
        for g, a, b in self._spans():
            if g.name in keep_by_group:
                mask = torch.zeros(g.size, dtype=torch.bool)
                mask[torch.as_tensor(np.asarray(keep_by_group[g.name]), dtype=torch.long)] = True
                keep[a:b] = mask
        return keep

    def split(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-unit values cut back into one tensor per group name."""
        return {g.name: values[a:b] for g, a, b in self._spans()}


class UnitIndex(UnitNumbering):
    """Per-unit reductions and updates over every group's members, a few tensor ops per parameter.

    Units of all prunable groups are numbered globally: group ``g`` owns ids
    ``offsets[g] .. offsets[g] + groups[g].size``.

    Example:
        >>> from hwprune.graph import discover_groups
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1))
        >>> idx = UnitIndex(net, discover_groups(net, torch.zeros(1, 3, 8, 8)))
        >>> norms = idx.sq_norms().sqrt()          # one value per unit
        >>> norms.shape
        torch.Size([16])
        >>> idx.scale_(torch.where(norms < 1e-3, 0.0, 1.0))
    """

    def __init__(self, model: nn.Module, groups: list[Group]):
        super().__init__(model, groups)
        # (module, param, dim) -> global unit id per index (sentinel n_units when not in a unit), per role
        self._entries: dict[str, dict[tuple[str, str, int], torch.Tensor]] = {
            PRODUCER: {}, NORMALIZED: {}, CONSUMER: {}, BUFFER: {}}
        for g, off in zip(self.groups, self.offsets):
            for m in g.members:
                if m.role == SIZES:
                    continue
                key = (m.module, m.param, m.dim)
                table = self._entries[m.role]
                t = get_tensor(model, m.module, m.param)
                if key not in table:
                    table[key] = torch.full((t.shape[m.dim],), self.n_units, dtype=torch.long, device=t.device)
                local = torch.as_tensor(m.unit_of, dtype=torch.long, device=t.device)
                hit = local >= 0
                table[key][hit] = local[hit] + int(off)

    def _view(self, t: torch.Tensor, dim: int) -> list[int]:
        shape = [1] * t.dim()
        shape[dim] = t.shape[dim]
        return shape

    def producer_tensors(self) -> list[torch.Tensor]:
        """The distinct parameters that carry regularized entries (to exclude from weight decay)."""
        seen: dict[int, torch.Tensor] = {}
        for module, param, _ in self._entries[PRODUCER]:
            t = get_tensor(self.model, module, param)
            seen[id(t)] = t
        return list(seen.values())

    def sq_norms(self, roles: tuple[str, ...] = (PRODUCER,)) -> torch.Tensor:
        """Sum of squares of each unit's entries (float32/64 like the weights), shape (n_units,)."""
        acc = None
        for role in roles:
            for (module, param, dim), gid in self._entries[role].items():
                t = get_tensor(self.model, module, param).detach()
                other = [d for d in range(t.dim()) if d != dim]
                sq = t.pow(2).sum(dim=other) if other else t.pow(2)
                if acc is None:
                    acc = torch.zeros(self.n_units + 1, dtype=sq.dtype, device=sq.device)
                acc.index_add_(0, gid, sq.to(acc.dtype))
        if acc is None:
            return torch.zeros(self.n_units)
        return acc[: self.n_units]

    def sq_norms_differentiable(self, roles: tuple[str, ...] = (PRODUCER,)) -> torch.Tensor:
        """Like :meth:`sq_norms`, but autograd flows through it (for penalties added to the loss)."""
        acc = None
        for role in roles:
            for (module, param, dim), gid in self._entries[role].items():
                t = get_tensor(self.model, module, param)
                other = [d for d in range(t.dim()) if d != dim]
                sq = t.pow(2).sum(dim=other) if other else t.pow(2)
                part = torch.zeros(self.n_units + 1, dtype=sq.dtype, device=sq.device).index_add(0, gid, sq)
                acc = part if acc is None else acc + part
        if acc is None:
            return torch.zeros(self.n_units)
        return acc[: self.n_units]

    def entries(self, role: str = PRODUCER) -> dict[tuple[str, str, int], torch.Tensor]:
        """``(module, param, dim) -> unit id per index`` (sentinel ``n_units`` for indices in no unit)."""
        return self._entries[role]

    def sizes(self, roles: tuple[str, ...] = (PRODUCER,)) -> torch.Tensor:
        """Number of entries in each unit (float64), shape (n_units,)."""
        acc = torch.zeros(self.n_units + 1, dtype=torch.float64)
        for role in roles:
            for (module, param, dim), gid in self._entries[role].items():
                t = get_tensor(self.model, module, param)
                acc.index_add_(0, gid.cpu(), torch.full((t.shape[dim],), t.numel() / t.shape[dim], dtype=torch.float64))
        return acc[: self.n_units]

    @torch.no_grad()
    def scale_(self, factors: torch.Tensor, roles: tuple[str, ...] = (PRODUCER,)) -> None:
        """Multiply each unit's entries by ``factors[unit]`` in place."""
        for role in roles:
            for (module, param, dim), gid in self._entries[role].items():
                t = get_tensor(self.model, module, param)
                f = torch.cat([factors.to(t.dtype).to(t.device), torch.ones(1, dtype=t.dtype, device=t.device)])
                t.mul_(f[gid].view(self._view(t, dim)))

    @torch.no_grad()
    def mask_(self, keep: torch.Tensor) -> None:
        """Zero the trainable entries (producers, normalized weights, consumers) of every dropped unit."""
        self.scale_(keep.to(torch.float32), roles=(PRODUCER, NORMALIZED, CONSUMER))

