"""Per-channel scale factors of every unit: the BN gammas, or gates where a unit has no BatchNorm.

Methods that act on scale factors (network slimming, polarization, Ye et al.'s ISTA) see one flat
vector of factors, each tagged with its unit. A unit of a residual stream has several (one per BN that
writes the stream). A unit with no BN (a linear layer's neurons, a conv without BN) gets a *gate*: a
parameter that multiplies the producers' outputs, initialized to 1, folded into their weights and
biases when the method finalizes (so the pruned model has no trace of it).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..graph.groups import PRODUCER, UnitIndex, get_tensor


class UnitScales:
    """The scale factors of all units of a :class:`UnitIndex`.

    Example:
        >>> from hwprune.graph import discover_groups
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
        >>> scales = UnitScales(net, UnitIndex(net, discover_groups(net, torch.zeros(1, 3, 8, 8))))
        >>> scales.attach()                                       # installs gates where needed (none: BN)
        >>> factors, units = scales.values()                      # the BN weights, one per unit here
        >>> penalty = factors.abs().sum()                         # L1 on every factor (differentiable)
        >>> scales.unit_scores()                                  # one score per unit
        array([1., 1., 1., 1.])
    """

    def __init__(self, model: nn.Module, index: UnitIndex, gate_init: float = 1.0):
        self.model, self.index = model, index
        self.bn_entries: list[tuple[str, torch.Tensor]] = []  # (BN module name, unit id per channel)
        has_bn = torch.zeros(index.n_units + 1, dtype=torch.bool)
        for (module, param, dim), gid in index.entries(PRODUCER).items():
            owner = model.get_submodule(module) if module else model
            if param == "weight" and isinstance(owner, nn.modules.batchnorm._BatchNorm):
                self.bn_entries.append((module, gid))
                has_bn[gid] = True
        has_bn = has_bn[: index.n_units]
        # Gates: one per unit without a BN, shared by all producers of that unit.
        self.gated_units = torch.nonzero(~has_bn).flatten()
        self.gates = nn.Parameter(torch.full((len(self.gated_units),), float(gate_init)))
        self._gate_of_unit = torch.full((index.n_units + 1,), -1, dtype=torch.long)
        self._gate_of_unit[self.gated_units] = torch.arange(len(self.gated_units))
        self._producers: list[tuple[str, torch.Tensor]] = []  # layers whose output a gate scales
        if len(self.gated_units):
            for (module, param, dim), gid in index.entries(PRODUCER).items():
                if param == "weight" and dim == 0 and bool((self._gate_of_unit[gid] >= 0).any()):
                    self._producers.append((module, gid))
        self._hooks: list = []

    # --- gates -------------------------------------------------------------------------------
    def attach(self) -> None:
        """Install the gate hooks (idempotent)."""
        if self._hooks or not len(self.gated_units):
            return
        for module, gid in self._producers:
            layer = self.model.get_submodule(module)
            gate_idx = self._gate_of_unit[gid]
            axis = 1 if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1

            def hook(mod, inp, out, gate_idx=gate_idx, axis=axis):
                g = torch.cat([self.gates, self.gates.new_ones(1)])[gate_idx]  # channels without a gate: 1
                shape = [1] * out.dim()
                shape[axis] = -1
                return out * g.view(shape)

            self._hooks.append(layer.register_forward_hook(hook))

    @torch.no_grad()
    def fold_gates(self) -> None:
        """Multiply each gate into its producers' weight rows and biases, then remove the hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if not len(self.gated_units):
            return
        for module, gid in self._producers:
            layer = self.model.get_submodule(module)
            g = torch.cat([self.gates.detach(), torch.ones(1)])[self._gate_of_unit[gid]]
            layer.weight.mul_(g.view([-1] + [1] * (layer.weight.dim() - 1)))
            if getattr(layer, "bias", None) is not None:
                layer.bias.mul_(g)
        self.gates.data.fill_(1.0)

    # --- factors -----------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        """The parameters holding factors: the BN weights, and the gate vector if any."""
        out = [get_tensor(self.model, m, "weight") for m, _ in self.bn_entries]
        return out + ([self.gates] if len(self.gated_units) else [])

    def values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(factors, unit id of each factor), differentiable; BN channels outside any unit are left out."""
        vals, units = [], []
        for module, gid in self.bn_entries:
            w = get_tensor(self.model, module, "weight")
            inside = gid < self.index.n_units
            vals.append(w[inside])
            units.append(gid[inside])
        if len(self.gated_units):
            vals.append(self.gates)
            units.append(self.gated_units)
        if not vals:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long)
        return torch.cat(vals), torch.cat(units)

    @torch.no_grad()
    def unit_scores(self, reduce: str = "mean") -> np.ndarray:
        """One score per unit from its factors' magnitudes: ``mean`` or ``max`` of |factor|."""
        v, u = self.values()
        v = v.detach().abs().double()
        n = self.index.n_units
        if reduce == "max":
            out = torch.zeros(n, dtype=torch.float64).scatter_reduce(0, u, v, reduce="amax", include_self=False)
        else:
            s = torch.zeros(n, dtype=torch.float64).index_add_(0, u, v)
            c = torch.zeros(n, dtype=torch.float64).index_add_(0, u, torch.ones_like(v))
            out = s / c.clamp_min(1)
        return out.numpy()

    @torch.no_grad()
    def clamp_(self, lo: float, hi: float) -> None:
        """Clamp every factor into [lo, hi] (in place)."""
        for t in self.tensors():
            t.clamp_(lo, hi)
