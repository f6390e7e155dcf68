"""One-layer TVM functions for latency profiling: each layer shape at each width, in one module.

Every grid point of a profile becomes a Relax function (``p0``, ``p1``, ...) holding the single
hand-scheduled kernel the dense path would run for that layer (conv + ReLU on a blocked input, or a
dense layer), with random weights. One module means one compile, one ``export_library`` and one upload
to an RPC device for the whole profile. ``overhead`` is a function with one trivial kernel: the
per-call cost that every measured function pays once.

Example:
    >>> shape = {"kernel": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "input_hw": [8, 8]}
    >>> mod, inputs = layer_module([("conv2d", shape, (16, 32))], batch=1, lanes=8)   # 16 -> 32 channels
    >>> inputs
    {'p0': (1, 2, 8, 8, 8), 'overhead': (1, 1, 1, 1, 8)}
"""

from __future__ import annotations

import numpy as np

from . import kernels as K


def _conv_spec(op: str, shape: dict, counts, batch: int, lanes: int) -> K.ConvSpec:
    cin, cout = (counts[0], counts[0]) if op == "depthwise" else counts
    return K.ConvSpec(
        n=batch, cin=cin, h=shape["input_hw"][0], w=shape["input_hw"][1], cout=cout, kh=shape["kernel"][0],
        kw=shape["kernel"][1], stride=tuple(shape["stride"]), pad=tuple(shape["padding"]),
        dilation=tuple(shape["dilation"]), depthwise=op == "depthwise",
        lanes_in=lanes if (cin >= lanes or op == "depthwise") else cin, lanes_out=lanes, act="relu",
    )


def layer_module(points, *, batch: int, lanes: int, parallel: bool = False, seed: int = 0):
    """Relax module with a function per ``(op, shape, counts)`` point, plus ``overhead``.

    Returns ``(mod, inputs)`` where ``inputs[name]`` is the input shape of function ``name``.
    """
    from tvm import relax

    rng = np.random.default_rng(seed)
    bb = relax.BlockBuilder()
    kernels: dict = {}
    inputs: dict[str, tuple[int, ...]] = {}

    def kernel(key, make, name):
        if key not in kernels:
            kernels[key] = bb.add_func(make().without_attr("global_symbol"), name)
        return kernels[key]

    def function(name, in_shape, body):
        x = relax.Var("x", relax.TensorType(in_shape, "float32"))
        with bb.function(name, [x]):
            with bb.dataflow():
                out = bb.emit_output(body(x))
            bb.emit_func_output(out)
        inputs[name] = tuple(in_shape)

    def const(shape):
        return relax.const((rng.standard_normal(shape) * 0.1).astype(np.float32))

    for i, (op, shape, counts) in enumerate(points):
        if op == "linear":
            k, j = counts
            jp = K.blocks(j, lanes) * lanes
            gv = kernel(("dense", batch, k, jp), lambda: K.dense(batch, k, jp, lanes, "none", parallel), "dense")
            body = lambda x, gv=gv, k=k, jp=jp: bb.emit(relax.call_tir(
                gv, [x, const((jp // lanes, k, lanes)), const((jp,))], out_ty=relax.TensorType((batch, jp), "float32")))
            function(f"p{i}", (batch, k), body)
            continue
        spec = _conv_spec(op, shape, counts, batch, lanes)
        spec = K.ConvSpec(**{**spec.__dict__, "parallel": parallel})
        gv = kernel(spec, lambda spec=spec: K.conv2d(spec), "conv")
        body = lambda x, gv=gv, spec=spec: bb.emit(relax.call_tir(
            gv, [x, const(spec.weight_shape), const(spec.out_shape[1:2] + (spec.lanes_out,))],
            out_ty=relax.TensorType(spec.out_shape, "float32")))
        function(f"p{i}", spec.in_shape, body)

    tiny = (batch, 1, 1, 1, lanes)
    gv = kernel(("act", tiny), lambda: K.elementwise(tiny, "act", "relu"), "relu")
    function("overhead", tiny, lambda x: bb.emit(relax.call_tir(gv, [x], out_ty=relax.TensorType(tiny, "float32"))))
    return bb.get(), inputs
