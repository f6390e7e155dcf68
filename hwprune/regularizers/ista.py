"""Ye, Lu, Lin, Wang (ICLR 2018): ISTA on the BatchNorm scales (METHODS.md §4).

Objective L(θ) + ρ Σ_l λ_l ‖γ_l‖₁, optimized by ISTA: after every optimizer step each γ gets the
soft-threshold ``γ ← sign(γ)·max(|γ| − η·ρ·λ_l, 0)``; γ itself takes plain gradient steps (no momentum,
no weight decay: its own optimizer group), the other parameters keep the trainer's SGD with momentum.
A channel whose γ reaches exactly 0 outputs the constant β (relu(β) after the activation): it carries
no information, and at the end it is removed after its constant is folded into the layers that read it.

* λ_l, the per-layer normalizer of the official code (``Transformer.conv2d_layer``, 'memory' priority):
  ``(H_l·W_l + k_h·k_w·c_in) / (H_in·W_in)`` with ``H_l×W_l`` the output map of the conv before the BN,
  ``k`` its kernel, ``c_in`` the input channels one filter reads (``in_channels/groups``) and
  ``H_in×W_in`` the network's input; measured with forward hooks on the first training step.
* ρ: adapted along the sparsity schedule by a
  :class:`~hwprune.regularizers.pacing.PacedController` on the fraction of units whose γ are all
  exactly zero, at a pace that lets the loss defend the channels it needs. It replaces the paper's
  hand-set warm-up and raise of the penalty; ``adaptive=False`` keeps ρ = ``strength``.
* The γ–W rescaling trick (§4.3): at attach γ, β ← α·γ, α·β and the readers' input slices ← W/α, for
  the units where that is function-preserving (positively homogeneous activations only, see
  :func:`~hwprune.regularizers.fold.homogeneous_units`); undone at finalize; never applied twice on
  resume. α < 1 makes the same threshold remove a channel sooner (the γ are smaller) and makes γ move
  faster relative to its size.
* Units without a BatchNorm get a gate (a scale factor of their own, ``UnitScales``) that plays γ.
* Finalize: undo α, fold the removed units' constants into the readers' biases or BN running means
  (:func:`~hwprune.regularizers.fold.fold_removed_constants`), fold the gates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import HwpruneError
from ..graph.groups import CONSUMER, NORMALIZED, PRODUCER, get_tensor
from .base import MinWidthGuard, RegContext, Regularizer, register
from .pacing import PacedController, SpeedMeter
from .fold import FoldReport, InputRecorder, trace_graph, bn_after, fold_removed_constants, homogeneous_units
from .scales import UnitScales


@dataclass
class IstaBnConfig:
    """ISTA on BN scales (Ye et al. 2018).

    ``strength`` is ρ (the official README's l1_penalty 0.005 for ResNet-20); with ``adaptive`` it is
    solved every step from the sparsity schedule. ``alpha``: the γ–W rescaling factor (1: off).
    ``fold``: fold the removed channels' constant outputs into the next layers before removing them.

    Example:
        >>> IstaBnConfig(alpha=0.5).alpha
        0.5
    """

    strength: float = 5e-3
    adaptive: bool = True
    alpha: float = 1.0
    fold: bool = True

    def __post_init__(self):
        if not self.strength > 0:
            raise HwpruneError(f"ista-bn strength {self.strength}: expected a positive number")
        if not (isinstance(self.alpha, (int, float)) and 0 < self.alpha):
            raise HwpruneError(f"ista-bn alpha {self.alpha!r}: expected a positive number (1 turns the rescaling off)")


@register
class IstaBn(Regularizer):
    """ISTA with per-layer penalties on every unit's BN γ (gates where a unit has no BN)."""

    name = "ista-bn"
    Config = IstaBnConfig
    solves_strength = True

    def __init__(self, config: IstaBnConfig, ctx: RegContext):
        super().__init__(config, ctx)
        self.scales = UnitScales(ctx.model, ctx.index)
        self.protect = MinWidthGuard(ctx.index)
        graph = trace_graph(ctx.model)
        self.rescaled = homogeneous_units(ctx.model, ctx.index, graph) if config.alpha != 1 else \
            torch.zeros(ctx.index.n_units, dtype=torch.bool)
        self.bn_of = bn_after(ctx.model, graph)
        self.recorder = InputRecorder(ctx.model)
        self.layer_penalty: torch.Tensor | None = None  # λ per factor, measured on the first step
        self._geometry: dict[str, tuple] = {}
        self._hooks: list = []
        self.fold_report: FoldReport | None = None
        self.controller = PacedController.for_schedule(ctx.schedule) if config.adaptive and ctx.schedule else None
        self.speed: SpeedMeter | None = None  # scaled by the median |γ| at the first step

    # --- lifecycle -----------------------------------------------------------------------------
    def attach(self, resumed: bool = False) -> None:
        self.scales.attach()
        self.recorder.attach()
        if self.layer_penalty is None and not self._hooks:
            self._install_geometry_hooks()
        if not resumed and bool(self.rescaled.any()):
            self._rescale(self.config.alpha)

    def param_groups(self) -> list[dict]:
        # ISTA: γ takes plain gradient steps, then the prox; momentum would carry the shrinkage over
        bns = [t for t in self.scales.tensors() if t is not self.scales.gates]
        return [{"params": bns, "momentum": 0.0, "weight_decay": 0.0}] if bns else []

    def extra_parameters(self) -> list[dict]:
        if not len(self.scales.gated_units):
            return []
        return [{"params": [self.scales.gates], "momentum": 0.0, "weight_decay": 0.0}]

    def finalize(self, groups, keep) -> None:
        self._remove_geometry_hooks()
        if bool(self.rescaled.any()):
            self._rescale(1.0 / self.config.alpha)
        self.recorder.detach()
        inputs = self.recorder.global_inputs() if self.config.fold else None  # a collective: every rank calls it
        if inputs is not None:
            removed = ~self.index.keep_from_plan(keep)
            self.fold_report = fold_removed_constants(self.ctx.model, self.index, removed, inputs, self.bn_of)
        self.scales.fold_gates()

    # --- γ–W rescaling -------------------------------------------------------------------------
    @torch.no_grad()
    def _rescale(self, alpha: float) -> None:
        """Producers (γ, β; or the gate) × α and readers' input slices / α on the qualifying units."""
        gated = torch.zeros(self.index.n_units, dtype=torch.bool)
        gated[self.scales.gated_units] = True
        f = torch.where(self.rescaled, torch.full((self.index.n_units,), float(alpha)), torch.ones(self.index.n_units))
        self.index.scale_(torch.where(gated, torch.ones_like(f), f), roles=(PRODUCER,))
        if len(self.scales.gated_units):
            self.scales.gates.mul_(f[self.scales.gated_units].to(self.scales.gates.dtype))
        self.index.scale_(1.0 / f, roles=(CONSUMER,))

    # --- λ_l from the layer geometry -----------------------------------------------------------
    def _install_geometry_hooks(self) -> None:
        model = self.ctx.model
        # the conv/linear that feeds each BN (the NORMALIZED layers), or the producer layer itself for gates
        feeders = {k[0] for k in self.index.entries(NORMALIZED)} | {
            m for m, _ in self.scales._producers}

        def root(mod, args):
            if args and isinstance(args[0], torch.Tensor):
                self._geometry["__input__"] = tuple(args[0].shape)

        self._hooks.append(model.register_forward_pre_hook(root))
        for name in feeders:
            layer = model.get_submodule(name)

            def hook(mod, inp, out, name=name):
                self._geometry[name] = (tuple(out.shape), mod)

            self._hooks.append(layer.register_forward_hook(hook))

    def _remove_geometry_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _compute_layer_penalty(self) -> torch.Tensor:
        """λ per factor (in the order of ``scales.values()``), from the recorded shapes."""
        inp = self._geometry.get("__input__")
        area_in = float(np.prod(inp[2:])) if inp is not None and len(inp) > 2 else 1.0
        bn_to_feeder = {bn: layer for layer, bn in self.bn_of.items()}

        def cost(layer_name: str | None) -> float:
            if layer_name is None or layer_name not in self._geometry:
                return float("nan")  # unknown geometry (a BN not right after a conv): the mean, below
            shape, mod = self._geometry[layer_name]
            area = float(np.prod(shape[2:])) if len(shape) > 2 else 1.0
            w = mod.weight
            kernel = float(np.prod(w.shape[2:])) if w.dim() > 2 else 1.0
            return (area + kernel * w.shape[1]) / area_in

        parts = []
        for module, gid in self.scales.bn_entries:
            inside = int((gid < self.index.n_units).sum())
            parts.append(torch.full((inside,), cost(bn_to_feeder.get(module))))
        if len(self.scales.gated_units):
            gate_cost = torch.ones(len(self.scales.gated_units))
            for module, gid in self.scales._producers:
                gi = self.scales._gate_of_unit[gid]
                gate_cost[gi[gi >= 0]] = cost(module)
            parts.append(gate_cost)
        lam = torch.cat(parts).double() if parts else torch.zeros(0, dtype=torch.float64)
        known = lam[~lam.isnan()]
        lam[lam.isnan()] = known.mean() if len(known) else 1.0
        return lam / lam.mean() if len(lam) else lam  # normalized to mean 1: ρ means the same on every model

    def _penalties(self) -> torch.Tensor:
        if self.layer_penalty is None:
            if "__input__" in self._geometry:
                self.layer_penalty = self._compute_layer_penalty()
                self._remove_geometry_hooks()
            else:
                return torch.ones(len(self.scales.values()[0]), dtype=torch.float64)
        return self.layer_penalty

    # --- the ISTA step ---------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self, lr: float, step: int) -> None:
        v, units = self.scales.values()
        v = v.detach().double()
        thr = lr * self.strength * self._penalties()  # η·ρ·λ_l per factor
        free = ~self.protect.mask(torch.as_tensor(self.scores()))[units]
        new = torch.where(free, torch.sign(v) * (v.abs() - thr).clamp_min(0), v)
        self._write(new)
        if self.controller is not None:
            if self.speed is None:
                self.speed = SpeedMeter(scale=float(v.abs().median()) or 1.0)  # the γ's typical size
            speed = self.speed.update(new)
            self.strength = self.controller.update(step + 1, self.zero_fraction(), self.strength, speed)

    @torch.no_grad()
    def _write(self, values: torch.Tensor) -> None:
        """Put a vector in the order of ``scales.values()`` back into the BN weights and gates."""
        pos = 0
        for module, gid in self.scales.bn_entries:
            w = get_tensor(self.ctx.model, module, "weight")
            inside = gid < self.index.n_units
            n = int(inside.sum())
            w[inside] = values[pos: pos + n].to(w.dtype)
            pos += n
        if len(self.scales.gated_units):
            self.scales.gates.copy_(values[pos:].to(self.scales.gates.dtype))

    # --- measurements ----------------------------------------------------------------------------
    def scores(self) -> np.ndarray:
        """Per unit, the largest |γ|/λ_l of its factors: the threshold η·ρ that would zero it."""
        v, units = self.scales.values()
        ratio = v.detach().double().abs() / self._penalties()
        return torch.zeros(self.index.n_units, dtype=torch.float64).scatter_reduce(
            0, units, ratio, reduce="amax", include_self=False).numpy()

    def zero_fraction(self) -> float:
        """Units whose every γ is exactly zero: channels that output a constant."""
        return float((self.scores() == 0).mean()) if self.index.n_units else 0.0

    def state_dict(self) -> dict:
        return {"strength": self.strength, "gates": self.scales.gates.detach().clone(),
                "inputs": self.recorder.inputs, "layer_penalty": self.layer_penalty,
                "speed": self.speed.state_dict() if self.speed is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.strength = float(state["strength"])
        self.scales.gates.data.copy_(state["gates"])
        if state.get("inputs") is not None:
            self.recorder.inputs = state["inputs"]
        if state.get("layer_penalty") is not None:
            self.layer_penalty = state["layer_penalty"]
            self._remove_geometry_hooks()
        if state.get("speed") is not None:
            self.speed = SpeedMeter()
            self.speed.load_state_dict(state["speed"])
