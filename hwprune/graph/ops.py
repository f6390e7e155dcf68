"""How channels flow through each op.

Every tensor in the traced graph carries a :class:`Value`: the global *ids* of the channels along its
channel axis. Handlers, registered per module type, function or method name, create fresh ids (conv,
linear outputs), pass ids through (activations, pooling, BN), unify them (residual adds), concatenate
them (``cat``), repeat them (``flatten`` into a linear layer) or block them (ops that mix channels).
They also declare which parameter dimensions index which ids (:meth:`Ctx.member`).

A new op is one decorated function; nothing else changes.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .groups import BUFFER, CONSUMER, PRODUCER, SIZES


@dataclass
class Value:
    """A traced tensor: its shape, its channel axis, and the ids of the channels along that axis.

    ``ids is None`` means the tensor has no tracked channel axis (e.g. after a mean over channels).
    """

    shape: tuple[int, ...]
    axis: int | None = None
    ids: np.ndarray | None = None
    producer: str | None = None  # the conv/linear whose raw output this is (for BN scale invariance)

    @property
    def tracked(self) -> bool:
        return self.ids is not None


@dataclass
class SplitValue(Value):
    """A tensor whose channel axis was split into two axes (``view(B, g, C // g, H, W)``, the first half
    of a channel shuffle). ``grid[i, j]`` is the id of the channel at index i of tensor dim
    ``axes[0]`` and index j of dim ``axes[1]``. Only reshapes, transposes and copies may follow it:
    any other op blocks its channels (see :func:`split_value_ops`).
    """

    axes: tuple[int, int] = (0, 0)
    grid: np.ndarray | None = None

    def merged(self, out_shape) -> Value:
        """Merge the two axes back into one (the second half of a shuffle): ids in memory order."""
        order = self.grid if self.axes[0] < self.axes[1] else self.grid.T
        return Value(tuple(out_shape), min(self.axes), order.ravel())


@dataclass
class Param(Value):
    """A parameter or buffer read with ``get_attr`` (``self.weight`` inside a layer's own forward):
    ``name`` is its qualified name, so that functional ops on it (``F.conv2d(x, self.weight)``) can
    declare it as a member of the layer that owns it."""

    name: str = ""

    @property
    def owner_and_param(self) -> tuple[str, str]:
        module, _, param = self.name.rpartition(".")
        return module, param


class Ctx:
    """Collects ids, unions, blocked ids and members while the graph is walked."""

    def __init__(self):
        self.n = 0
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.blocked: list[tuple[np.ndarray, str]] = []
        self.members: list[tuple[str, str, int, str, np.ndarray]] = []
        self._member_ids: dict[tuple[str, str, int, str], np.ndarray] = {}
        self.layer_kind: dict[str, str] = {}
        self.normalized: set[str] = set()  # layers whose output goes straight into a BatchNorm
        self.tags: list[tuple[np.ndarray, "UnitTag"]] = []  # units that are not plain channels (heads)
        self.notes: dict[str, str] = {}  # layer -> what hwprune inferred or could not follow there
        self.where: str = ""  # the module the op being walked was traced inside
        self.modules: dict[str, nn.Module] = {}  # the model's modules by name
        self.live: bool = True  # whether the op being walked feeds the model's output

    @property
    def owner(self) -> nn.Module | None:
        """The module the op being walked was traced inside."""
        return self.modules.get(self.where)

    def functional_layer(self, layer: str, op: str) -> None:
        """``layer``'s parameters are used by a functional op (F.conv2d on self.weight): its sizes live
        in its tensors only, so slicing may resize it by cutting them (:data:`FUNCTIONAL_LAYER_TYPES`)."""
        module = self.modules.get(layer)
        if module is not None and not type(module).__module__.startswith("torch.nn"):
            FUNCTIONAL_LAYER_TYPES.add(type(module))
        self.note(layer, f"found through {op} on its parameters")

    def note(self, layer: str, text: str) -> None:
        """Remember something the user should be able to read about ``layer`` (first note wins)."""
        self.notes.setdefault(layer, text)

    def new(self, count: int) -> np.ndarray:
        ids = np.arange(self.n, self.n + count, dtype=np.int64)
        self.n += count
        return ids

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.broadcast_arrays(np.asarray(a), np.asarray(b))
        self.edges.append((a.ravel(), b.ravel()))

    def block(self, ids: np.ndarray | None, reason: str) -> None:
        if ids is not None and len(ids):
            self.blocked.append((np.asarray(ids), reason))

    def member(self, module: str, param: str, dim: int, ids: np.ndarray, role: str) -> None:
        """Declare that index i along ``module.param`` dim ``dim`` belongs to channel ``ids[i]``.

        A module called twice (weight sharing) declares twice: the ids of both calls are unified.
        """
        key = (module, param, dim, role)
        ids = np.asarray(ids)
        if key in self._member_ids:
            self.union(self._member_ids[key], ids)
            return
        self._member_ids[key] = ids
        self.members.append((module, param, dim, role, ids))

    def tag(self, ids: np.ndarray, tag: "UnitTag") -> None:
        """Mark ``ids`` as units of another kind than channels (attention heads): the group built from
        them takes the tag's name, kind and layer kind (which sets its hardware multiple)."""
        self.tags.append((np.asarray(ids), tag))

    def fresh(self, shape, axis: int | None, reason: str | None = None) -> Value:
        """A value whose channels are new (and blocked with ``reason`` if given)."""
        if shape is None or axis is None or len(shape) == 0:
            return Value(tuple(shape or ()), None, None)
        ids = self.new(shape[axis])
        if reason:
            self.block(ids, reason)
        return Value(tuple(shape), axis, ids)


@dataclass(frozen=True)
class UnitTag:
    """What a tagged unit is: ``kind`` ('heads'), ``layer_kind`` (the target key whose multiple
    applies, 'attention') and the group's ``name`` (the attention layer)."""

    kind: str
    layer_kind: str
    name: str


class Unsupported(Exception):
    """Raised by a handler when an op is used in a way hwprune cannot follow."""


# ---------------------------------------------------------------------------------------------------
# Registries.

# Layer classes of the user's own whose parameters discovery found through functional ops: slicing
# resizes them by cutting their tensors (they have no size attributes that hwprune knows of).
FUNCTIONAL_LAYER_TYPES: set[type] = set()

Handler = Callable[..., Any]
MODULE_HANDLERS: list[tuple[tuple[type, ...], Handler]] = []
FUNCTION_HANDLERS: dict[Any, Handler] = {}
METHOD_HANDLERS: dict[str, Handler] = {}


def for_modules(*types: type):
    def deco(fn):
        MODULE_HANDLERS.append((types, fn))
        return fn

    return deco


def for_functions(*fns):
    def deco(fn):
        for f in fns:
            if f in FUNCTION_HANDLERS:
                raise ValueError(f"duplicate handler for function {f}")
            FUNCTION_HANDLERS[f] = fn
        return fn

    return deco


def for_methods(*names: str):
    def deco(fn):
        for n in names:
            if n in METHOD_HANDLERS:
                raise ValueError(f"duplicate handler for method {n}")
            METHOD_HANDLERS[n] = fn
        return fn

    return deco


def known_layer_types() -> tuple[type, ...]:
    """Every layer type with a handler: instances (subclasses included) are traced as leaves."""
    return tuple(t for types, _ in MODULE_HANDLERS for t in types)


def module_handler(module: nn.Module) -> Handler | None:
    for types, fn in MODULE_HANDLERS:
        if isinstance(module, types):
            return fn
    return None


# ---------------------------------------------------------------------------------------------------
# Shared helpers. Handler signature: fn(ctx, name, module, args, kwargs, out_shape) -> Value | tuple | None


def call_arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def passthrough(x: Value, out_shape) -> Value:
    """Same channels, same axis (spatial size may change)."""
    if not isinstance(x, Value):
        raise Unsupported("expected a tensor input")
    if isinstance(x, SplitValue):
        if tuple(out_shape or ()) != tuple(x.shape):
            raise Unsupported("the channel axis is split in two here, and this op changes the shape")
        return x
    if not x.tracked or out_shape is None:
        return Value(tuple(out_shape or ()), None, None)
    shift = len(out_shape) - len(x.shape)
    axis = x.axis + shift
    if not (0 <= axis < len(out_shape)) or out_shape[axis] != len(x.ids):
        raise Unsupported(f"the channel axis ({len(x.ids)} channels) does not survive this op")
    return Value(tuple(out_shape), axis, x.ids)


def _unary(ctx, name, module, args, kwargs, out_shape):
    return passthrough(args[0], out_shape)


def _binary(ctx, name, module, args, kwargs, out_shape):
    values = [a for a in list(args[:2]) + [kwargs.get("other")] if isinstance(a, Value)]
    nd = len(out_shape)
    first: tuple[int, np.ndarray] | None = None
    for v in values:
        if not v.tracked:
            continue
        if len(v.ids) == 1 and out_shape[v.axis + nd - len(v.shape)] > 1:
            continue  # one channel broadcast over all of the other's (a spatial attention map): it couples none
        pos = v.axis + nd - len(v.shape)
        if first is None:
            first = (pos, v.ids)
        elif first[0] == pos:
            ctx.union(first[1], v.ids)
        else:
            ctx.block(first[1], f"'{name}' combines tensors along different channel axes")
            ctx.block(v.ids, f"'{name}' combines tensors along different channel axes")
    if first is None:
        return Value(tuple(out_shape), None, None)
    pos, ids = first
    for v in values:  # an untracked full-width operand along the channel axis: we cannot follow it
        if not v.tracked:
            off = pos - (nd - len(v.shape))
            if 0 <= off < len(v.shape) and v.shape[off] == len(ids) and len(ids) > 1:
                if isinstance(v, Param) and all(n == 1 for i, n in enumerate(v.shape) if i != off):
                    _per_channel_param(ctx, name, v, off, ids)
                else:
                    ctx.block(ids, f"'{name}' combines the channels with an untracked per-channel tensor")
    return Value(tuple(out_shape), pos, ids)


def _per_channel_param(ctx, name, v: "Param", dim: int, ids: np.ndarray) -> None:
    """``x * self.gamma`` / ``x + self.beta`` with one entry per channel (a learnable scale, a layer
    scale, a bias of the user's own layer): the parameter is sliced with the channels along ``dim``."""
    layer, param = v.owner_and_param
    owner = ctx.modules.get(layer)
    is_buffer = owner is not None and param in getattr(owner, "_buffers", {})
    ctx.member(layer, param, dim, ids, BUFFER if is_buffer else PRODUCER)
    ctx.functional_layer(layer, name)


def _reduce(x: Value, dims, keepdim: bool, out_shape, ctx, name) -> Value:
    if not x.tracked:
        return Value(tuple(out_shape), None, None)
    nd = len(x.shape)
    if dims is None:
        dims = list(range(nd))
    dims = [dims] if isinstance(dims, int) else list(dims)
    dims = [_norm_dim(d, nd) for d in dims]
    if x.axis in dims:
        if ctx.live:  # a result the model's output never uses (a discarded statistic) blocks nothing
            ctx.block(x.ids, f"'{name}' reduces over the channel axis")
        return Value(tuple(out_shape), None, None)
    axis = x.axis if keepdim else x.axis - sum(d < x.axis for d in dims)
    return Value(tuple(out_shape), axis, x.ids)


def _reshape(x: Value, out_shape, ctx: Ctx | None = None, sizes=None, name: str = "reshape") -> Value:
    """Follow the channel axis through a reshape: kept in place, merged with trailing dims, split in
    two (the first half of a channel shuffle: :func:`_split_channels`) or merged back from a split."""
    if isinstance(x, SplitValue):
        lo, hi = sorted(x.axes)
        out, ins = tuple(out_shape), x.shape
        if hi == lo + 1 and out == ins[:lo] + (ins[lo] * ins[hi],) + ins[hi + 1 :]:
            return x.merged(out)
        raise Unsupported(f"reshape {ins} -> {out} of a channel axis split in two is not a merge back")
    if not x.tracked:
        return Value(tuple(out_shape), None, None)
    ins, a = x.shape, x.axis
    out = tuple(out_shape)
    if ctx is not None and sizes is not None and len(sizes) > a and len(sizes) == len(out) and \
            isinstance(sizes[a], int) and sizes[a] == out[a] and out[a] > 1 and out[a] % len(x.ids) == 0 \
            and out[:a] == ins[:a]:
        # view(B, 64, -1): a channel count written as a constant breaks once channels are removed
        ctx.block(x.ids, f"'{name}' writes the channel count as a constant ({sizes[a]}); compute it from "
                         "the tensor (x.size(1), or -1) to let hwprune prune these channels")
    if (ctx is not None and len(out) == len(ins) + 1 and out[:a] == ins[:a] and out[a + 2 :] == ins[a + 1 :]
            and out[a] * out[a + 1] == ins[a] and out[a] > 1 and out[a + 1] > 1):
        return _split_channels(ctx, x, out, sizes, name)
    if out[:a] == ins[:a] and len(out) > a:
        if out[a] == ins[a] and math.prod(out[a + 1 :]) == math.prod(ins[a + 1 :]):
            return Value(out, a, x.ids)
        # channel axis merged with the dims after it: each channel owns a run of positions
        for j in range(a + 1, len(ins) + 1):
            if math.prod(ins[a:j]) == out[a] and out[a + 1 :] == ins[j:]:
                return Value(out, a, np.repeat(x.ids, math.prod(ins[a + 1 : j])))
    # leading dims merged or split before the channel axis (e.g. (B, T, C) -> (B*T, C))
    tail_in, tail_out = ins[a:], out[len(out) - len(ins) + a :] if len(out) >= len(ins) - a else ()
    if tail_in == tail_out:
        return Value(out, len(out) - len(ins) + a, x.ids)
    raise Unsupported(f"reshape {ins} -> {out} splits or reorders the channel axis")


def _split_channels(ctx: Ctx, x: Value, out, sizes, name: str) -> Value:
    """``view(B, g, C // g, ...)``: the channel axis becomes a (g, C/g) grid.

    After pruning the same code runs on fewer channels, so the size written as a constant stays and the
    computed one shrinks. A constant group count g (a shuffle) keeps g rows: every row must lose the
    same positions, so the channels of a column live or die together. A constant C/g (heads of size
    C/g) keeps whole rows: the channels of a row live or die together. Which one is constant is read
    from the call (an int literal against a size computed from the tensor).
    """
    a = x.axis
    grid = x.ids.reshape(out[a], out[a + 1])
    dims = list(sizes) if sizes is not None else []
    fixed = [len(dims) > a + k and isinstance(dims[a + k], int) and dims[a + k] != -1 for k in (0, 1)]
    if fixed == [True, False]:
        ctx.union(np.broadcast_to(grid[:1], grid.shape), grid)  # columns
    elif fixed == [False, True]:
        ctx.union(np.broadcast_to(grid[:, :1], grid.shape), grid)  # rows
    else:
        ctx.block(x.ids, f"'{name}' splits the channel axis into {out[a]} x {out[a + 1]} with "
                         "both sizes fixed (or both computed): hwprune cannot tell which one pruning may change")
    return SplitValue(tuple(out), None, None, axes=(a, a + 1), grid=grid)


def split_value_ops() -> tuple:
    """The handlers that understand a :class:`SplitValue` (everything else blocks its channels)."""
    return (_reshape_op, _reshape_fn, _transpose, _permute, _unary)


# ---------------------------------------------------------------------------------------------------
# Modules.


@for_modules(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(ctx, name, m, args, kwargs, out_shape):
    x = args[0]
    if x.tracked and x.axis != 1:
        raise Unsupported("expected input channels on axis 1")
    ctx.layer_kind[name] = "conv"
    out = ctx.new(m.out_channels)
    if m.groups == 1:
        if x.tracked:
            ctx.member(name, "weight", 1, x.ids, CONSUMER)
    elif not x.tracked:
        ctx.block(out, f"grouped conv '{name}' reads an untracked input")
    else:
        # A unit is a whole conv group: its input channels, with each other and with its outputs.
        ki, ko = m.in_channels // m.groups, m.out_channels // m.groups
        c, o = np.arange(m.in_channels), np.arange(m.out_channels)
        ctx.union(x.ids, out[(c // ki) * ko])
        ctx.union(out, out[(o // ko) * ko])
    ctx.member(name, "weight", 0, out, PRODUCER)
    if m.bias is not None:
        ctx.member(name, "bias", 0, out, PRODUCER)
    return Value(tuple(out_shape), 1, out, producer=name)


@for_modules(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_transpose(ctx, name, m, args, kwargs, out_shape):
    x = args[0]
    if m.groups != 1:
        raise Unsupported("grouped transposed convolutions are not supported")
    if x.tracked and x.axis != 1:
        raise Unsupported("expected input channels on axis 1")
    ctx.layer_kind[name] = "conv"
    out = ctx.new(m.out_channels)
    if x.tracked:
        ctx.member(name, "weight", 0, x.ids, CONSUMER)
    ctx.member(name, "weight", 1, out, PRODUCER)
    if m.bias is not None:
        ctx.member(name, "bias", 0, out, PRODUCER)
    return Value(tuple(out_shape), 1, out, producer=name)


@for_modules(nn.Linear)
def _linear(ctx, name, m, args, kwargs, out_shape):
    x = args[0]
    if x.tracked and x.axis != len(x.shape) - 1:
        raise Unsupported("expected features on the last axis")
    ctx.layer_kind[name] = "linear"
    out = ctx.new(m.out_features)
    if x.tracked:
        ctx.member(name, "weight", 1, x.ids, CONSUMER)
    ctx.member(name, "weight", 0, out, PRODUCER)
    if m.bias is not None:
        ctx.member(name, "bias", 0, out, PRODUCER)
    return Value(tuple(out_shape), len(out_shape) - 1, out, producer=name)


@for_modules(nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
def _batchnorm(ctx, name, m, args, kwargs, out_shape):
    x = args[0]
    if not x.tracked:
        return passthrough(x, out_shape)
    if x.axis != 1:
        raise Unsupported("expected channels on axis 1")
    if m.affine:
        ctx.member(name, "weight", 0, x.ids, PRODUCER)
        ctx.member(name, "bias", 0, x.ids, PRODUCER)
        if x.producer and isinstance(m, nn.modules.batchnorm._BatchNorm):
            ctx.normalized.add(x.producer)
    if getattr(m, "running_mean", None) is not None:
        ctx.member(name, "running_mean", 0, x.ids, BUFFER)
        ctx.member(name, "running_var", 0, x.ids, BUFFER)
    return passthrough(x, out_shape)


@for_modules(nn.GroupNorm)
def _groupnorm(ctx, name, m, args, kwargs, out_shape):
    x = args[0]
    if m.num_groups == m.num_channels and x.tracked:  # one channel per group: per-channel, like BN
        if m.affine:
            ctx.member(name, "weight", 0, x.ids, PRODUCER)
            ctx.member(name, "bias", 0, x.ids, PRODUCER)
    else:
        ctx.block(x.ids, f"GroupNorm '{name}' normalizes over several channels together")
    return passthrough(x, out_shape)


@for_modules(nn.LayerNorm)
def _layernorm(ctx, name, m, args, kwargs, out_shape):
    x = args[0]
    if x.tracked and x.axis >= len(x.shape) - len(m.normalized_shape):
        ctx.block(x.ids, f"LayerNorm '{name}' normalizes over the channels")
    return passthrough(x, out_shape)


@for_modules(nn.PReLU)
def _prelu(ctx, name, m, args, kwargs, out_shape):
    x = args[0]
    if m.num_parameters > 1 and x.tracked:
        ctx.member(name, "weight", 0, x.ids, PRODUCER)
    return passthrough(x, out_shape)


@for_modules(nn.Embedding)
def _embedding(ctx, name, m, args, kwargs, out_shape):
    out = ctx.new(m.embedding_dim)
    ctx.member(name, "weight", 1, out, PRODUCER)
    return Value(tuple(out_shape), len(out_shape) - 1, out)


@for_modules(
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Tanhshrink,
    nn.LogSigmoid, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)
def _module_unary(ctx, name, m, args, kwargs, out_shape):
    return passthrough(args[0], out_shape)


@for_modules(nn.Softmax, nn.LogSoftmax)
def _softmax_module(ctx, name, m, args, kwargs, out_shape):
    x = args[0]
    if x.tracked and m.dim is not None and _norm_dim(m.dim, len(x.shape)) == x.axis:
        ctx.block(x.ids, f"softmax '{name}' normalizes over the channels")
    return passthrough(x, out_shape)


@for_modules(nn.Flatten)
def _flatten_module(ctx, name, m, args, kwargs, out_shape):
    return _reshape(args[0], out_shape)


# ---------------------------------------------------------------------------------------------------
# Functions and methods.

_UNARY_FUNCS = [
    F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.sigmoid, torch.sigmoid, F.tanh, torch.tanh, F.softplus, F.hardtanh, torch.clamp,
    torch.clip, torch.abs, torch.neg, operator.neg, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.interpolate, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch.square, torch.exp, F.relu_,
]
for_functions(*_UNARY_FUNCS)(_unary)
for_methods(
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "abs", "neg",
    "contiguous", "clone", "detach", "float", "half", "double", "to", "type_as", "square", "exp",
)(_unary)

for_functions(
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.maximum,
    torch.minimum,
)(_binary)
for_methods("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_")(_binary)


@for_functions(torch.cat, torch.concat, torch.concatenate)
def _cat(ctx, name, m, args, kwargs, out_shape):
    tensors = call_arg(args, kwargs, 0, "tensors")
    dim = call_arg(args, kwargs, 1, "dim", 0)
    vals = [t for t in tensors if isinstance(t, Value)]
    if not vals or not all(v.tracked for v in vals):
        for v in vals:
            ctx.block(v.ids, f"'{name}' concatenates tracked and untracked tensors")
        return Value(tuple(out_shape), None, None)
    dim = _norm_dim(dim, len(vals[0].shape))
    axes = {v.axis for v in vals}
    if len(axes) != 1:
        raise Unsupported("inputs have their channels on different axes")
    axis = axes.pop()
    if dim == axis:
        return Value(tuple(out_shape), axis, np.concatenate([v.ids for v in vals]))
    for v in vals[1:]:  # concatenating along another axis: the channels are shared
        ctx.union(vals[0].ids, v.ids)
    return Value(tuple(out_shape), axis, vals[0].ids)


@for_functions(torch.flatten)
@for_methods("flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as")
def _reshape_op(ctx, name, m, args, kwargs, out_shape):
    sizes = None
    if name.endswith(("view", "reshape")):  # x.view(b, g, -1) or x.view((b, g, -1)): what the code wrote
        rest = args[1:]
        sizes = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
    return _reshape(args[0], out_shape, ctx, sizes, name)


@for_functions(torch.reshape, torch.squeeze, torch.unsqueeze)
def _reshape_fn(ctx, name, m, args, kwargs, out_shape):
    sizes = call_arg(args, kwargs, 1, "shape") if name.endswith("reshape") else None
    return _reshape(args[0], out_shape, ctx, list(sizes) if isinstance(sizes, (list, tuple)) else None, name)


@for_functions(torch.mean, torch.sum, torch.amax, torch.amin)
@for_methods("mean", "sum", "amax", "amin")
def _reduce_op(ctx, name, m, args, kwargs, out_shape):
    dims = call_arg(args, kwargs, 1, "dim", None)
    keepdim = bool(call_arg(args, kwargs, 2, "keepdim", False))
    return _reduce(args[0], dims, keepdim, out_shape, ctx, name)


@for_functions(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax)
@for_methods("softmax", "log_softmax")
def _softmax(ctx, name, m, args, kwargs, out_shape):
    x = args[0]
    dim = call_arg(args, kwargs, 1, "dim", None)
    if x.tracked and dim is not None and _norm_dim(dim, len(x.shape)) == x.axis:
        ctx.block(x.ids, f"'{name}' normalizes over the channels")
    return passthrough(x, out_shape)


@for_functions(torch.transpose)
@for_methods("transpose")
def _transpose(ctx, name, m, args, kwargs, out_shape):
    x = args[0]
    nd = len(x.shape)
    d0, d1 = _norm_dim(call_arg(args, kwargs, 1, "dim0"), nd), _norm_dim(call_arg(args, kwargs, 2, "dim1"), nd)
    if isinstance(x, SplitValue):
        swap = {d0: d1, d1: d0}
        return SplitValue(tuple(out_shape), None, None, axes=tuple(swap.get(p, p) for p in x.axes), grid=x.grid)
    if not x.tracked:
        return Value(tuple(out_shape), None, None)
    axis = d1 if x.axis == d0 else d0 if x.axis == d1 else x.axis
    return Value(tuple(out_shape), axis, x.ids)


@for_functions(torch.permute)
@for_methods("permute")
def _permute(ctx, name, m, args, kwargs, out_shape):
    x = args[0]
    dims = list(args[1:]) if len(args) > 2 or isinstance(args[1], int) else list(args[1])
    dims = [_norm_dim(d, len(x.shape)) for d in dims]
    if isinstance(x, SplitValue):
        return SplitValue(tuple(out_shape), None, None, axes=tuple(dims.index(p) for p in x.axes), grid=x.grid)
    if not x.tracked:
        return Value(tuple(out_shape), None, None)
    return Value(tuple(out_shape), dims.index(x.axis), x.ids)


@for_functions(torch.split, torch.chunk)
@for_methods("split", "chunk")
def _split(ctx, name, m, args, kwargs, out_shape):
    x = args[0]
    is_chunk = name.endswith("chunk")
    dim = _norm_dim(call_arg(args, kwargs, 2, "dim", 0), len(x.shape))
    shapes = out_shape  # a tuple of shapes
    if not x.tracked or dim != x.axis:
        return tuple(Value(tuple(s), x.axis if x.tracked else None, x.ids) for s in shapes)
    pieces, start = [], 0
    for s in shapes:
        size = s[dim]
        pieces.append(Value(tuple(s), x.axis, x.ids[start : start + size]))
        start += size
    sizes = {len(p.ids) for p in pieces}
    if is_chunk and len(sizes) == 1:
        # chunk(n) cuts at C/n: prune the pieces identically so that every cut stays in place
        for p in pieces[1:]:
            ctx.union(pieces[0].ids, p.ids)
        return tuple(pieces)
    sections = call_arg(args, kwargs, 1, "split_size_or_sections", call_arg(args, kwargs, 1, "split_size"))
    attr = _sizes_attribute(ctx.owner, [len(p.ids) for p in pieces]) if isinstance(sections, (list, tuple)) else None
    if attr is None:
        ctx.block(x.ids, f"'{name}' cuts the channels at fixed sizes that are not an attribute of layer "
                         f"'{ctx.where}' (hwprune updates a list attribute such as MixNet's `splits`)")
        return tuple(pieces)
    # Split sizes read from a list attribute (geffnet's MixedConv2d: torch.split(x, self.splits, 1)):
    # each piece is pruned on its own and slicing rewrites the attribute with the kept counts.
    for i, p in enumerate(pieces):
        ctx.member(ctx.where, attr, i, p.ids, SIZES)
    return tuple(pieces)


def _sizes_attribute(owner: nn.Module | None, sizes: list[int]) -> str | None:
    """The one list/tuple attribute of ``owner`` equal to ``sizes`` (None if none or several)."""
    if owner is None:
        return None
    hits = [k for k, v in vars(owner).items()
            if not k.startswith("_") and isinstance(v, (list, tuple)) and list(v) == sizes]
    return hits[0] if len(hits) == 1 else None


# ---------------------------------------------------------------------------------------------------
# Functional layers on a module's own parameters: ``F.conv2d(x, self.weight, self.bias, ...)``.


def _param(v, what: str) -> tuple[str, str] | None:
    """The (module, param) a functional op's weight comes from; None if absent. A weight computed in
    the forward (standardised, reparametrised) cannot be sliced through its parameter: refuse it."""
    if v is None:
        return None
    if isinstance(v, Param):
        return v.owner_and_param
    raise Unsupported(f"its {what} is computed in the forward, not read from a parameter")


@for_functions(F.conv1d, F.conv2d, F.conv3d)
def _f_conv(ctx, name, m, args, kwargs, out_shape):
    x, w = args[0], call_arg(args, kwargs, 1, "weight")
    weight, bias = _param(w, "weight"), _param(call_arg(args, kwargs, 2, "bias"), "bias")
    groups = call_arg(args, kwargs, 6, "groups", 1)
    if not isinstance(groups, int):
        raise Unsupported("its group count is computed in the forward")
    if x.tracked and x.axis != 1:
        raise Unsupported("expected input channels on axis 1")
    layer = weight[0]
    ctx.layer_kind[layer] = "conv"
    out = ctx.new(w.shape[0])
    if groups == 1:
        if x.tracked:
            ctx.member(layer, weight[1], 1, x.ids, CONSUMER)
    else:  # the group count is a constant in the forward: keep the grouped conv whole
        ctx.block(out, f"grouped '{name}' in layer '{layer}': its group count is written in the forward")
        ctx.block(x.ids, f"grouped '{name}' in layer '{layer}': its group count is written in the forward")
    ctx.member(layer, weight[1], 0, out, PRODUCER)
    if bias is not None:
        ctx.member(bias[0], bias[1], 0, out, PRODUCER)
    ctx.functional_layer(layer, name)
    return Value(tuple(out_shape), 1, out, producer=layer)


@for_functions(F.linear)
def _f_linear(ctx, name, m, args, kwargs, out_shape):
    x, w = args[0], call_arg(args, kwargs, 1, "weight")
    weight, bias = _param(w, "weight"), _param(call_arg(args, kwargs, 2, "bias"), "bias")
    if x.tracked and x.axis != len(x.shape) - 1:
        raise Unsupported("expected features on the last axis")
    layer = weight[0]
    ctx.layer_kind[layer] = "linear"
    out = ctx.new(w.shape[0])
    if x.tracked:
        ctx.member(layer, weight[1], 1, x.ids, CONSUMER)
    ctx.member(layer, weight[1], 0, out, PRODUCER)
    if bias is not None:
        ctx.member(bias[0], bias[1], 0, out, PRODUCER)
    ctx.functional_layer(layer, name)
    return Value(tuple(out_shape), len(out_shape) - 1, out, producer=layer)


@for_functions(F.batch_norm, F.instance_norm)
def _f_batch_norm(ctx, name, m, args, kwargs, out_shape):
    x = args[0]
    if not x.tracked:
        return passthrough(x, out_shape)
    if x.axis != 1:
        raise Unsupported("expected channels on axis 1")
    # F.batch_norm and F.instance_norm: (input, running_mean, running_var, weight, bias, ...)
    for what, i, role in (("running_mean", 1, BUFFER), ("running_var", 2, BUFFER), ("weight", 3, PRODUCER),
                          ("bias", 4, PRODUCER)):
        p = _param(call_arg(args, kwargs, i, what), what)
        if p is not None:
            ctx.member(p[0], p[1], 0, x.ids, role)
            ctx.functional_layer(p[0], name)
            if role == PRODUCER and x.producer and name.endswith("batch_norm"):
                ctx.normalized.add(x.producer)
    return passthrough(x, out_shape)


@for_functions(F.layer_norm, F.group_norm)
def _f_norm_over_channels(ctx, name, m, args, kwargs, out_shape):
    x = args[0]
    shape = call_arg(args, kwargs, 1, "normalized_shape" if name.endswith("layer_norm") else "num_groups")
    over_channels = (x.tracked and x.axis >= len(x.shape) - len(shape)) if name.endswith("layer_norm") else x.tracked
    if over_channels:
        ctx.block(x.ids, f"'{name}' normalizes over the channels")
    return passthrough(x, out_shape)


# ---------------------------------------------------------------------------------------------------
# Channels to space and back.


def _pixel_shuffle_ids(ctx, x: Value, r: int, out_shape, inverse: bool) -> Value:
    if not x.tracked:
        return Value(tuple(out_shape), None, None)
    if x.axis != len(x.shape) - 3:
        raise Unsupported("expected channels before the two spatial axes")
    if inverse:  # pixel_unshuffle: output channel c*r*r + k comes from input channel c
        return Value(tuple(out_shape), x.axis, np.repeat(x.ids, r * r))
    # pixel_shuffle: input channels c*r*r .. c*r*r + r*r - 1 become output channel c; they go together
    grid = x.ids.reshape(-1, r * r)
    ctx.union(np.broadcast_to(grid[:, :1], grid.shape), grid)
    return Value(tuple(out_shape), x.axis, grid[:, 0].copy())


@for_functions(F.pixel_shuffle, F.pixel_unshuffle)
def _f_pixel_shuffle(ctx, name, m, args, kwargs, out_shape):
    r = call_arg(args, kwargs, 1, "upscale_factor", call_arg(args, kwargs, 1, "downscale_factor"))
    return _pixel_shuffle_ids(ctx, args[0], int(r), out_shape, inverse=name.endswith("unshuffle"))


@for_modules(nn.PixelShuffle, nn.PixelUnshuffle)
def _pixel_shuffle_module(ctx, name, m, args, kwargs, out_shape):
    inverse = isinstance(m, nn.PixelUnshuffle)
    return _pixel_shuffle_ids(ctx, args[0], m.downscale_factor if inverse else m.upscale_factor, out_shape, inverse)
