"""Discover coupled groups: trace, follow channel ids through every op, take connected components.

Example:
    >>> from hwprune.graph import discover_groups
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1))
    >>> groups = discover_groups(net, torch.zeros(1, 3, 8, 8))
    >>> print(groups[0].describe())      # a conv channel lives or dies with its BN channel and the next conv's input
    0: 16 channels (multiple 1); members: 0.weight:0, 0.bias:0, 1.weight:0, ..., 3.weight:1
    >>> print(groups[1].describe())
    3: 8 channels (blocked: model output); members: 3.weight:0, 3.bias:0
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict

import numpy as np
import torch
import torch.fx as fx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import nn

from ..errors import ModelError
from .groups import NORMALIZED, PRODUCER, SIZES, Group, Member
from . import hf, leaves, ops
from .diagnose import GroupList, unpruned_layers
from .ops import Ctx, Unsupported, Value
from .trace import module_of, resolve_excludes, trace


def _out_shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return None
    if hasattr(meta, "shape"):
        return tuple(int(s) for s in meta.shape)
    if isinstance(meta, (tuple, list)) and all(hasattr(m, "shape") for m in meta):
        return tuple(tuple(int(s) for s in m.shape) for m in meta)
    return None


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return str(node.target)
    t = node.target
    mod = getattr(t, "__module__", None) or ""
    return f"{mod}.{getattr(t, '__name__', str(t))}".lstrip(".")


def _getitem(ctx: Ctx, x, index, out_shape):
    if isinstance(x, (tuple, list)):
        return x[index]
    if not isinstance(x, Value):
        return None
    if not x.tracked:
        return Value(tuple(out_shape or ()), None, None)
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        k = index.index(Ellipsis)
        fill = len(x.shape) - (len(index) - 1 - sum(i is None for i in index))
        index = index[:k] + (slice(None),) * fill + index[k + 1 :]
    dim, axis = 0, None
    out_pos = 0
    for i in index:
        if i is None:
            out_pos += 1
            continue
        if dim == x.axis:
            if not (isinstance(i, slice) and i == slice(None)):
                raise Unsupported("indexing selects a part of the channel axis")
            axis = out_pos
        if isinstance(i, slice):
            out_pos += 1
        elif not isinstance(i, int):
            raise Unsupported("advanced indexing")
        dim += 1
    if axis is None:
        axis = out_pos + (x.axis - dim)
    return Value(tuple(out_shape), axis, x.ids)


def _walk(gm: fx.GraphModule, excluded: set[str], model: nn.Module) -> Ctx:
    ctx = Ctx()
    values: dict[fx.Node, object] = {}
    modules = dict(gm.named_modules())
    # The GraphModule holds only the leaves; ops inside a traced-through module need the original.
    ctx.modules = dict(model.named_modules())
    untraced = gm.meta.get("untraced", {})
    live = _live_nodes(gm)
    for node in gm.graph.nodes:
        out_shape = _out_shape(node)
        if node.op == "placeholder":
            # Model inputs: their channels are not ours to prune.
            values[node] = Value(out_shape, None, None) if isinstance(out_shape, tuple) else None
            continue
        if node.op == "get_attr":  # a parameter read in a forward: functional layers declare it
            values[node] = ops.Param(out_shape, None, None, name=str(node.target)) if isinstance(out_shape, tuple) else None
            continue
        if node.op == "output":
            for v in _flatten(fx.node.map_arg(node.args, lambda n: values.get(n))):
                if isinstance(v, ops.SplitValue):
                    ctx.block(v.grid.ravel(), "model output")
                elif isinstance(v, Value):
                    ctx.block(v.ids, "model output")
            continue
        args = fx.node.map_arg(node.args, lambda n: values.get(n))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: values.get(n))
        where = module_of(node)
        ctx.where = where
        ctx.live = node in live
        try:
            values[node] = _apply(ctx, node, modules, excluded, args, kwargs, out_shape, untraced)
        except Unsupported as e:
            layer = where or "(top level)"
            fix = f"exclude the layer to keep its channels (--exclude {where})" if where else \
                "move it into a submodule and exclude that submodule"
            what = (f"layer '{node.target}' ({type(modules[str(node.target)]).__name__}) is not supported"
                    if node.op == "call_module" else f"layer '{layer}': op '{_op_name(node)}' is not supported")
            raise ModelError(f"{what}: {e}; {fix}") from None
    return ctx


def _live_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes the model's output depends on. The others still run (a layer called for a value that is
    then dropped must still be sliced consistently), but what they compute cannot block a channel."""
    live: set[fx.Node] = set()
    modules = dict(gm.named_modules())
    # the output, and every in-place op: it may change a tensor the output depends on
    stack = [n for n in gm.graph.nodes if n.op == "output" or _in_place(n, modules)]
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(n.all_input_nodes)
    return live


_IN_PLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem}


def _in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).startswith("_")
    if node.op == "call_function":
        return node.target in _IN_PLACE_FUNCTIONS or getattr(node.target, "__name__", "").endswith("_") \
            or node.kwargs.get("inplace") is True
    return node.op == "call_module" and getattr(modules.get(str(node.target)), "inplace", False) is True


