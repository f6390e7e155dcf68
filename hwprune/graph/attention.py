"""How channels and heads flow through ``torch.nn.MultiheadAttention`` (an fx leaf).

A head is ``head_dim`` rows of each of the packed Q, K and V projections (``in_proj_weight`` rows
``h·d … (h+1)·d`` in each third, with their biases) and the same ``head_dim`` columns of
``out_proj``. Zeroing a head's V rows makes its output exactly zero whatever its Q and K do, so the
masked model equals the sliced one; the Q and K rows go with the head because the sliced layer has no
place for them.

Example:
    >>> block = nn.MultiheadAttention(64, 4, batch_first=True)
    >>> # inside a traced model: a 'heads' group of 4 units named after the layer, multiple from the
    >>> # target's ``attention: {heads: m}``; the output channels are a separate group (out_proj rows).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from .groups import CONSUMER, PRODUCER
from .ops import Unsupported, UnitTag, Value, call_arg, for_modules


def head_ids(ctx, n_heads: int, head_dim: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Fresh ids for ``n_heads`` heads, tagged as heads of layer ``name``; also the per-row ids
    (each head id repeated ``head_dim`` times), which index Q/K/V rows and out-projection columns."""
    heads = ctx.new(n_heads)
    ctx.tag(heads, UnitTag("heads", "attention", name))
    return heads, np.repeat(heads, head_dim)


@for_modules(nn.MultiheadAttention)
def _multihead_attention(ctx, name, m: nn.MultiheadAttention, args, kwargs, out_shape):
    if not m._qkv_same_embed_dim:
        raise Unsupported("nn.MultiheadAttention with kdim/vdim other than embed_dim (separate Q/K/V weights) "
                          "is not supported")
    if m.bias_k is not None or m.add_zero_attn:
        raise Unsupported("nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
    q, k, v = args[0], call_arg(args, kwargs, 1, "key"), call_arg(args, kwargs, 2, "value")
    inputs = [t for t in (q, k, v) if isinstance(t, Value)]
    if len(inputs) != 3:
        raise Unsupported("expected query, key and value tensors")
    for t in inputs:
        if t.tracked and t.axis != len(t.shape) - 1:
            raise Unsupported("expected the embedding on the last axis of query, key and value")
    ctx.layer_kind[name] = "attention"
    # The packed in_proj reads query, key and value through the same columns: their channels are one.
    if all(t.tracked for t in inputs):
        for t in inputs[1:]:
            ctx.union(inputs[0].ids, t.ids)
        ctx.member(name, "in_proj_weight", 1, inputs[0].ids, CONSUMER)
    else:
        for t in inputs:
            ctx.block(t.ids, f"'{name}' reads tracked and untracked tensors through one packed in_proj")
    _, rows = head_ids(ctx, m.num_heads, m.head_dim, name)
    ctx.member(name, "in_proj_weight", 0, np.tile(rows, 3), PRODUCER)  # the Q, K and V thirds
    if m.in_proj_bias is not None:
        ctx.member(name, "in_proj_bias", 0, np.tile(rows, 3), PRODUCER)
    proj = f"{name}.out_proj"
    ctx.member(proj, "weight", 1, rows, CONSUMER)
    ctx.layer_kind[proj] = "linear"
    out = ctx.new(m.out_proj.out_features)
    ctx.member(proj, "weight", 0, out, PRODUCER)
    if m.out_proj.bias is not None:
        ctx.member(proj, "bias", 0, out, PRODUCER)
    shape = tuple(q.shape[:-1]) + (m.out_proj.out_features,)
    return Value(shape, len(shape) - 1, out, producer=proj), Value((), None, None)
