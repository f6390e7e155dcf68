"""The TVM build of a block-sparse model: Relax graph with each sparse layer on a hand-written BSR kernel.

1. :func:`~hwprune.runtimes.tvm.relax_import.import_torch`: ``torch.export`` → Relax, parameters as inputs.
2. :func:`rewrite_sparse`: every ``matmul(x, permute_dims(W))`` (a linear layer) and ``conv2d(x, W)``
   whose ``W`` is a sparse layer's weight becomes a ``call_tir`` of a :mod:`hwprune.runtimes.tvm.bsr.kernels`
   PrimFunc with the BSR arrays as constants (a k x k conv first goes through an im2col PrimFunc; a
   1x1 conv at stride 1 reads NCHW as it is). Biases stay where the frontend put them.
3. The other parameters are bound as constants; ``tvm.compile`` for the target's TVM target (its
   default pipeline: the dense rest of the model is **not tuned**); ``export_library`` writes a
   ``.so`` that ``tvm.runtime.load_module`` + ``relax.VirtualMachine`` run without hwprune or torch.

Example:
    >>> import tempfile, torch
    >>> from hwprune.runtimes.tvm.bsr.packing import SparseLayer
    >>> net, x = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 10)).eval(), torch.randn(1, 32)
    >>> net[0].weight.data[16:] = 0                    # 16 x 1 blocks: block rows 1 and 2 dropped
    >>> layers = [SparseLayer.from_dense("0", "linear", net[0].weight.detach().numpy(), (16, 1))]
    >>> build = build_sparse_module(net, x, layers, {"kind": "llvm", "mcpu": "core-avx2"})
    >>> [(l.name, l.spec.nnz, l.schedule.strategy) for l in build.layers]
    [('0', 32, 'rows')]
    >>> np.allclose(build.run(x.numpy()), net(x).detach().numpy(), atol=1e-5)
    True
    >>> with tempfile.TemporaryDirectory() as d:
    ...     build.export(f"{d}/model.so").name
    'model.so'
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..errors import HwpruneError
from ..io import atomic_path
from ..runtimes.tvm.bsr.emit import OP_OPAQUE, RewrittenLayer, emit_conv, emit_linear
from ..runtimes.tvm.bsr.packing import SparseLayer
from ..runtimes.tvm.build import require_tvm, tvm_target
from ..runtimes.tvm.relax_import import import_torch


@dataclass
class SparseBuild:
    """A compiled sparse model: the executable, what was rewritten, and how long compiling took."""

    executable: Any
    layers: list[RewrittenLayer]
    target: dict
    input_shape: tuple[int, ...]
    compile_s: float
    info: dict[str, Any] = field(default_factory=dict)

    def export(self, path: str | os.PathLike, cross_compiler: str | None = None) -> Path:
        """Write the shared library (atomically: a temporary name, then a rename)."""
        path = Path(path)
        kwargs = {}
        if cross_compiler:
            from tvm.support import cc  # tvm.contrib.cc moved here in 0.27

            kwargs["fcompile"] = cc.cross_compiler(cross_compiler)
        try:
            with atomic_path(path, ".so") as tmp, _filtered_stderr("Scope Saving"):
                self.executable.export_library(str(tmp), **kwargs)
        except Exception as e:
            raise HwpruneError(f"writing {path} failed (export_library needs a C compiler: gcc, or the target's "
                               f"cross compiler): {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        return path

    def run(self, *xs: np.ndarray) -> np.ndarray:
        """Run the compiled model in this process on its inputs (the check in a fresh process is :mod:`.check`)."""
        import tvm
        from tvm import relax

        vm = relax.VirtualMachine(self.executable, tvm.cpu())
        return vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in xs]).numpy()


@contextlib.contextmanager
def _filtered_stderr(noise: str):
    """Drop TVM's C++ log lines containing ``noise`` (TVM 0.27 logs one "Scope Saving" warning per
    constant tensor when it writes a library: hundreds of lines that say nothing); keep the rest."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [l for l in tmp.read().decode(errors="replace").splitlines(keepends=True) if noise not in l]
            sys.stderr.write("".join(kept))