def _unsplit(ctx, node, args, kwargs):
    """A channel axis split in two meets an op that does not merge it back: keep those channels."""
    def strip(v):
        if isinstance(v, ops.SplitValue):
            ctx.block(v.grid.ravel(), f"'{_op_name(node)}' uses a channel axis split in two without merging it back")
            return Value(v.shape, None, None)
        return v

    return [strip(a) for a in args], {k: strip(v) for k, v in kwargs.items()}


def _flatten(x):
    if isinstance(x, (tuple, list)):
        for y in x:
            yield from _flatten(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _flatten(y)
    else:
        yield x


def _check_library_layer(ctx, name, module, x, out) -> None:
    """A subclass of a known layer with its own ``forward``: block the side whose slicing it breaks."""
    if not isinstance(x, Value):
        return
    outputs_ok, inputs_ok = leaves.check_subclass(module, x.shape)
    what = f"layer '{name}' ({type(module).__name__}) has its own forward, and"
    if not inputs_ok and x.tracked:
        ctx.block(x.ids, f"{what} removing its input channels changes what it computes")
    if not outputs_ok and isinstance(out, Value) and out.tracked:
        ctx.block(out.ids, f"{what} removing its output channels changes the others")


def _unknown_leaf(ctx, name, module, args, out_shape, untraced):
    """A module hwprune has no handler for (usually one fx could not trace): probe it, or refuse it."""
    cls = type(module).__name__
    why = untraced.get(cls)
    traced = f"fx cannot trace its forward ({why}), so it is a black box" if why else "it is not a known layer"
    x = args[0] if args else None
    if not any(True for _ in module.parameters()) and isinstance(x, Value) and len(args) == 1:
        if not x.tracked:
            return Value(tuple(out_shape), None, None) if isinstance(out_shape, tuple) and out_shape \
                and isinstance(out_shape[0], int) else None
        if leaves.probe_channelwise(module, x.shape, axis=x.axis):
            ctx.note(name, f"{cls}: {traced}; probed on random inputs, it treats channels one by one")
            return ops.passthrough(x, out_shape)
        raise Unsupported(f"{traced}, and probing it on random inputs shows it mixes or reorders channels")
    raise Unsupported(f"hwprune does not know how channels flow through {cls}: {traced}")


def _apply(ctx, node, modules, excluded, args, kwargs, out_shape, untraced):
    is_getitem = node.op == "call_function" and node.target is operator.getitem
    if (node.op == "call_module" or is_getitem) and any(isinstance(v, ops.SplitValue) for v in _flatten((args, kwargs))):
        args, kwargs = _unsplit(ctx, node, args, kwargs)  # indexing a split axis: not followed, kept
    if is_getitem:
        return _getitem(ctx, args[0], args[1], out_shape)
    if node.op == "call_module":
        name = str(node.target)
        module = modules[name]
        if name in excluded:
            reason = f"excluded layer '{name}'"
            for v in _flatten((args, kwargs)):
                if isinstance(v, Value):
                    ctx.block(v.ids, reason)
            if isinstance(out_shape, tuple) and out_shape and isinstance(out_shape[0], int):
                return ctx.fresh(out_shape, 1 if len(out_shape) > 1 else 0, reason)
            return None
        handler = ops.module_handler(module)
        if handler is None:
            return _unknown_leaf(ctx, name, module, args, out_shape, untraced)
        out = handler(ctx, name, module, list(args), dict(kwargs), out_shape)
        if leaves.overrides_forward(module):
            _check_library_layer(ctx, name, module, args[0] if args else None, out)
        return out
    if node.op == "call_function":
        handler = ops.FUNCTION_HANDLERS.get(node.target)
    else:
        handler = ops.METHOD_HANDLERS.get(node.target)
    if handler not in ops.split_value_ops() and any(isinstance(v, ops.SplitValue) for v in _flatten((args, kwargs))):
        args, kwargs = _unsplit(ctx, node, args, kwargs)
    if handler is None:
        for v in _flatten((args, kwargs)):
            if isinstance(v, ops.Param):  # a layer's weight read by an op we do not follow
                ctx.note(v.owner_and_param[0], f"its parameter '{v.name}' is used by '{_op_name(node)}', "
                         "which hwprune does not follow; write the layer with standard torch.nn layers")
        if out_shape is None:  # shape queries and other non-tensor results carry no channels
            return None
        if any(isinstance(v, Value) and v.tracked for v in _flatten((args, kwargs))):
            raise Unsupported("hwprune does not know how channels flow through it")
        return Value(out_shape, None, None) if isinstance(out_shape[0], int) else None
    return handler(ctx, _op_name(node), None, list(args), dict(kwargs), out_shape)


def discover_groups(model: nn.Module, example_inputs, *, exclude=(), target=None) -> GroupList:
    """Find the coupled groups of ``model``: the units that must be pruned together.

    ``example_inputs``: a tensor or a tuple of tensors of the model's input shape. ``exclude``: layer
    names or globs whose input and output channels stay; a name that matches nothing is an error.
    ``target``: a :class:`~hwprune.target.Target`, which sets each group's channel multiple.
    The result is a list with one more attribute, ``unpruned``: every conv/linear layer that keeps its
    output width, mapped to why (:mod:`hwprune.graph.diagnose`).
    Hugging Face ``PreTrainedModel``s are not traced: their blocks are matched by pattern
    (:mod:`hwprune.graph.hf`) and ``example_inputs`` is not used (it may be None).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
        >>> [g.name for g in discover_groups(net, torch.zeros(1, 1, 8, 8)) if g.prunable]
        ['0']
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    excluded = resolve_excludes(model, exclude)
    if hf.is_hf_model(model):  # not traceable: blocks are recognised by pattern (see graph/hf.py)
        ctx = hf.discover_by_pattern(model, excluded)
    else:
        gm = trace(model, tuple(example_inputs), excluded)
        ctx = _walk(gm, excluded, model)
    groups = GroupList(_build_groups(ctx))
    if target is not None:
        for g in groups:
            g.multiple = _units_multiple(g, target.group_multiple(g.layer_kinds))
    groups.unpruned = unpruned_layers(model, groups, ctx.notes, excluded)
    return groups


def _units_multiple(g: Group, channels: int) -> int:
    """The target's channel multiple in units of ``g``. A unit of a grouped conv is a whole conv group (12
    channels with 4 groups of 48): keeping k units keeps 12k channels, a multiple of 8 when k is even, so the
    multiple is 2 units, not 8. Heads and units of unequal widths keep the multiple as it is."""
    if channels <= 1 or g.kind == "heads":
        return channels
    units = 1
    for m in g.members:
        if m.role == SIZES:
            continue
        widths = np.bincount(m.unit_of[m.unit_of >= 0], minlength=g.size)
        widths = widths[widths > 0]
        if len(widths) == 0:
            continue
        if widths.min() != widths.max():
            return channels
        units = math.lcm(units, channels // math.gcd(channels, int(widths[0])))
    return units


def _build_groups(ctx: Ctx) -> list[Group]:
    n = ctx.n
    if n == 0:
        return []
    if ctx.edges:
        a = np.concatenate([e[0] for e in ctx.edges])
        b = np.concatenate([e[1] for e in ctx.edges])
    else:
        a = b = np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    _, label = connected_components(graph, directed=False)

    tagged: dict[int, object] = {}
    for ids, tag in ctx.tags:
        for lab in np.unique(label[ids]):
            tagged.setdefault(int(lab), tag)

    blocked: dict[int, str] = {}
    for ids, reason in ctx.blocked:
        for lab in np.unique(label[ids]):
            blocked.setdefault(int(lab), reason)

    def role_of(module, param, role):
        # A layer that feeds a BatchNorm directly is scale-invariant: its weights and bias are
        # sliced and masked with the unit but not regularized (the BN's gamma/beta are).
        return NORMALIZED if role == PRODUCER and module in ctx.normalized else role

    members = [((module, param, dim, role_of(module, param, role)), label[ids]) for module, param, dim, role, ids in ctx.members]

    sig: dict[int, list[int]] = defaultdict(list)
    for j, (_, labs) in enumerate(members):
        for lab in np.unique(labs):
            sig[int(lab)].append(j)
    by_signature: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for lab, js in sig.items():
        by_signature[tuple(js)].append(lab)

    groups: list[tuple[int, Group]] = []
    names: dict[str, int] = defaultdict(int)
    for js, labs in by_signature.items():
        producers = [j for j in js if members[j][0][3] in (PRODUCER, NORMALIZED)]
        if not producers:
            continue
        first = members[producers[0]][1]
        lab_set = np.asarray(labs)
        # Order units by where they first appear in the first producer (channel 0 is unit 0).
        in_group = np.isin(first, lab_set)
        order = list(dict.fromkeys(first[in_group].tolist()))
        local = {lab: i for i, lab in enumerate(order)}
        group_members = []
        for j in js:
            (module, param, dim, role), labs_j = members[j]
            unit_of = np.array([local.get(int(l), -1) for l in labs_j], dtype=np.int64)
            group_members.append(Member(module, param, dim, role, unit_of))
        layers = tuple(dict.fromkeys(m.module for m in group_members))
        kinds = frozenset(ctx.layer_kind[m] for m in layers if m in ctx.layer_kind)
        reasons = [blocked[l] for l in order if l in blocked]
        name = members[producers[0]][0][0] or "(model)"
        kind = "channels" if "conv" in kinds else "neurons"
        tag = tagged.get(order[0])
        if tag is not None:  # attention heads: the target's head multiple applies, not the linear one
            name, kind, kinds = tag.name, tag.kind, frozenset({tag.layer_kind})
        names[name] += 1
        if names[name] > 1:
            name = f"{name}#{names[name]}"
        g = Group(name, len(order), group_members, kinds, 1, reasons[0] if reasons else None, kind, layers)
        groups.append((producers[0], g))
    groups.sort(key=lambda t: t[0])
    return [g for _, g in groups]
