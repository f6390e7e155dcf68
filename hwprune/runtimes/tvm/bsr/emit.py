"""Emitting a block-sparse layer into a Relax graph on hwprune's BSR kernel (:mod:`.kernels`).

Shared by the TVM export's graph rewrite (:mod:`hwprune.export.tvm_bsr`) and the block profiler
(:mod:`hwprune.latency.measure_blocks`), so that both time and ship the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kernels import KernelSpec, Schedule, bsr_primfunc, choose_schedule, im2col_primfunc
from .packing import SparseLayer

OP_OPAQUE = 8  # TVM's kOpaque: FuseOps must not merge a hand-written kernel into its neighbours


@dataclass
class RewrittenLayer:
    """What replaced one sparse layer: its kernel spec and schedule."""

    name: str
    spec: KernelSpec
    schedule: Schedule
    im2col: bool
    input_hw: tuple[int, int] | None = None  # a conv's input height and width


def _kernel_call(bb, layer: SparseLayer, x3, spec: KernelSpec, symbol: str):
    """Register the layer's BSR PrimFunc as ``symbol`` and call it on ``x3`` (weights as constants)."""
    from tvm import relax

    sched = choose_schedule(spec)
    func = bsr_primfunc(spec, sched, name=symbol).with_attr("op_pattern", OP_OPAQUE)
    gv = bb.add_func(func, symbol)
    data, indices, indptr = layer.kernel_arrays()
    out = relax.call_tir(gv, [x3, relax.const(data), relax.const(indices), relax.const(indptr)],
                         out_ty=relax.TensorType(spec.out_shape if spec.positions else spec.out_shape + (1,), "float32"))
    return out, sched


def emit_linear(bb, x, x_shape: list[int], layer: SparseLayer, symbol: str):
    """``x · Wᵀ`` of a sparse linear layer on its BSR kernel, emitted into ``bb``; returns the (not yet
    emitted) output expression in the layer's output shape and the :class:`RewrittenLayer`.

    Shared by the export's graph rewrite and the block profiler (so that both time the same code).
    """
    from tvm import relax

    o, k = layer.shape
    rows = int(np.prod(x_shape[:-1]))
    spec = KernelSpec(o, k, layer.block, layer.kernel_arrays()[1].size, rows)
    x3 = bb.emit(relax.op.reshape(x, (rows, k, 1)))
    out, sched = _kernel_call(bb, layer, x3, spec, symbol)
    y = bb.emit(out)
    return relax.op.reshape(y, list(x_shape[:-1]) + [o]), RewrittenLayer(layer.name, spec, sched, False)


def emit_conv(bb, x, x_shape: list[int], out_shape: list[int], layer: SparseLayer, strides, padding, dilation,
              symbol: str):
    """A sparse NCHW conv (groups 1, symmetric ``padding`` ``[ph, pw]``) as im2col (none for a 1x1 conv
    with stride 1 and no padding) + its BSR kernel, emitted into ``bb``; like :func:`emit_linear`."""
    from tvm import relax

    n, c, h, w = x_shape
    ho, wo = out_shape[2], out_shape[3]
    geo = layer.conv
    pointwise = tuple(geo["kernel"]) == (1, 1) and list(strides) == [1, 1] and list(padding) == [0, 0]
    o, k = layer.shape
    if pointwise:
        cols = bb.emit(relax.op.reshape(x, (n, c, h * w)))
    else:
        f = im2col_primfunc(n, c, h, w, tuple(geo["kernel"]), list(strides), list(padding), list(dilation),
                            name=symbol + "_im2col").with_attr("op_pattern", OP_OPAQUE)
        gv = bb.add_func(f, symbol + "_im2col")
        cols = bb.emit(relax.call_tir(gv, [x], out_ty=relax.TensorType((n, k, ho * wo), "float32")))
    spec = KernelSpec(o, k, layer.block, layer.kernel_arrays()[1].size, n, ho * wo)
    out, sched = _kernel_call(bb, layer, cols, spec, symbol)
    y = bb.emit(out)
    return relax.op.reshape(y, list(out_shape)), RewrittenLayer(layer.name, spec, sched, not pointwise, (h, w))
