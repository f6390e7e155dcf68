"""Lower a traced CNN to a Relax module made of the hand-scheduled kernels of :mod:`.kernels`.

The model is traced with torch.fx (built-in layers are leaves) and walked in graph order. Each
convolution absorbs what follows it when it is its only consumer: a BatchNorm (folded into the weights
and bias), a residual ``+`` and a ReLU / ReLU6, so a ResNet basic block is two kernel calls. Feature
maps stay in the blocked NCHW[L]c layout from the first layer to the global pool, so no layout
transform runs between layers.

Supported: Conv2d (groups 1 or depthwise, zero padding), BatchNorm2d, ReLU, ReLU6, ``+``, ``torch.cat``
along channels, MaxPool2d,
AvgPool2d, AdaptiveAvgPool2d to 1x1 (and ``x.mean((2, 3))``), flatten, Linear, Dropout, Identity.
Anything else is a :class:`~hwprune.errors.ModelError` naming the layer; the generic (untuned) TVM
path in :mod:`hwprune.runtimes.tvm.build` takes any model that torch.export can capture.

Example:
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
    ...                     nn.Flatten(), nn.Linear(8, 10))
    >>> mod, calls = lower(net.eval(), torch.zeros(1, 1, 8, 8), lanes=8)
    >>> calls, sorted(gv.name_hint for gv in mod.get_global_vars())     # BN and ReLU are inside 'conv'
    (5, ['avgpool', 'conv', 'dense', 'main', 'take_columns', 'to_blocked'])
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ....errors import ModelError
from . import kernels as K

_RELU = {F.relu, torch.relu, torch.relu_}
_RELU6 = {F.relu6}
_ADD = {operator.add, operator.iadd, torch.add}
_FLATTEN = {torch.flatten}
_IDENTITY_MODULES = (nn.Dropout, nn.Identity)
SUPPORTED = ("Conv2d (groups 1 or depthwise), BatchNorm2d, ReLU, ReLU6, add, cat along channels, MaxPool2d, AvgPool2d, "
             "AdaptiveAvgPool2d(1), mean over H and W, flatten, Linear, Dropout, Identity")


@dataclass
class _Val:
    """A tensor of the lowered graph: a blocked feature map or a (padded) vector."""

    expr: Any
    kind: str  # "map" (N, C/L, H, W, L) or "vec" (N, width)
    c: int  # true channels (map) or features (vec); padding follows them
    h: int = 1
    w: int = 1
    lanes: int = 1
    width: int = 0  # vec: padded width


def _act_of(node: fx.Node, modules: dict) -> str | None:
    """'relu' / 'relu6' if the node is a plain activation, else None."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.ReLU):
            return "relu"
        if isinstance(m, nn.ReLU6) or (isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0.0, 6.0)):
            return "relu6"
    if node.op == "call_function":
        if node.target in _RELU:
            return "relu"
        if node.target in _RELU6:
            return "relu6"
        if node.target is F.hardtanh and tuple(node.args[1:3]) == (0.0, 6.0):
            return "relu6"
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return None


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD:
        return len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args) and "alpha" not in node.kwargs
    return node.op == "call_method" and node.target in ("add", "add_", "__add__") and len(node.args) == 2 \
        and isinstance(node.args[1], fx.Node)


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise ModelError(f"TVM lowering: node '{node.name}' has no single tensor shape (tuple outputs are not supported)")
    return tuple(int(s) for s in meta.shape)


@dataclass
class _Chain:
    """A convolution and what it absorbs: BN, residual add, activation. Emitted at ``anchor``."""

    conv: fx.Node
    bn: fx.Node | None = None
    add: fx.Node | None = None
    residual: fx.Node | None = None
    act: str = "none"
    anchor: fx.Node | None = None


