"""Physical slicing: remove pruned units from the tensors, and fix the layers' size attributes.

The sliced model is a plain, smaller dense model: it saves with ``state_dict``, exports to ONNX at its
new width and needs no hwprune code to run.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..graph.groups import Group, UnitIndex
from ..graph.ops import FUNCTIONAL_LAYER_TYPES
from .resizers import AFTER_SLICE, find_resizer, resizer

@resizer(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _resize_conv(m: nn.Conv2d, old: dict) -> None:
    out_old, in_old, groups_old = m.out_channels, m.in_channels, m.groups
    m.out_channels = m.weight.shape[0]
    if groups_old == 1:
        m.in_channels = m.weight.shape[1]
    else:  # whole conv groups were removed
        m.groups = m.out_channels // (out_old // groups_old)
        m.in_channels = m.groups * (in_old // groups_old)


@resizer(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _resize_conv_t(m: nn.ConvTranspose2d, old: dict) -> None:
    m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1]


@resizer(nn.Linear)
def _resize_linear(m: nn.Linear, old: dict) -> None:
    m.out_features, m.in_features = m.weight.shape


@resizer(nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
def _resize_bn(m: nn.BatchNorm2d, old: dict) -> None:
    ref = m.weight if m.weight is not None else m.running_mean
    m.num_features = ref.shape[0]


@resizer(nn.GroupNorm)
def _resize_gn(m: nn.GroupNorm, old: dict) -> None:
    m.num_channels = m.num_groups = m.weight.shape[0]


@resizer(nn.PReLU)
def _resize_prelu(m: nn.PReLU, old: dict) -> None:
    m.num_parameters = m.weight.shape[0]


@resizer(nn.Embedding)
def _resize_embedding(m: nn.Embedding, old: dict) -> None:
    m.embedding_dim = m.weight.shape[1]


def _tensors_only(m: nn.Module, old: dict) -> None:
    """Resizer of a layer whose sizes live only in its tensors."""


def kept_indices(groups: list[Group], keep: dict[str, np.ndarray]) -> dict[tuple[str, str, int], np.ndarray]:
    """For every touched ``(module, param, dim)``, the indices that survive along that dim."""
    masks: dict[tuple[str, str, int], np.ndarray] = {}
    for g in groups:
        if g.name not in keep:
            continue
        kept_units = np.zeros(g.size, dtype=bool)
        kept_units[np.asarray(keep[g.name], dtype=np.int64)] = True
        for m in g.members:
            key = (m.module, m.param, m.dim)
            alive = (m.unit_of < 0) | kept_units[np.maximum(m.unit_of, 0)]
            masks[key] = alive if key not in masks else masks[key] & alive
    return {k: np.flatnonzero(v) for k, v in masks.items()}


@torch.no_grad()
def slice_model(model: nn.Module, groups: list[Group], keep: dict[str, np.ndarray]) -> nn.Module:
    """Remove every unit not in ``keep[group_name]`` from ``model``, in place; returns the model.

    Example:
        >>> from hwprune.graph import discover_groups
        >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1))
        >>> x = torch.zeros(1, 3, 8, 8)
        >>> groups = discover_groups(net, x)
        >>> net = slice_model(net, groups, {groups[0].name: [0, 2, 5]})
        >>> net[0].out_channels, net[1].num_features, net[3].in_channels, tuple(net(x).shape)
        (3, 3, 3, (1, 8, 6, 6))
    """
    for g in groups:
        if g.name in keep:
            k = np.asarray(keep[g.name])
            if len(k) == 0:
                raise ModelError(f"group '{g.name}': keeping 0 units would remove the layer; keep at least {g.min_keep}")
            if k.min() < 0 or k.max() >= g.size or len(np.unique(k)) != len(k):
                raise ModelError(f"group '{g.name}': kept units must be distinct indices in [0, {g.size})")
    per_module: dict[str, list[tuple[str, int, np.ndarray]]] = {}
    for (module, param, dim), idx in kept_indices(groups, keep).items():
        per_module.setdefault(module, []).append((param, dim, idx))
    for module_name, cuts in per_module.items():
        module = model.get_submodule(module_name) if module_name else model
        tensors = []
        for param, dim, idx in cuts:
            old_sizes = getattr(module, param)
            if isinstance(old_sizes, (list, tuple)):  # split sizes (graph.groups.SIZES): piece `dim` keeps len(idx)
                setattr(module, param, type(old_sizes)(len(idx) if j == dim else n for j, n in enumerate(old_sizes)))
            else:
                tensors.append((param, dim, idx))
        cuts = tensors
        if not cuts:
            continue
        fix = find_resizer(module)
        if fix is None and type(module) in FUNCTIONAL_LAYER_TYPES:
            # A layer of the user's own, found through F.conv2d / F.linear / F.batch_norm on its
            # parameters (graph.ops "functional layers"): its tensors are all there is to resize.
            fix = _tensors_only
        if fix is None:
            raise ModelError(
                f"layer '{module_name}' ({type(module).__name__}): hwprune cannot resize this layer type; "
                "exclude it (--exclude) to keep its channels"
            )
        old = {}
        for param, dim, idx in cuts:
            t = getattr(module, param)
            old[param] = tuple(t.shape)
            if len(idx) == t.shape[dim]:
                continue
            new = t.index_select(dim, torch.as_tensor(idx, dtype=torch.long, device=t.device)).clone()
            if isinstance(t, nn.Parameter):
                setattr(module, param, nn.Parameter(new, requires_grad=t.requires_grad))
            else:
                module.register_buffer(param, new)
        fix(module, old)
    for fn in AFTER_SLICE:
        fn(model)
    return model


@torch.no_grad()
def mask_model(model: nn.Module, groups: list[Group], keep: dict[str, np.ndarray]) -> nn.Module:
    """Zero every unit not in ``keep`` (producers and consumers), in place: the masked model.

    Its output equals the sliced model's; tests use it as the reference for slicing.
    """
    index = UnitIndex(model, groups)
    index.mask_(index.keep_from_plan(keep))
    return model


def reinitialize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh random weights (training from scratch): every layer resets itself, then convs and linears
    get the Kaiming init the built-in models use, BN gets weight 1 and bias 0."""
    from ..models._common import kaiming_init

    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
    return kaiming_init(model)

