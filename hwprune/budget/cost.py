"""FLOPs and parameter counts as functions of which units are kept.

Every cost is a sum of terms ``coeff * count[a] * count[b]`` (``b`` optional), where ``count[v]`` is
the size of one tensor dimension (a conv's output channels, a linear layer's inputs):
``count = fixed + A @ keep``, with ``A[v, u]`` the number of indices unit ``u`` owns along ``v``.
A conv costs ``k·S · C_out · C_in`` multiply-accumulates; a parameter tensor ``numel`` scaled by its
sliced dims. Evaluating a cost is a few numpy ops, and the marginal saving of every unit at once is
``A.T @ grad``: this is what lets the budget projection be exact and fast.

FLOPs are counted the way the pruning literature counts them: multiply-accumulates of conv and linear
layers per sample (BN, activations and pooling are not counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse import csr_matrix
from torch import nn

from ..graph.groups import SIZES, Group


@dataclass
class CostModel:
    """A cost that is bilinear in per-dimension kept counts. Build with :func:`flops_model` / :func:`params_model`."""

    name: str
    A: csr_matrix  # (n_vars, n_units)
    fixed: np.ndarray  # (n_vars,)
    coeff: np.ndarray  # (n_terms,)
    v1: np.ndarray  # (n_terms,) var index or -1
    v2: np.ndarray  # (n_terms,) var index or -1
    constant: float = 0.0

    # What the pipeline asks of any cost model (hwprune.latency.model.LatencyModel answers the same):
    # in_ms: the cost is a latency in milliseconds; stepwise: flat between the target's hardware steps
    # (a measured profile), so it cannot rank groups by what their units cost.
    in_ms = False
    stepwise = False

    @property
    def saves_compute(self) -> bool:
        """Whether removing a unit saves compute (FLOPs), not only storage (params)."""
        return self.name == "flops"

    def counts(self, keep: np.ndarray) -> np.ndarray:
        return self.fixed + self.A @ keep.astype(np.float64)

    def _factors(self, c: np.ndarray):
        f1 = np.where(self.v1 >= 0, c[np.maximum(self.v1, 0)], 1.0)
        f2 = np.where(self.v2 >= 0, c[np.maximum(self.v2, 0)], 1.0)
        return f1, f2

    def __call__(self, keep: np.ndarray) -> float:
        """Total cost with units kept where ``keep`` is 1."""
        c = self.counts(keep)
        f1, f2 = self._factors(c)
        return float(self.constant + np.sum(self.coeff * f1 * f2))

    def batch(self, keeps: np.ndarray) -> np.ndarray:
        """The cost of every column of ``keeps`` (units x candidates) at once."""
        return self.cost_of_counts(self.fixed[:, None] + self.A @ np.asarray(keeps, dtype=np.float64))

    def cost_of_counts(self, c: np.ndarray) -> np.ndarray:
        """The cost of every column of ``c``: kept counts per variable (n_vars x candidates). The
        allocation solver varies one group at a time and updates only that group's variables."""
        return self.constant + self.partial_cost(c, None)

    def partial_cost(self, c: np.ndarray, rows) -> np.ndarray:
        """The sum of the terms that read any variable in ``rows`` (every term for None), per column."""
        terms = np.arange(len(self.coeff)) if rows is None else \
            np.flatnonzero(np.isin(self.v1, rows) | np.isin(self.v2, rows))
        v1, v2 = self.v1[terms], self.v2[terms]
        f1 = np.where((v1 >= 0)[:, None], c[np.maximum(v1, 0)], 1.0)
        f2 = np.where((v2 >= 0)[:, None], c[np.maximum(v2, 0)], 1.0)
        return (self.coeff[terms][:, None] * f1 * f2).sum(axis=0)

    def unit_savings(self, keep: np.ndarray) -> np.ndarray:
        """First-order cost saved by removing each unit alone, given the current ``keep``."""
        c = self.counts(keep)
        f1, f2 = self._factors(c)
        n = len(self.fixed)
        grad = np.zeros(n)
        m1, m2 = self.v1 >= 0, self.v2 >= 0
        np.add.at(grad, self.v1[m1], (self.coeff * f2)[m1])
        np.add.at(grad, self.v2[m2], (self.coeff * f1)[m2])
        return self.A.T @ grad


def width_variables(groups: list[Group]):
    """Variables (module, param, dim) touched by groups, their fixed counts, and the A matrix."""
    prunable = [g for g in groups if g.prunable]
    offsets = np.concatenate([[0], np.cumsum([g.size for g in prunable])]).astype(np.int64)
    var_index: dict[tuple[str, str, int], int] = {}
    covered: dict[int, np.ndarray] = {}
    full: dict[int, int] = {}
    rows, cols = [], []
    for g in groups:
        for m in g.members:
            if m.role == SIZES:  # a list of split sizes, not a tensor dimension
                continue
            key = (m.module, m.param, m.dim)
            v = var_index.setdefault(key, len(var_index))
            full[v] = len(m.unit_of)
            cov = covered.setdefault(v, np.zeros(len(m.unit_of), dtype=bool))
            if g.prunable:
                hit = m.unit_of >= 0
                cov |= hit
                gi = prunable.index(g)
                rows.append(np.full(hit.sum(), v))
                cols.append(m.unit_of[hit] + offsets[gi])
    n_vars, n_units = len(var_index), int(offsets[-1])
    r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    A = csr_matrix((np.ones(len(r)), (r, c)), shape=(n_vars, n_units))
    fixed = np.array([full[v] - covered[v].sum() for v in range(n_vars)], dtype=np.float64)
    return var_index, A, fixed, full


