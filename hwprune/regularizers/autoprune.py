"""AutoPrune (Xiao, Wang, Rajasekaran, NeurIPS 2019): prune by training auxiliary masks (METHODS.md §3).

Every unit j has an auxiliary parameter m_j, and its scale parameters are used as ``ŵ = w·h(m_j)``
with the step mask ``h(m) = 1[m > 0]``: for a unit with a BatchNorm that is γ alone, so a masked unit
outputs its β (a constant per channel); without a BatchNorm, the rows of the layer that writes it, so
it outputs that layer's bias (a constant, 0 if it has none). Forward hooks recompute each producer
layer with ŵ; the weights themselves are never changed by the mask.

Why γ alone: gating β too made a masked BN→ReLU unit output exactly 0, at the ReLU's kink
(PyTorch's relu'(0) = 0), so no loss gradient reached its mask and only λ moved it: such a unit never
came back (half the units of ``small-resnet``). With β left alone the masked unit outputs relu(β), and
``∂L/∂ŵ = Σ g_y·x̂`` is non-zero whenever the ReLU after it is active (β > 0, or the residual stream
it is added to is positive). Measured on the default job (``hwprune fit --target host-cpu --sparsity
0.5 --method autoprune --no-latency``): with γ and β gated 0 of the 251 units ever masked came back;
with γ alone 55 of 243 did (42 in the two BN→ReLU layers, 13 in the first residual stream), and the
accuracy around the projection went 98.3% → 97.2% instead of 99.2% → 93.3% (99.4% after fine-tuning
either way, within one test image; docs/methods.md has the table).

The update rules are separate (§3.4):

* weights: the ordinary optimizer on ``g_ŵ·h(m)``: only unmasked weights learn;
* masks, with their own optimizer: ``g_m = STE′(m)·Σ_{unit} g_ŵ ⊙ sign(w) + λ·∂R_a/∂m``. The sign(w)
  replaces w in the chain rule, so m grows exactly when the loss wants |ŵ| to grow, whatever |w| is.
  ``R_a(m) = Σ_j h(m_j)``, the number of active units, differentiated through the same STE.

STE′ (``ste``): ``linear`` 1; ``leaky`` 1 for m > 0 and ``slope`` below; ``softplus`` σ(m).

Recoverability: a masked unit still has a loss gradient ``g_ŵ`` (ŵ = 0 but ∂L/∂ŵ ≠ 0), and every
STE here has a non-zero slope below 0, so m climbs back when the loss wants the unit, and the unit
returns with the weights it had: while a unit is masked its weights (producers — γ and β, so its
constant stays the one it had —, the layer before its BN, its readers' input slices) are held at their
values from the moment it was masked, so neither momentum nor weight decay moves them. What is left
of the limit: a masked unit whose constant sits at or below a ReLU's kink (β ≤ 0 straight into a
ReLU, or a bias-free conv/linear without a BN) still gets no loss gradient, and only λ moves its mask.

λ is adapted along the sparsity schedule on the fraction of units with m ≤ 0 — the natural removal
set — by a :class:`~hwprune.regularizers.pacing.PacedController`; the projection then meets the
budget exactly (scores are exp(m)).

Finalize: the projection's ``keep`` decides, not the sign of m. A kept unit comes back with its held
weights (ŵ = w, also where m ≤ 0). A removed unit with m ≤ 0 outputs a constant that the layers after
it have learnt to use; removing it silently would change the function, so its γ (or rows) is set to 0
— the model then computes what the masked model computed — and its constant is folded into the
readers' biases or the running means of the BNs after them by
:func:`~hwprune.regularizers.fold.fold_removed_constants`, the fold ``ista-bn`` uses (a removed unit
with m > 0, which the budget took, is replaced by its mean, as there). The masked model and the sliced
model then compute the same function, exactly for 1x1 convolutions and linear readers, in the
interior only for a k×k reader with zero padding (the border taps see padding, not the constant).
The means are measured on the last recorded training batch with the BNs on its own statistics: the
kept units that come back make the running averages after them stale (see :meth:`AutoPrune.finalize`).

The masks' own optimizer is Adam (``m_lr`` 0.02). The sign-rule sums have any magnitude (one entry
for a BN unit, its γ; thousands for a conv row, and they grow a hundredfold once units switch
off and the loss rises), so plain SGD on m (``m_optimizer=sgd``, the paper's literal
``m ← m − η_m·g_m``) needs a learning rate per model: calibrated on the first step of a trained
network, it sent 70% of the masks below zero within 50 steps at any λ and blew others up to m ≈ 35.
With Adam a mask moves about ``m_lr`` per step in the direction of ``g_m``, so λ decides which masks
fall — those whose loss gradient defends them less than λ — and a unit needs about m_init/m_lr = 25
steps to switch off. The start λ is calibrated on the first step to a tenth of the median unit's loss
gradient (a fixed start was already above the defence of 60% of the units on the default run).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HwpruneError
from ..graph.groups import CONSUMER, NORMALIZED, PRODUCER, get_tensor
from .base import MinWidthGuard, RegContext, Regularizer, register
from .fold import FoldReport, InputRecorder, bn_after, fold_removed_constants
from .pacing import PacedController

STES = ("leaky", "softplus", "linear")
GATED = "weight"  # BN γ, or the rows of a conv/linear: the mask scales a unit, its β / bias stay
M_OPTIMIZERS = ("adam", "sgd")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def ste_grad(m: torch.Tensor, ste: str, slope: float) -> torch.Tensor:
    """∂h/∂m as the straight-through estimator ``ste`` defines it.

    Example:
        >>> ste_grad(torch.tensor([-1.0, 2.0]), "leaky", 0.1).tolist()
        [0.10000000149011612, 1.0]
    """
    if ste == "linear":
        return torch.ones_like(m)
    if ste == "leaky":
        return torch.where(m > 0, torch.ones_like(m), torch.full_like(m, slope))
    return torch.sigmoid(m)


class _Step(torch.autograd.Function):
    """h(m) = 1[m > 0] forward, STE′(m) backward."""

    @staticmethod
    def forward(ctx, m, ste, slope):
        ctx.save_for_backward(m)
        ctx.ste, ctx.slope = ste, slope
        return (m > 0).to(m.dtype)

    @staticmethod
    def backward(ctx, g):
        (m,) = ctx.saved_tensors
        return g * ste_grad(m, ctx.ste, ctx.slope), None, None


class _Masked(torch.autograd.Function):
    """ŵ = w·h(m)[unit of each index along ``dim``]; backward: ∂w = g·h, ∂m = STE′(m)·Σ_unit g·sign(w)."""

    @staticmethod
    def forward(ctx, w, m, gid, dim, ste, slope):
        h = torch.cat([(m > 0).to(w.dtype), w.new_ones(1)])[gid]  # indices outside any unit: 1
        shape = [1] * w.dim()
        shape[dim] = -1
        h = h.view(shape)
        ctx.save_for_backward(w, m, gid, h)
        ctx.dim, ctx.ste, ctx.slope = dim, ste, slope
        return w * h

    @staticmethod
    def backward(ctx, g):
        w, m, gid, h = ctx.saved_tensors
        other = [d for d in range(w.dim()) if d != ctx.dim]
        s = (g * torch.sign(w)).sum(dim=other) if other else g * torch.sign(w)
        per_unit = torch.zeros(len(m) + 1, dtype=m.dtype, device=m.device).index_add_(0, gid, s.to(m.dtype))[:-1]
        return g * h, per_unit * ste_grad(m, ctx.ste, ctx.slope), None, None, None, None


def _bn_forward(bn: nn.modules.batchnorm._BatchNorm, x, weight, bias):
    """``bn(x)`` with other γ, β: batch statistics in training (the module's own call has already
    updated the running averages), running statistics in evaluation, as ``_BatchNorm.forward``."""
    use_batch = bn.training or (bn.running_mean is None and bn.running_var is None)
    if use_batch:  # under torchrun: the global batch's statistics, as the module itself uses
        from ..training.distributed import batch_norm_global

        return batch_norm_global(x, weight, bias, bn.eps)
    return F.batch_norm(x, bn.running_mean, bn.running_var, weight, bias, False, 0.0, bn.eps)


@dataclass
class AutoPruneConfig:
    """AutoPrune settings.

    ``ste``: straight-through estimator for ∂h/∂m (``leaky`` default, ``softplus``, ``linear``);
    ``slope``: the leaky slope below 0. ``strength``: initial λ on R_a = Σ h(m), adapted along the
    schedule when ``adaptive``. ``m_init``: the masks' start value (all units on);
    ``m_optimizer``/``m_lr``: the masks' own optimizer (``sgd``, the paper's rule; ``adam``) and its
    learning rate. ``strength`` 0: the start λ is calibrated on the first step.

    Example:
        >>> AutoPruneConfig(ste="softplus").ste
        'softplus'
    """

    ste: str = "leaky"
    slope: float = 0.1
    strength: float = 0.0
    adaptive: bool = True
    m_init: float = 0.5
    m_lr: float = 0.02
    m_optimizer: str = "adam"

    def __post_init__(self):
        if self.ste not in STES:
            raise HwpruneError(f"autoprune ste '{self.ste}': expected one of {', '.join(STES)}")
        if self.m_optimizer not in M_OPTIMIZERS:
            raise HwpruneError(f"autoprune m_optimizer '{self.m_optimizer}': expected one of {', '.join(M_OPTIMIZERS)}")
        if not 0 < self.slope <= 1:
            raise HwpruneError(f"autoprune slope {self.slope}: expected a number in (0, 1]")
        if not self.m_init > 0:
            raise HwpruneError(f"autoprune m_init {self.m_init}: expected a positive start value (units start on)")
        if not (isinstance(self.m_lr, (int, float)) and self.m_lr > 0):
            raise HwpruneError(f"autoprune m_lr {self.m_lr!r}: expected a positive number")
        if not (isinstance(self.strength, (int, float)) and self.strength >= 0):
            raise HwpruneError(f"autoprune strength {self.strength!r}: expected a number >= 0 (0: calibrated on the first step)")


@register
class AutoPrune(Regularizer):
    """Auxiliary step masks per unit with the sign(w) update and their own optimizer."""

    name = "autoprune"
    Config = AutoPruneConfig
    solves_strength = True  # its own PacedController (see the module docstring)

    def __init__(self, config: AutoPruneConfig, ctx: RegContext):
        super().__init__(config, ctx)
        n = ctx.index.n_units
        self.m = nn.Parameter(torch.full((n,), float(config.m_init)))
        if config.m_optimizer == "adam":
            self.m_opt = torch.optim.Adam([self.m], lr=config.m_lr)
        else:
            self.m_opt = torch.optim.SGD([self.m], lr=config.m_lr)
        self.calibrated = config.strength > 0
        self.controller = PacedController(ctx.schedule, max_speed=float("inf"), interval=10) \
            if config.adaptive and ctx.schedule else None
        self.protect = MinWidthGuard(ctx.index)
        # producer layer -> {param: unit id per output index}
        self.layers: dict[str, dict[str, torch.Tensor]] = {}
        for (module, param, dim), gid in ctx.index.entries(PRODUCER).items():
            if dim != 0:
                continue
            self.layers.setdefault(module, {})[param] = gid
        bad = [f"{name} ({type(ctx.model.get_submodule(name)).__name__})" for name in self.layers
               if not isinstance(ctx.model.get_submodule(name), (nn.modules.batchnorm._BatchNorm, nn.Linear) + _CONVS)]
        if bad:
            raise HwpruneError(
                f"autoprune gates BatchNorm, Conv and Linear layers only; these layers write prunable channels: "
                f"{', '.join(bad)}. Exclude them (--exclude) or choose another method")
        self._name_of = {id(ctx.model.get_submodule(n)): n for n in self.layers}  # hooks see modules
        self._hooks: list = []
        self._stash: dict[int, tuple[torch.Tensor, torch.Tensor, list]] = {}
        # finalize folds the constants of removed units into their readers, on recorded training inputs
        self.bn_of = bn_after(ctx.model)
        self.recorder = InputRecorder(ctx.model)
        self.fold_report: FoldReport | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    def attach(self, resumed: bool = False) -> None:
        if not self._hooks:
            for name in self.layers:
                self._hooks.append(self.ctx.model.get_submodule(name).register_forward_hook(self._gated_forward))
        self.recorder.attach()
        self._snapshot()

    def _masked(self, module: nn.Module, name: str):
        t = getattr(module, GATED, None)
        gid = self.layers[name].get(GATED)
        if t is None or gid is None:
            return t
        return _Masked.apply(t, self.m, gid, 0, self.config.ste, self.config.slope)

    def _gated_forward(self, module, inputs, output):
        name = self._name_of[id(module)]
        x = inputs[0]
        w, b = self._masked(module, name), module.bias  # β / the bias are not gated (module docstring)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return _bn_forward(module, x, w, b)
        if isinstance(module, _CONVS):
            return module._conv_forward(x, w, b)
        return F.linear(x, w, b)

    def penalty(self) -> torch.Tensor | None:
        return self.strength * _Step.apply(self.m, self.config.ste, self.config.slope).sum()

    @torch.no_grad()
    def after_step(self, lr: float, step: int) -> None:
        self._hold_masked(self.m <= 0)  # the mask this step's forward used
        if self.m.grad is not None:
            if not self.calibrated:
                self._calibrate()
            self.m_opt.step()
            self.m_opt.zero_grad(set_to_none=True)
        guard = self.protect.mask(self.m.detach())
        self.m[guard] = self.m[guard].clamp_min(1e-3)  # a hardware minimum width stays on
        if self.controller is not None:
            self.strength = self.controller.update(step + 1, self.zero_fraction(), self.strength)

    @torch.no_grad()
    def _calibrate(self) -> None:
        """Start λ at a tenth of the median unit's loss gradient (the penalty's part is still zero)."""
        typical = float(self.m.grad.abs().median()) or float(self.m.grad.abs().max()) or 1e-6
        self.strength = 0.1 * typical
        self.calibrated = True

    def finalize(self, groups, keep) -> None:
        """The projection's ``keep`` decides: kept units come back with their held weights (ŵ = w, also
        where m ≤ 0); removed units get the function the masked model had, then their constant is folded
        into the layers that read them (the pipeline masks and slices them next)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.recorder.detach()
        removed = ~self.index.keep_from_plan(keep)
        # A removed unit with m ≤ 0 output its β (or its bias) while masked: γ = 0 makes the plain model
        # compute that again, so the fold measures the constant the later layers learnt to use.
        self._scale_gated(torch.where(removed & (self.m.detach().cpu() <= 0), 0.0, 1.0))
        # A collective under torchrun (and so is the measurement below, through the synced BNs): every
        # rank calls both and gets the same inputs, hence the same fold.
        inputs = self.recorder.global_inputs()
        if inputs is not None:
            # The channel means are measured with the BNs on batch statistics: the kept units with m ≤ 0
            # are back on, and the running averages after them, gathered while they were off, are stale
            # until the pipeline re-estimates them after masking. Measured with those stale averages the
            # means of the removed active units were wrong, and the fold into the classifier's bias took
            # the default run from 98.3% to 12.2% after the projection (92% without the fold, 97% with
            # batch statistics). Constant units (γ = 0) give the same constant either way.
            # Readers it cannot fold into (grouped convs, layers with neither a bias nor a BN after them)
            # are listed in ``fold_report.unfolded``: there the constant is dropped with the unit, as
            # masking always did, and fine-tuning has to absorb it. Without recorded inputs (no
            # regularized step ran, so no mask fell) the removed units are dropped the same way.
            self.fold_report = fold_removed_constants(self.ctx.model, self.index, removed, inputs, self.bn_of,
                                                      batch_statistics=True)

    @torch.no_grad()
    def _scale_gated(self, factors: torch.Tensor) -> None:
        """Multiply the gated tensor (γ, or a layer's rows) of each unit by ``factors[unit]`` in place."""
        f = torch.cat([factors.to(torch.float32), torch.ones(1)])
        for name, params in self.layers.items():
            gid = params.get(GATED)
            t = getattr(self.ctx.model.get_submodule(name), GATED, None)
            if gid is None or t is None:
                continue
            shape = [1] * t.dim()
            shape[0] = -1
            t.mul_(f[gid.cpu()].to(device=t.device, dtype=t.dtype).view(shape))

    # --- holding the weights of masked units -----------------------------------------------------
    def _tensors(self):
        """Every distinct tensor of a unit, with the (dim, unit ids) views that touch it."""
        out: dict[int, tuple[torch.Tensor, list]] = {}
        for role in (PRODUCER, NORMALIZED, CONSUMER):
            for (module, param, dim), gid in self.index.entries(role).items():
                t = get_tensor(self.ctx.model, module, param)
                out.setdefault(id(t), (t, []))[1].append((dim, gid))
        return out

    @torch.no_grad()
    def _snapshot(self) -> None:
        self._stash = {k: (t, t.detach().clone(), views) for k, (t, views) in self._tensors().items()}

    @torch.no_grad()
    def _hold_masked(self, masked: torch.Tensor) -> None:
        if not self._stash:
            self._snapshot()
        flag = torch.cat([masked.cpu(), torch.zeros(1, dtype=torch.bool)])
        for key, (t, saved, views) in self._stash.items():
            hold = None
            for dim, gid in views:
                f = flag[gid]
                if not bool(f.any()):
                    continue
                shape = [1] * t.dim()
                shape[dim] = -1
                v = f.view(shape)
                hold = v if hold is None else hold | v
            if hold is not None:
                t.copy_(torch.where(hold, saved, t))
            saved.copy_(t)

    # --- measurements ----------------------------------------------------------------------------
    def scores(self) -> np.ndarray:
        # exp(m): positive and monotone in m, so that a FLOPs projection can weigh it against savings
        return torch.exp(self.m.detach().double()).numpy()

    def zero_fraction(self) -> float:
        return float((self.m.detach() <= 0).double().mean()) if self.index.n_units else 0.0

    def state_dict(self) -> dict:
        return {"strength": self.strength, "m": self.m.detach().clone(), "m_opt": self.m_opt.state_dict(),
                "calibrated": self.calibrated, "inputs": self.recorder.inputs}

    def load_state_dict(self, state: dict) -> None:
        self.strength = float(state["strength"])
        with torch.no_grad():
            self.m.copy_(state["m"])
        self.m_opt.load_state_dict(state["m_opt"])
        self.calibrated = bool(state.get("calibrated", True))
        if state.get("inputs") is not None:
            self.recorder.inputs = state["inputs"]