def _layer_of_weight(layers: list[SparseLayer], var_of: dict[str, str]) -> dict[str, SparseLayer]:
    out, missing = {}, []
    for layer in layers:
        var = var_of.get(f"{layer.name}.weight")
        if var is None:
            missing.append(layer.name)
        else:
            out[var] = layer
    if missing:
        raise HwpruneError(f"sparse layer(s) {', '.join(missing)}: their weight is not a parameter of the exported "
                           "graph (was the layer called through a functional op?)")
    return out


def rewrite_sparse(mod, layers_by_var: dict[str, SparseLayer]):
    """Replace the matmul / conv2d of every sparse weight in ``mod['main']`` by BSR kernel calls.

    Returns the new module and one :class:`RewrittenLayer` per replaced call; a sparse weight that
    no matmul/conv2d consumes in the supported form is an error naming the layer.
    """
    from tvm import relax

    done: list[RewrittenLayer] = []
    dense_calls: dict[tuple, object] = {}  # hand kernels of the dense ops (batched matmul, softmax, GELU), by shape

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.mod_ = mod

        def transform(self):
            main = self.mod_.get_global_var("main")
            self.builder_.update_func(main, self.visit_expr(self.mod_["main"]))
            return self.builder_.get()

        def weight_var(self, expr, transposed: bool):
            """The sparse layer whose weight ``expr`` is (through permute_dims for a linear layer)."""
            if transposed:
                if not isinstance(expr, relax.Var):
                    return None
                bound = self.lookup_binding(expr)
                # torch decomposes a linear on a non-contiguous 3-D input into a bmm with the weight
                # broadcast over the batch: look through the broadcast (the kernel reads it once)
                if isinstance(bound, relax.Call) and getattr(bound.op, "name", "") == "relax.broadcast_to" \
                        and isinstance(bound.args[0], relax.Var):
                    bound = self.lookup_binding(bound.args[0])
                if not (isinstance(bound, relax.Call) and getattr(bound.op, "name", "") == "relax.permute_dims"):
                    return None
                expr = bound.args[0]
            if isinstance(expr, relax.Var) and expr.name in layers_by_var:
                return layers_by_var[expr.name]
            return None

        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            name = getattr(call.op, "name", "")
            if name == "relax.matmul":
                layer = self.weight_var(call.args[1], transposed=True)
                if layer is not None and layer.kind == "linear":
                    return self.linear(call.args[0], layer)
                return emit_batch_matmul(self.builder_, call, dense_calls)
            elif name == "relax.nn.gelu":  # exact GELU (the tanh form is relax.nn.gelu_tanh)
                return emit_elementwise(self.builder_, call, dense_calls, "gelu")
            elif name == "relax.nn.softmax":
                return emit_elementwise(self.builder_, call, dense_calls, "softmax")
            elif name == "relax.nn.conv2d":
                layer = self.weight_var(call.args[1], transposed=False)
                if layer is not None and layer.kind == "conv":
                    return self.conv(call, layer)
            return call

        def linear(self, x, layer: SparseLayer):
            out, rewritten = emit_linear(self.builder_, x, [int(s) for s in x.ty.shape], layer, _symbol(layer.name))
            done.append(rewritten)
            return out

        def conv(self, call, layer: SparseLayer):
            attrs = call.attrs
            padding = list(map(int, attrs.padding))
            if (attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or int(attrs.groups) != 1
                    or padding[0] != padding[2] or padding[1] != padding[3]):
                raise HwpruneError(f"sparse layer '{layer.name}': conv2d with layout {attrs.data_layout}/"
                                   f"{attrs.kernel_layout}, groups {attrs.groups}, padding {padding} is not supported")
            out, rewritten = emit_conv(self.builder_, call.args[0], [int(s) for s in call.args[0].ty.shape],
                                       [int(s) for s in call.ty.shape], layer, list(map(int, attrs.strides)),
                                       padding[:2], list(map(int, attrs.dilation)), _symbol(layer.name))
            done.append(rewritten)
            return out

    new = _Rewriter(mod).transform()
    missing = sorted({l.name for l in layers_by_var.values()} - {d.name for d in done})
    if missing:
        raise HwpruneError(f"sparse layer(s) {', '.join(missing)}: no matmul/conv2d of their weight was found in the "
                           "imported graph, so no BSR kernel could replace them")
    return new, done


