"""Hugging Face transformers: group discovery by module pattern ("adapters"), no tracing.

transformers 5.x models do not go through torch.fx (their mask builders assign into proxies), so
hwprune recognises their blocks by structure instead. A BERT-style block has a fixed inside:

* attention ``X.self.{query,key,value}`` (Linear, hidden → heads·head_size) and ``X.output.dense``
  (Linear, heads·head_size → hidden): a **head** is ``attention_head_size`` rows of Q, K and V (weights
  and biases) and the same columns of ``output.dense``;
* feed-forward ``L.intermediate.dense`` (Linear, hidden → FFN) then an elementwise activation, then
  ``L.output.dense`` (FFN → hidden): a **neuron** is one row of the first and one column of the second.

Both are internal widths: the residual hidden stream goes through a LayerNorm after every block and
is never pruned, so slicing a block never changes a shape seen outside it. That is what makes
discovery without a trace safe. Anything that looks like attention but matches no adapter is an error
naming the layer (exclude it to keep it whole).

After slicing, :func:`hwprune.apply.hf._update_bert_attributes` sets ``num_attention_heads`` / ``all_head_size`` of every
sliced self-attention and records the per-layer widths in ``config.hwprune_pruned_layers``, so the
model runs, saves with ``save_pretrained`` and reloads with :func:`hwprune.apply.hf.from_pretrained`.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> from hwprune.graph import discover_groups
    >>> bert = BertModel(BertConfig(vocab_size=100, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
    ...                             intermediate_size=128))
    >>> [(g.name, g.size) for g in discover_groups(bert, None) if g.prunable][:2]     # 128 neurons, 4 heads
    [('encoder.layer.0.intermediate.dense', 128), ('encoder.layer.0.attention', 4)]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import ModelError
from .groups import CONSUMER, PRODUCER
from .attention import head_ids
from .ops import Ctx


def is_hf_model(model: nn.Module) -> bool:
    """True for a transformers ``PreTrainedModel`` (without importing transformers if it is not loaded)."""
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


@dataclass(frozen=True)
class Adapter:
    """A block pattern: ``matches(module)`` and ``declare(ctx, name, module)`` of its units."""

    name: str
    matches: Callable[[nn.Module], bool]
    declare: Callable[[Ctx, str, nn.Module], None]


ADAPTERS: list[Adapter] = []


def adapter(name: str, matches: Callable[[nn.Module], bool]):
    """Register a block adapter; names are unique."""

    def deco(fn):
        if any(a.name == name for a in ADAPTERS):
            raise ValueError(f"adapter '{name}' is registered twice")
        ADAPTERS.append(Adapter(name, matches, fn))
        return fn

    return deco


def _linear(m, attr: str) -> bool:
    return isinstance(getattr(m, attr, None), nn.Linear)


def is_bert_self_attention(m: nn.Module) -> bool:
    return (all(_linear(m, a) for a in ("query", "key", "value"))
            and isinstance(getattr(m, "attention_head_size", None), int)
            and isinstance(getattr(m, "num_attention_heads", None), int))


def _is_bert_attention(m: nn.Module) -> bool:
    return is_bert_self_attention(getattr(m, "self", None)) and _linear(getattr(m, "output", None), "dense")


def is_bert_feed_forward(m: nn.Module) -> bool:
    inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
    return (_linear(inter, "dense") and hasattr(inter, "intermediate_act_fn") and _linear(out, "dense")
            and hasattr(m, "attention"))


@adapter("bert-attention", _is_bert_attention)
def _declare_bert_heads(ctx: Ctx, name: str, m: nn.Module) -> None:
    sa = m.self
    _, rows = head_ids(ctx, sa.num_attention_heads, sa.attention_head_size, name)
    for proj in ("query", "key", "value"):
        lin = getattr(sa, proj)
        if lin.out_features != len(rows):
            raise ModelError(f"layer '{name}.self.{proj}': {lin.out_features} outputs, expected "
                             f"{sa.num_attention_heads} heads x {sa.attention_head_size}")
        ctx.member(f"{name}.self.{proj}", "weight", 0, rows, PRODUCER)
        if lin.bias is not None:
            ctx.member(f"{name}.self.{proj}", "bias", 0, rows, PRODUCER)
        ctx.layer_kind[f"{name}.self.{proj}"] = "linear"
    ctx.member(f"{name}.output.dense", "weight", 1, rows, CONSUMER)
    ctx.layer_kind[f"{name}.output.dense"] = "linear"


@adapter("bert-feed-forward", is_bert_feed_forward)
def _declare_bert_neurons(ctx: Ctx, name: str, m: nn.Module) -> None:
    up = m.intermediate.dense
    neurons = ctx.new(up.out_features)
    ctx.member(f"{name}.intermediate.dense", "weight", 0, neurons, PRODUCER)
    if up.bias is not None:
        ctx.member(f"{name}.intermediate.dense", "bias", 0, neurons, PRODUCER)
    ctx.member(f"{name}.output.dense", "weight", 1, neurons, CONSUMER)
    ctx.layer_kind[f"{name}.intermediate.dense"] = ctx.layer_kind[f"{name}.output.dense"] = "linear"


def _looks_like_attention(m: nn.Module) -> bool:
    return "attention" in type(m).__name__.lower() and any(True for _ in m.parameters())


def discover_by_pattern(model: nn.Module, excluded: set[str]) -> Ctx:
    """Declare the units of every block an adapter matches; refuse unknown attention layers.

    Excluded blocks (and everything inside them) keep their widths.
    """
    ctx = Ctx()
    covered: list[str] = []  # blocks already declared: their insides are theirs
    unknown: list[str] = []

    def inside(name, prefixes):
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    for name, m in model.named_modules():
        if inside(name, excluded):
            continue
        hit = next((a for a in ADAPTERS if a.matches(m)), None)
        if hit is not None:
            hit.declare(ctx, name, m)
            if hit.name.endswith("attention"):
                covered.append(name)
            continue
        if _looks_like_attention(m) and not inside(name, covered) and not any(
                inside(c, [name]) for c in covered):
            unknown.append(f"'{name}' ({type(m).__name__})")
    if unknown:
        raise ModelError(
            f"layer {unknown[0]}: hwprune has no adapter for this attention structure"
            + (f" (also {', '.join(unknown[1:4])}{' ...' if len(unknown) > 4 else ''})" if len(unknown) > 1 else "")
            + f"; it knows {', '.join(a.name for a in ADAPTERS)} and nn.MultiheadAttention. "
            f"Exclude the layer to keep it whole (--exclude {unknown[0].split(chr(39))[1]})"
        )
    if not ctx.members:
        raise ModelError(
            f"model {type(model).__name__}: no block matches an hwprune adapter ({', '.join(a.name for a in ADAPTERS)}); "
            "transformers models are not traceable with torch.fx, so hwprune cannot find its groups"
        )
    return ctx
