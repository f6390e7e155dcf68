"""Layers as libraries write them: numeric checks of what a leaf does to channels.

Group discovery reads a layer's channel semantics from its type (:mod:`.ops`). Model libraries subclass
the standard layers and give them their own ``forward`` (efficientnet-pytorch's
``Conv2dStaticSamePadding``, geffnet's ``Conv2dSame``, weight-standardised convs), or write layers fx
cannot trace at all (jit-scripted activations, custom autograd functions). Trusting the type would be
a guess, so each such layer is run here on random inputs of the shape the trace saw, in float64:

* :func:`check_subclass` — for a subclass of a known layer with its own ``forward``: is removing
  output channels the same as dropping them from the full output? Is removing input channels (and the
  weight slices that read them) the same as zeroing them? Each answer that is *no* blocks that side
  of the layer with a reason, so the layer still works and is never sliced wrongly.
* :func:`probe_channelwise` — for a parameter-free module hwprune knows nothing about: does permuting
  its input channels permute its output the same way, and does dropping input channels drop the same
  output channels? Then channels flow through it unchanged (an activation, a padding, a pool).

Example:
    >>> class SamePadConv(nn.Conv2d):              # how efficientnet-pytorch writes a conv
    ...     def forward(self, x):
    ...         return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0)
    >>> check_subclass(SamePadConv(4, 6, 3), (2, 4, 8, 8))
    (True, True)
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F  # noqa: F401  (the doctest's layer uses it)
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TOL = 1e-9


def standard_base(module: nn.Module) -> type | None:
    """The first class in ``module``'s hierarchy that torch.nn defines (None if it is one itself)."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn"):
            return None if cls is type(module) else cls
    return None


def overrides_forward(module: nn.Module) -> bool:
    """True for a subclass of a torch.nn layer with its own ``forward`` (hwprune's own layers excepted:
    they are written to keep the standard semantics and are tested as such)."""
    base = standard_base(module)
    if base is None or type(module).__module__.startswith("hwprune."):
        return False
    return type(module).forward is not base.forward


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-7, atol=_TOL * (1 + float(b.abs().max()))))


