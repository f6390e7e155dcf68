"""The half-space stage of HSPG (Chen et al.; OTO) on top of WGSEF's proximal stage (METHODS.md §1.8).

After the switch point every step is:

1. trial point: for each unit (group) that was non-zero before the step,
   ``θ̃_g = θ_g − η·[∇L + λ∇WGSEF]_g``; the optimizer has already applied the loss part, so
   ``θ̃_g = θ_after_step − η·λ·∇_g WGSEF(θ_t)``. Units that were zero stay exactly zero.
2. half-space projection: ``θ̃_g ← 0`` where ``⟨θ̃_g, θ_{t,g}⟩ < ε·‖θ_{t,g}‖²`` (the step left the
   half-space around its old direction). Protected units (hardware minimum width) are never zeroed.

The gradient of WGSEF on the support (§1.8): ``∇_g = w_g²·θ_g`` for 'full' groups (z_g = w_g‖θ_g‖ ≥ ρ)
and ``w_g·ρ·θ_g/‖θ_g‖`` for the others, with ρ of the k-support norm (§1.4).
"""

from __future__ import annotations

import torch

from ..graph.groups import PRODUCER, UnitIndex, get_tensor


@torch.no_grad()
def wgsef_grad_coeff(a: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """``c`` with ``∇_{G_i} WGSEF_k(θ) = c_i·θ_{G_i}``, from the group norms ``a`` and weights ``w``.

    Example:
        >>> a = torch.tensor([5., 4., 2.5, 2., 1., .5], dtype=torch.float64)  # METHODS.md §1.6 Ex. 2, k = 2
        >>> wgsef_grad_coeff(a, torch.ones(6, dtype=torch.float64), 2).tolist()  # no full group: c = ρ/a, ρ = Σa/k
        [1.5, 1.875, 3.0, 3.75, 7.5, 15.0]
    """
    a = a.double()
    w = w.double().to(a.device)
    z = w * a
    nnz = int((z > 0).sum())
    if k >= nnz:
        return w * w
    s, order = torch.sort(z, descending=True)
    tail = torch.flip(torch.cumsum(torch.flip(s, (0,)), 0), (0,))[:k]  # tail[j] = Σ_{i ≥ j} s_i
    rho_all = tail / torch.arange(k, 0, -1, dtype=torch.float64, device=z.device)
    feasible = rho_all >= s[:k] * (1 - 1e-12)
    feasible[-1] = True
    n_full = int(torch.nonzero(feasible)[0])  # the smallest feasible |A| (see METHODS.md §1.4)
    rho = float(rho_all[n_full])
    full = torch.zeros_like(z, dtype=torch.bool)
    full[order[:n_full]] = True
    return torch.where(full, w * w, torch.where(a > 0, w * rho / a.clamp_min(1e-300), torch.zeros_like(a)))


class HalfSpaceStep:
    """The half-space step on the producer entries of every unit.

    Call :meth:`remember` after each step of the proximal stage (it keeps θ_t), then :meth:`step` after
    each optimizer step of the half-space stage.

    Example:
        >>> hs = HalfSpaceStep(index, w, k, guard, epsilon=0.0)     # doctest: +SKIP
        >>> hs.remember(); optimizer.step(); hs.step(lr, lam)        # doctest: +SKIP
        True
    """

    def __init__(self, index: UnitIndex, w: torch.Tensor, k: int, guard, epsilon: float = 0.0):
        self.index, self.w, self.k, self.guard, self.epsilon = index, w, k, guard, float(epsilon)
        self._prev: dict[tuple, torch.Tensor] = {}
        self.last_zeroed = 0  # units the last projection zeroed (for tests and logs)

    def _entries(self):
        for (module, param, dim), gid in self.index.entries(PRODUCER).items():
            yield (module, param, dim), get_tensor(self.index.model, module, param), dim, gid

    @torch.no_grad()
    def remember(self) -> None:
        self._prev = {key: t.detach().clone() for key, t, _, _ in self._entries()}

    def state_dict(self) -> dict:
        return {"|".join(map(str, key)): t for key, t in self._prev.items()}

    def load_state_dict(self, state: dict) -> None:
        keys = {"|".join(map(str, key)): key for key, _, _, _ in self._entries()}
        self._prev = {keys[k]: t.clone() for k, t in state.items() if k in keys}

    def _per_unit(self, values: torch.Tensor, dim: int, gid: torch.Tensor, acc: torch.Tensor) -> None:
        other = [d for d in range(values.dim()) if d != dim]
        acc.index_add_(0, gid, (values.sum(dim=other) if other else values).double())

    @torch.no_grad()
    def step(self, lr: float, lam: float) -> bool:
        """Apply the half-space step; False (nothing done) when θ_t is unknown (first step after a resume)."""
        if not self._prev:
            return False
        n = self.index.n_units
        sq_prev = torch.zeros(n + 1, dtype=torch.float64)
        for key, t, dim, gid in self._entries():
            self._per_unit(self._prev[key] ** 2, dim, gid, sq_prev)
        a_prev = sq_prev[:n].sqrt()
        w = self.w.to(a_prev.device)
        free = ~self.guard.mask(a_prev / w)
        coeff = torch.zeros(n, dtype=torch.float64)
        if bool(free.any()):
            coeff[free] = wgsef_grad_coeff(a_prev[free], w[free], self.k)
        was_zero = torch.cat([a_prev == 0, torch.zeros(1, dtype=torch.bool)])
        c_ext = torch.cat([coeff, torch.zeros(1, dtype=torch.float64)])
        trials, inner = {}, torch.zeros(n + 1, dtype=torch.float64)
        for key, t, dim, gid in self._entries():
            prev = self._prev[key]
            shape = [1] * t.dim()
            shape[dim] = -1
            trial = t - (lr * lam * c_ext[gid]).to(t.dtype).view(shape) * prev
            trial = torch.where(was_zero[gid].view(shape), torch.zeros_like(trial), trial)
            trials[key] = (t, trial, dim, gid, shape)
            self._per_unit(trial * prev, dim, gid, inner)
        leave = (a_prev > 0) & free & (inner[:n] < self.epsilon * a_prev * a_prev)
        self.last_zeroed = int(leave.sum())
        zero_ext = torch.cat([leave, torch.zeros(1, dtype=torch.bool)])
        for t, trial, dim, gid, shape in trials.values():
            t.copy_(torch.where(zero_ext[gid].view(shape), torch.zeros_like(trial), trial))
        self.remember()
        return True