def _chains(gm: fx.GraphModule, modules: dict) -> dict[fx.Node, _Chain]:
    """Fusion chains keyed by every node they cover."""
    covered: dict[fx.Node, _Chain] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.Conv2d) or node in covered:
            continue
        ch = _Chain(conv=node)
        cur = node
        nxt = _only_user(cur)
        if nxt is not None and nxt.op == "call_module" and isinstance(modules[nxt.target], nn.BatchNorm2d) \
                and nxt.args[0] is cur:
            ch.bn, cur = nxt, nxt
            nxt = _only_user(cur)
        if nxt is not None and _is_add(nxt) and nxt not in covered:
            other = nxt.args[1] if nxt.args[0] is cur else nxt.args[0]
            if other is not cur and _shape(other) == _shape(cur):
                ch.add, ch.residual, cur = nxt, other, nxt
                nxt = _only_user(cur)
        if nxt is not None and nxt not in covered and (act := _act_of(nxt, modules)) is not None:
            ch.act, cur = act, nxt
        ch.anchor = cur
        for n in (ch.conv, ch.bn, ch.add, cur):
            if n is not None:
                covered[n] = ch
    return covered


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(scale, shift)`` of an eval-mode BatchNorm."""
    var = bn.running_var.detach().double().numpy()
    mean = bn.running_mean.detach().double().numpy()
    gamma = bn.weight.detach().double().numpy() if bn.weight is not None else np.ones_like(var)
    beta = bn.bias.detach().double().numpy() if bn.bias is not None else np.zeros_like(var)
    scale = gamma / np.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def _pad_to(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    if a.shape[axis] == size:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, size - a.shape[axis])
    return np.pad(a, pad)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _Lowering:
    def __init__(self, gm: fx.GraphModule, lanes: int, parallel: bool):
        from tvm import relax

        self.relax = relax
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.lanes = lanes
        self.parallel = parallel
        self.bb = relax.BlockBuilder()
        self.funcs: dict[Any, Any] = {}  # kernel spec -> GlobalVar (identical layers share one kernel)
        self.calls = 0

    # --- helpers -------------------------------------------------------------------------------
    def kernel(self, key, make, name: str):
        if key not in self.funcs:
            # te.create_prim_func names every kernel 'main'; the module-level name comes from add_func
            self.funcs[key] = self.bb.add_func(make().without_attr("global_symbol"), name)
        return self.funcs[key]

    def call(self, gv, args, shape):
        relax = self.relax
        self.calls += 1
        return self.bb.emit(relax.call_tir(gv, args, out_ty=relax.TensorType(shape, "float32")))

    def const(self, a: np.ndarray):
        return self.relax.const(np.ascontiguousarray(a, dtype=np.float32))

    def fail(self, node: fx.Node, what: str):
        where = node.target if node.op == "call_module" else node.name
        raise ModelError(f"TVM hand schedule: layer '{where}' ({what}) is not supported. Supported: {SUPPORTED}. "
                         "Use the generic path (schedule='default') for other models")

    def as_map(self, node: fx.Node, v: _Val) -> _Val:
        if v.kind != "map":
            self.fail(node, "expects a feature map (N, C, H, W) input")
        return v

    # --- layers --------------------------------------------------------------------------------
    def input(self, node: fx.Node, x) -> _Val:
        shape = _shape(node)
        if len(shape) != 4:
            raise ModelError(f"TVM hand schedule: the model input must be (N, C, H, W), got {shape}")
        n, c, h, w = shape
        lanes = c if c < self.lanes else self.lanes  # a 1- or 3-channel image is one block
        gv = self.kernel(("to_blocked", n, c, h, w, lanes), lambda: K.to_blocked(n, c, h, w, lanes), "to_blocked")
        return _Val(self.call(gv, [x], (n, K.blocks(c, lanes), h, w, lanes)), "map", c, h, w, lanes)

    def conv(self, ch: _Chain, vals: dict) -> _Val:
        conv: nn.Conv2d = self.modules[ch.conv.target]
        x = self.as_map(ch.conv, vals[ch.conv.args[0]])
        if conv.padding_mode != "zeros":
            self.fail(ch.conv, f"padding_mode={conv.padding_mode!r}")
        if isinstance(conv.padding, str):
            self.fail(ch.conv, f"padding={conv.padding!r}")
        depthwise = conv.groups > 1
        if depthwise and not (conv.groups == conv.in_channels == conv.out_channels):
            self.fail(ch.conv, f"grouped convolution with groups={conv.groups}")
        if depthwise and x.lanes != self.lanes:
            self.fail(ch.conv, "depthwise convolution on the model input")
        w = conv.weight.detach().double().numpy()
        b = conv.bias.detach().double().numpy() if conv.bias is not None else np.zeros(conv.out_channels)
        if ch.bn is not None:
            scale, shift = _bn_affine(self.modules[ch.bn.target])
            w = w * scale[:, None, None, None]
            b = b * scale + shift
        n = _shape(ch.conv)[0]
        spec = K.ConvSpec(
            n=n, cin=conv.in_channels, h=x.h, w=x.w, cout=conv.out_channels, kh=conv.kernel_size[0],
            kw=conv.kernel_size[1], stride=_pair(conv.stride), pad=_pair(conv.padding),
            dilation=_pair(conv.dilation), depthwise=depthwise, lanes_in=x.lanes, lanes_out=self.lanes,
            act=ch.act, residual=ch.residual is not None, parallel=self.parallel,
        )
        lo, li = spec.lanes_out, spec.lanes_in
        ob = spec.out_shape[1]
        if depthwise:
            wb = _pad_to(w[:, 0], 0, ob * lo).reshape(ob, lo, spec.kh, spec.kw).transpose(0, 2, 3, 1)
        else:
            ib = spec.in_shape[1]
            wp = _pad_to(_pad_to(w, 0, ob * lo), 1, ib * li)
            wb = wp.reshape(ob, lo, ib, li, spec.kh, spec.kw).transpose(0, 2, 4, 5, 3, 1)
        bb = _pad_to(b, 0, ob * lo).reshape(ob, lo)
        args = [x.expr, self.const(wb), self.const(bb)]
        if ch.residual is not None:
            r = self.as_map(ch.add, vals[ch.residual])
            if r.lanes != lo or (r.c, r.h, r.w) != (conv.out_channels, *spec.out_hw):
                self.fail(ch.add, "residual add of mismatched shapes")
            args.append(r.expr)
        gv = self.kernel(spec, lambda: K.conv2d(spec), "dwconv" if depthwise else "conv")
        oh, ow = spec.out_hw
        return _Val(self.call(gv, args, spec.out_shape), "map", conv.out_channels, oh, ow, lo)

    def batchnorm(self, node: fx.Node, x: _Val, act: str = "none") -> _Val:
        bn = self.modules[node.target]
        x = self.as_map(node, x)
        scale, shift = _bn_affine(bn)
        cb = K.blocks(x.c, x.lanes)
        s = _pad_to(scale, 0, cb * x.lanes).reshape(cb, x.lanes)
        t = _pad_to(shift, 0, cb * x.lanes).reshape(cb, x.lanes)
        shape = (_shape(node)[0], cb, x.h, x.w, x.lanes)
        gv = self.kernel(("affine", shape, act), lambda: K.elementwise(shape, "affine", act), "batchnorm")
        return _Val(self.call(gv, [x.expr, self.const(s), self.const(t)], shape), "map", x.c, x.h, x.w, x.lanes)

    def add(self, node: fx.Node, a: _Val, b: _Val, act: str = "none") -> _Val:
        if (a.kind, a.c, a.h, a.w, a.lanes, a.width) != (b.kind, b.c, b.h, b.w, b.lanes, b.width):
            self.fail(node, "add of tensors with different shapes (broadcasting)")
        shape = tuple(int(s) for s in a.expr.struct_info.shape)
        gv = self.kernel(("add", shape, act), lambda: K.elementwise(shape, "add", act), "add")
        return _Val(self.call(gv, [a.expr, b.expr], shape), a.kind, a.c, a.h, a.w, a.lanes, a.width)

    def activation(self, x: _Val, act: str) -> _Val:
        shape = tuple(int(s) for s in x.expr.struct_info.shape)
        gv = self.kernel(("act", shape, act), lambda: K.elementwise(shape, "act", act), act)
        return _Val(self.call(gv, [x.expr], shape), x.kind, x.c, x.h, x.w, x.lanes, x.width)

    def pool(self, node: fx.Node, x: _Val, spec: K.PoolSpec) -> _Val:
        gv = self.kernel(spec, lambda: K.pool2d(spec), f"{spec.kind}pool")
        oh, ow = spec.out_hw
        shape = (spec.n, K.blocks(x.c, x.lanes), oh, ow, x.lanes)
        return _Val(self.call(gv, [x.expr], shape), "map", x.c, oh, ow, x.lanes)

    def cat(self, node: fx.Node) -> _Val:
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        vals = [self.vals[p] for p in parts]
        if dim % 4 != 1 or any(v.kind != "map" for v in vals):
            self.fail(node, f"cat along dim {dim} (only feature maps along channels)")
        x0 = vals[0]
        if any((v.h, v.w, v.lanes) != (x0.h, x0.w, x0.lanes) for v in vals):
            self.fail(node, "cat of maps with different sizes or channel blocking")
        n = _shape(node)[0]
        chans = tuple(v.c for v in vals)
        key = ("cat", n, chans, x0.h, x0.w, x0.lanes)
        gv = self.kernel(key, lambda: K.concat_channels(n, chans, x0.h, x0.w, x0.lanes), "concat")
        c = sum(chans)
        shape = (n, K.blocks(c, x0.lanes), x0.h, x0.w, x0.lanes)
        return _Val(self.call(gv, [v.expr for v in vals], shape), "map", c, x0.h, x0.w, x0.lanes)

    def flatten(self, node: fx.Node, x: _Val) -> _Val:
        if x.kind == "vec":
            return x
        n = _shape(node)[0]
        if x.h == 1 and x.w == 1:  # (N, C/L, 1, 1, L) is already (N, C padded): a free reshape
            width = K.blocks(x.c, x.lanes) * x.lanes
            expr = self.bb.emit(self.relax.op.reshape(x.expr, (n, width)))
            return _Val(expr, "vec", x.c, width=width)
        gv = self.kernel(("from_blocked", n, x.c, x.h, x.w, x.lanes),
                         lambda: K.from_blocked(n, x.c, x.h, x.w, x.lanes), "from_blocked")
        nchw = self.call(gv, [x.expr], (n, x.c, x.h, x.w))
        width = x.c * x.h * x.w
        return _Val(self.bb.emit(self.relax.op.reshape(nchw, (n, width))), "vec", width, width=width)

    def linear(self, node: fx.Node, x: _Val, act: str) -> _Val:
        lin: nn.Linear = self.modules[node.target]
        if x.kind != "vec" or x.c != lin.in_features:
            self.fail(node, f"Linear on an input of {x.c} features in the lowered graph")
        n = _shape(node)[0]
        jp = K.blocks(lin.out_features, self.lanes) * self.lanes
        w = np.zeros((jp, x.width))
        w[: lin.out_features, : lin.in_features] = lin.weight.detach().double().numpy()
        wb = w.reshape(jp // self.lanes, self.lanes, x.width).transpose(0, 2, 1)
        b = np.zeros(jp)
        if lin.bias is not None:
            b[: lin.out_features] = lin.bias.detach().double().numpy()
        key = ("dense", n, x.width, jp, act)
        gv = self.kernel(key, lambda: K.dense(n, x.width, jp, self.lanes, act, self.parallel), "dense")
        return _Val(self.call(gv, [x.expr, self.const(wb), self.const(b)], (n, jp)), "vec", lin.out_features, width=jp)

    def output(self, node: fx.Node, v: _Val):
        n = _shape(node.args[0])[0] if isinstance(node.args[0], fx.Node) else None
        if v.kind == "map":
            gv = self.kernel(("from_blocked", n, v.c, v.h, v.w, v.lanes),
                             lambda: K.from_blocked(n, v.c, v.h, v.w, v.lanes), "from_blocked")
            return self.call(gv, [v.expr], (n, v.c, v.h, v.w))
        if v.width != v.c:
            gv = self.kernel(("take", n, v.width, v.c), lambda: K.take_columns(n, v.width, v.c), "take_columns")
            return self.call(gv, [v.expr], (n, v.c))
        return v.expr

    # --- the walk ------------------------------------------------------------------------------
    def run(self):
        relax = self.relax
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ModelError(f"TVM hand schedule: the model must take one input tensor, it takes {len(placeholders)}")
        x = relax.Var("x", relax.TensorType(_shape(placeholders[0]), "float32"))
        chains = _chains(self.gm, self.modules)
        vals: dict[fx.Node, _Val] = {}
        self.vals = vals
        fused_act: set[fx.Node] = set()
        with self.bb.function("main", [x]):
            with self.bb.dataflow():
                out = None
                for node in self.gm.graph.nodes:
                    if node in fused_act:
                        continue
                    if node in chains:
                        ch = chains[node]
                        if node is ch.anchor:
                            vals[node] = self.conv(ch, vals)
                        continue
                    out = self.visit(node, x, vals, fused_act)
                    if out is not None:
                        break
                result = self.bb.emit_output(out)
            self.bb.emit_func_output(result)
        return self.bb.get()

    def _next_act(self, node: fx.Node, fused: set) -> str:
        """Fuse a ReLU that is the node's only consumer into it."""
        nxt = _only_user(node)
        if nxt is not None and (act := _act_of(nxt, self.modules)) is not None:
            fused.add(nxt)
            self._alias = (nxt, node)
            return act
        return "none"

    def visit(self, node: fx.Node, x, vals: dict, fused: set):
        m = self.modules.get(node.target) if node.op == "call_module" else None
        self._alias = None
        if node.op == "placeholder":
            vals[node] = self.input(node, x)
        elif node.op == "get_attr":
            self.fail(node, "a tensor attribute used in forward")
        elif node.op == "output":
            arg = node.args[0]
            if not isinstance(arg, fx.Node):
                raise ModelError("TVM hand schedule: the model must return one tensor (not a tuple or dict)")
            return self.output(node, vals[arg])
        elif isinstance(m, _IDENTITY_MODULES) or (node.op == "call_function" and node.target is F.dropout):
            vals[node] = vals[node.args[0]]
        elif (act := _act_of(node, self.modules)) is not None:
            vals[node] = self.activation(vals[node.args[0]], act)
        elif isinstance(m, nn.BatchNorm2d):
            src = vals[node.args[0]]
            vals[node] = self.batchnorm(node, src, self._next_act(node, fused))
        elif _is_add(node):
            a, b = vals[node.args[0]], vals[node.args[1]]
            vals[node] = self.add(node, a, b, self._next_act(node, fused))
        elif isinstance(m, nn.Linear):
            vals[node] = self.linear(node, vals[node.args[0]], self._next_act(node, fused))
        elif isinstance(m, nn.Flatten) or (node.op == "call_function" and node.target in _FLATTEN) \
                or (node.op == "call_method" and node.target in ("flatten", "view", "reshape")):
            shape = _shape(node)
            if len(shape) != 2 or (isinstance(m, nn.Flatten) and m.start_dim != 1):
                self.fail(node, f"reshape to {shape} (only a flatten to (N, features))")
            vals[node] = self.flatten(node, vals[node.args[0]])
        elif node.op == "call_function" and node.target is torch.cat:
            vals[node] = self.cat(node)
        elif (spec := self.pool_spec(node, m, vals)) is not None:
            pooled = self.pool(node, vals[node.args[0]], spec)
            # x.mean((2, 3)) without keepdim is already (N, C): the pooled map, flattened
            vals[node] = self.flatten(node, pooled) if len(_shape(node)) == 2 else pooled
        else:
            what = type(m).__name__ if m is not None else getattr(node.target, "__name__", str(node.target))
            self.fail(node, what)
        if self._alias is not None:
            vals[self._alias[0]] = vals[self._alias[1]]
        return None

    def pool_spec(self, node: fx.Node, m, vals: dict) -> K.PoolSpec | None:
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src not in vals or vals[src].kind != "map":
            return None
        x = vals[src]
        n = _shape(node)[0]
        base = dict(n=n, c=x.c, h=x.h, w=x.w, lanes=x.lanes)
        if isinstance(m, nn.AdaptiveAvgPool2d) or (node.op == "call_function" and node.target is F.adaptive_avg_pool2d):
            size = m.output_size if m is not None else node.args[1]
            if _pair(size if size is not None else 1) != (1, 1) and (x.h, x.w) != _pair(size):
                self.fail(node, f"adaptive average pool to {size} (only to 1x1)")
            return K.PoolSpec("avg", **base, is_global=True)
        if node.op == "call_method" and node.target == "mean":
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if dims is not None and sorted(d % 4 for d in (dims if isinstance(dims, (tuple, list)) else [dims])) == [2, 3]:
                return K.PoolSpec("avg", **base, is_global=True)
            return None
        if node.op == "call_function" and node.target in (F.max_pool2d, F.avg_pool2d):
            m = _functional_pool(node)
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            kind = "max" if isinstance(m, nn.MaxPool2d) else "avg"
            if kind == "max" and _pair(m.dilation) != (1, 1):
                self.fail(node, "dilated max pooling")
            if kind == "avg" and m.divisor_override is not None:
                self.fail(node, "avg pooling with divisor_override")
            stride = m.stride if m.stride is not None else m.kernel_size
            return K.PoolSpec(kind, **base, kernel=_pair(m.kernel_size), stride=_pair(stride), pad=_pair(m.padding),
                              ceil_mode=bool(m.ceil_mode),
                              count_include_pad=bool(getattr(m, "count_include_pad", True)))
        return None


def _functional_pool(node: fx.Node) -> nn.Module:
    """The pooling module equivalent to an ``F.max_pool2d`` / ``F.avg_pool2d`` call."""
    if node.target is F.max_pool2d:
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        cls = nn.MaxPool2d
    else:
        names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
        cls = nn.AvgPool2d
    kwargs = dict(zip(names, node.args[1:]))
    kwargs.update({k: v for k, v in node.kwargs.items() if k in names})
    if kwargs.get("return_indices"):
        raise ModelError(f"TVM hand schedule: '{node.name}' (max_pool2d with return_indices) is not supported")
    return cls(**kwargs)


def lower(model: nn.Module, example: torch.Tensor, *, lanes: int = 8, parallel: bool = False):
    """The Relax IRModule (function ``main``) computing ``model(example)`` with hand-scheduled kernels.

    ``model`` must be in eval mode (BatchNorm uses its running statistics and is folded).
    Returns ``(mod, n_calls)``: the module and the number of kernel calls in ``main``.
    """
    from ....graph.trace import trace

    if model.training:
        raise ModelError("TVM lowering needs the model in eval mode (call model.eval())")
    gm = trace(model, (example,))
    low = _Lowering(gm, lanes, parallel)
    mod = low.run()
    return mod, low.calls