@torch.no_grad()
def _run(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    try:
        y = module(x)
    except Exception:
        return None
    return y if isinstance(y, torch.Tensor) else None


def _halves(n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a random half of ``range(n)`` (at least one kept)."""
    return np.sort(rng.choice(n, size=max(1, n // 2), replace=False))


def _sliced(module: nn.Module, cuts: dict[str, tuple[int, np.ndarray]]) -> nn.Module:
    """A copy of ``module`` with ``param`` cut to ``idx`` along ``dim`` and its size attributes updated."""
    from ..apply.resizers import find_resizer
    from ..apply import slicing  # noqa: F401  (registers the standard resizers)

    m = copy.deepcopy(module)
    for param, (dim, idx) in cuts.items():
        t = getattr(m, param, None)
        if t is None:
            continue
        new = t.index_select(dim, torch.as_tensor(idx)).clone()
        if isinstance(t, nn.Parameter):
            setattr(m, param, nn.Parameter(new))
        else:  # running statistics stay buffers
            m.register_buffer(param, new)
    fix = find_resizer(m)
    if fix is not None:
        fix(m, {})
    return m


@torch.no_grad()
def check_subclass(module: nn.Module, in_shape: tuple[int, ...], seed: int = 0) -> tuple[bool, bool]:
    """``(outputs_ok, inputs_ok)``: whether slicing ``module``'s output / input channels keeps the
    standard semantics, measured on a random input of ``in_shape`` (channels on axis 1; features on
    the last axis for a linear layer). Layers other than convs, linears and per-channel norms are
    checked as channel-wise (:func:`probe_channelwise`), the answer used for both sides.
    """
    rng = np.random.default_rng(seed)
    m = copy.deepcopy(module).double().eval()
    x = torch.from_numpy(rng.standard_normal(in_shape))
    full = _run(m, x)
    if full is None:
        return False, False
    if isinstance(m, nn.Linear):
        return _check_weighted(m, x, full, -1, rng)
    if isinstance(m, _CONVS):
        if m.groups == 1:
            return _check_weighted(m, x, full, 1, rng)
        # a unit is a whole conv group: its inputs and outputs go together
        unit_out, unit_in = m.out_channels // m.groups, m.in_channels // m.groups
        keep_g = _halves(m.groups, rng)
        keep_out = (keep_g[:, None] * unit_out + np.arange(unit_out)).ravel()
        keep_in = (keep_g[:, None] * unit_in + np.arange(unit_in)).ravel()
        cut = _sliced(m, {"weight": (0, keep_out), "bias": (0, keep_out)})
        y = _run(cut, x[:, keep_in])
        ok = y is not None and _close(y, full[:, keep_out])
        return ok, ok
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        keep = _halves(in_shape[1], rng)
        cut = _sliced(m, {p: (0, keep) for p in ("weight", "bias", "running_mean", "running_var")})
        y = _run(cut, x[:, keep])
        ok = y is not None and _close(y, full[:, keep])
        return ok, ok
    ok = probe_channelwise(m, in_shape, seed)
    return ok, ok


def _check_weighted(m: nn.Module, x: torch.Tensor, full: torch.Tensor, axis: int, rng) -> tuple[bool, bool]:
    n_out, n_in = m.weight.shape[0], m.weight.shape[1]
    keep_out = _halves(n_out, rng)
    cut = _sliced(m, {"weight": (0, keep_out), "bias": (0, keep_out)})
    y = _run(cut, x)
    outputs_ok = y is not None and _close(y, full.index_select(axis, torch.as_tensor(keep_out)))

    keep_in = _halves(n_in, rng)
    dropped = np.setdiff1d(np.arange(n_in), keep_in)
    masked = copy.deepcopy(m)  # what masking does: the input channels and the weights that read them are zero
    masked.weight[:, torch.as_tensor(dropped)] = 0
    x_masked = x.clone()
    x_masked.index_fill_(axis if axis >= 0 else x.dim() - 1, torch.as_tensor(dropped), 0.0)
    cut = _sliced(m, {"weight": (1, keep_in)})
    y_cut = _run(cut, x.index_select(axis, torch.as_tensor(keep_in)))
    y_masked = _run(masked, x_masked)
    inputs_ok = y_cut is not None and y_masked is not None and _close(y_cut, y_masked)
    return outputs_ok, inputs_ok


@torch.no_grad()
def probe_channelwise(module: nn.Module, in_shape: tuple[int, ...], seed: int = 0, axis: int = 1) -> bool:
    """True when ``module`` treats the channels along ``axis`` independently and alike: its output has
    the input's channel count on ``axis``, a permutation of the input channels permutes the output the
    same way, and dropping input channels drops the same output channels.

    Example:
        >>> probe_channelwise(nn.Hardswish(), (2, 6, 5, 5)), probe_channelwise(nn.Softmax(dim=1), (2, 6, 5, 5))
        (True, False)
    """
    if len(in_shape) <= axis or in_shape[axis] < 2:
        return False
    rng = np.random.default_rng(seed)
    m = copy.deepcopy(module).double().eval()
    # Inputs spread over both signs and magnitudes, so that a threshold or a clamp is exercised.
    x = torch.from_numpy(rng.standard_normal(in_shape) * 3)
    y = _run(m, x)
    if y is None or y.dim() != x.dim() or y.shape[axis] != x.shape[axis]:
        return False
    perm = torch.as_tensor(rng.permutation(in_shape[axis]))
    y_perm = _run(m, x.index_select(axis, perm))
    if y_perm is None or not _close(y_perm, y.index_select(axis, perm)):
        return False
    keep = torch.as_tensor(_halves(in_shape[axis], rng))
    y_part = _run(m, x.index_select(axis, keep))
    return y_part is not None and _close(y_part, y.index_select(axis, keep))