def emit_batch_matmul(bb, call, kernels: dict):
    """A dense batched matmul of two activations (a transformer's ``Q·Kᵀ`` and ``P·V``): on the hand
    kernel :func:`hwprune.runtimes.tvm.dense.kernels.batch_matmul` when both operands are static 3-D float32
    tensors and the output width is a multiple of 8; otherwise ``call`` unchanged. One kernel per shape."""
    from tvm import relax

    from ..runtimes.tvm.dense.kernels import batch_matmul

    a, b = call.args
    sa, sb = _static_shape(a), _static_shape(b)
    if (sa is None or sb is None or (len(sa), len(sb)) != (3, 3) or sa[0] != sb[0] or sa[2] != sb[1] or sb[2] % 8
            or {str(a.ty.dtype), str(b.ty.dtype)} != {"float32"}):
        return call
    key = ("bmm", sa[0], sa[1], sa[2], sb[2])
    gv = _hand_kernel(bb, kernels, key, "bmm_" + "x".join(map(str, key[1:])), lambda: batch_matmul(*key[1:]))
    return relax.call_tir(gv, [a, b], out_ty=relax.TensorType((sa[0], sa[1], sb[2]), "float32"))


def _static_shape(expr) -> list[int] | None:
    try:
        return [int(d) for d in expr.ty.shape]
    except (AttributeError, TypeError, ValueError):  # symbolic or unknown shape
        return None


def _hand_kernel(bb, kernels: dict[tuple, object], key: tuple, name: str, build):
    """The GlobalVar of the hand kernel for ``key`` (built by ``build()`` the first time, then shared)."""
    if key not in kernels:
        func = build().with_attr("op_pattern", OP_OPAQUE).with_attr("global_symbol", name)
        kernels[key] = bb.add_func(func, name)
    return kernels[key]


def emit_elementwise(bb, call, kernels: dict, op: str):
    """Exact GELU or a last-axis softmax on the vectorized hand kernels of :mod:`hwprune.runtimes.tvm.dense.kernels`
    (static float32 shapes; otherwise ``call`` unchanged)."""
    from tvm import relax

    from ..runtimes.tvm.dense import kernels as K

    (x,) = call.args
    shape = _static_shape(x)
    if shape is None or str(x.ty.dtype) != "float32":
        return call
    if op == "softmax" and int(call.attrs.axis) not in (-1, len(shape) - 1):
        return call
    key = (op, *shape)
    gv = _hand_kernel(bb, kernels, key, f"{op}_" + "x".join(map(str, shape)), lambda: getattr(K, op)(tuple(shape)))
    return relax.call_tir(gv, [x], out_ty=relax.TensorType(tuple(shape), "float32"))


def _symbol(layer: str) -> str:
    return "bsr_" + "".join(ch if ch.isalnum() else "_" for ch in layer)


def build_sparse_module(model: nn.Module, example, layers: list[SparseLayer], target_dict: dict) -> SparseBuild:
    """Import ``model``, put every layer of ``layers`` on its BSR kernel, compile for ``target_dict``.

    ``example`` (a tensor, or a tuple of the model's inputs) fixes the input shapes, batch included
    (the kernels are specialised to them).
    """
    tvm = require_tvm()
    t0 = time.perf_counter()
    imported = import_torch(model, example)
    by_var = _layer_of_weight(layers, imported.var_of)
    mod, done = rewrite_sparse(imported.mod, by_var)
    mod = imported.bound(mod)
    tgt = tvm_target(target_dict)  # hwprune.runtimes.tvm.build: a Target or its dict
    try:
        ex = tvm.compile(mod, target=tgt)
    except Exception as e:
        if os.environ.get("HWPRUNE_DEBUG"):
            raise
        raise HwpruneError(f"compiling the sparse model for {target_dict} failed: "
                           f"{str(e).splitlines()[-1] if str(e) else type(e).__name__}") from None
    return SparseBuild(ex, done, dict(target_dict), imported.input_shape, time.perf_counter() - t0)