def layer_calls(model: nn.Module, example_inputs) -> list[tuple[str, nn.Module, tuple, tuple]]:
    """(name, module, input shape, output shape) of every conv / linear call in one forward pass."""
    calls = []
    hooks = []
    from ..graph.hf import HFConv1D

    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                          nn.Linear, HFConv1D)):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: calls.append((name, mod, tuple(inp[0].shape), tuple(out.shape)))))
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
        for m, t in was:
            m.train(t)
    return calls


def flops_model(model: nn.Module, example_inputs, groups: list[Group]) -> CostModel:
    """MACs per sample of conv and linear layers, as a function of the kept units.

    Example:
        >>> from hwprune.graph import discover_groups
        >>> net, x = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 1)), torch.zeros(1, 3, 8, 8)
        >>> cm = flops_model(net, (x,), discover_groups(net, x))
        >>> cm(np.ones(16))              # all 16 channels kept: 16*3*9*36 + 8*16*36 MACs
        20160.0
        >>> cm(np.r_[np.ones(4), np.zeros(12)])     # 4 kept
        5040.0
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    var_index, A, fixed, _ = width_variables(groups)
    batch = example_inputs[0].shape[0]
    coeff, v1, v2 = [], [], []
    constant = 0.0

    def var(name, dim):
        return var_index.get((name, "weight", dim), -1)

    for name, m, ins, outs in layer_calls(model, example_inputs):
        if isinstance(m, nn.Linear):
            tokens = int(np.prod(outs[:-1])) / batch
            a, b = var(name, 0), var(name, 1)
            base = tokens * (m.out_features if a < 0 else 1) * (m.in_features if b < 0 else 1)
        elif not isinstance(m, nn.modules.conv._ConvNd):  # transformers' Conv1D: a linear with weight (in, out)
            tokens = int(np.prod(outs[:-1])) / batch
            n_in, n_out = m.weight.shape
            a, b = var(name, 1), var(name, 0)
            base = tokens * (n_out if a < 0 else 1) * (n_in if b < 0 else 1)
        else:
            spatial = float(np.prod(outs[2:]))
            k = float(np.prod(m.kernel_size))
            transposed = isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
            if transposed:  # weight (C_in, C_out, k): MACs = C_in * C_out * k * S_in
                spatial = float(np.prod(ins[2:]))
                a, b = var(name, 1), var(name, 0)
                base = k * spatial * (m.out_channels if a < 0 else 1) * (m.in_channels if b < 0 else 1)
            elif m.groups == 1:
                a, b = var(name, 0), var(name, 1)
                base = k * spatial * (m.out_channels if a < 0 else 1) * (m.in_channels if b < 0 else 1)
            else:  # grouped: each output reads in_channels/groups inputs, a fixed number
                a, b = var(name, 0), -1
                base = k * spatial * (m.in_channels // m.groups) * (m.out_channels if a < 0 else 1)
        if a < 0 and b < 0:
            constant += base
        else:
            coeff.append(base), v1.append(a), v2.append(b)
    return CostModel("flops", A, fixed, np.array(coeff, dtype=np.float64), np.array(v1, dtype=np.int64),
                     np.array(v2, dtype=np.int64), constant)


def params_model(model: nn.Module, groups: list[Group]) -> CostModel:
    """Number of parameters as a function of the kept units."""
    var_index, A, fixed, full = width_variables(groups)
    coeff, v1, v2 = [], [], []
    constant = 0.0
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            dims = [(d, var_index[(mname, pname, d)]) for d in range(p.dim()) if (mname, pname, d) in var_index]
            if not dims:
                constant += p.numel()
                continue
            if len(dims) > 2:
                raise ValueError(f"{mname}.{pname}: more than two pruned dims")
            scale = float(p.numel()) / float(np.prod([full[v] for _, v in dims]))
            coeff.append(scale)
            v1.append(dims[0][1])
            v2.append(dims[1][1] if len(dims) > 1 else -1)
    return CostModel("params", A, fixed, np.array(coeff, dtype=np.float64), np.array(v1, dtype=np.int64),
                     np.array(v2, dtype=np.int64), constant)


def count_params(model: nn.Module) -> int:
    """Number of parameters of a (sliced) model."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example_inputs) -> float:
    """MACs per sample of conv and linear layers of a (sliced) model, measured with forward hooks."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    return flops_model(model, example_inputs, [])(np.zeros(0))
