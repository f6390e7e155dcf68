"""Hugging Face transformers: group discovery by module pattern ("adapters"), no tracing.

transformers 5.x models do not go through torch.fx (their mask builders assign into proxies), so
hwprune recognises their blocks by structure instead. Registered adapters (``ADAPTERS``):

================================  ====================================================================
``bert-attention``                ``X.self.{query,key,value}`` + ``X.output.dense`` (BERT, RoBERTa, MiniLM...)
``bert-feed-forward``             ``L.intermediate.dense`` → activation → ``L.output.dense``
``distilbert-attention``          ``q_lin, k_lin, v_lin, out_lin`` + ``n_heads`` / ``attention_head_size``
``qkvo-attention``                ``q_proj, k_proj, v_proj, o_proj`` + ``num_attention_heads`` / ``head_dim`` (ViT)
``distilbert-ffn``, ``fc-mlp``    ``lin1`` → ``activation`` → ``lin2``; ``fc1`` → ``activation_fn`` → ``fc2`` (ViT)
``gpt2-attention``                fused ``c_attn`` (Conv1D, hidden → 3·heads·head_dim) + ``c_proj`` (Conv1D)
``gpt2-mlp``                      ``c_fc`` (Conv1D) → ``act`` → ``c_proj`` (Conv1D)
================================  ====================================================================

``matches`` looks at structure only (attribute names and types), so it still matches after slicing
(:mod:`hwprune.apply.hf` finds the blocks to fix up with the same predicates); ``declare`` checks the
sizes and refuses, naming the layer, what it cannot prune. A BERT-style block has a fixed inside:

* attention ``X.self.{query,key,value}`` (Linear, hidden → heads·head_size) and ``X.output.dense``
  (Linear, heads·head_size → hidden): a **head** is ``attention_head_size`` rows of Q, K and V (weights
  and biases) and the same columns of ``output.dense``;
* feed-forward ``L.intermediate.dense`` (Linear, hidden → FFN) then an elementwise activation, then
  ``L.output.dense`` (FFN → hidden): a **neuron** is one row of the first and one column of the second.

Both are internal widths: the residual hidden stream goes through a LayerNorm after every block and
is never pruned, so slicing a block never changes a shape seen outside it. That is what makes
discovery without a trace safe. Anything that looks like attention but matches no adapter is an error
naming the layer (exclude it to keep it whole).

After slicing, the fix-up registered for each adapter in :mod:`hwprune.apply.hf` sets the head count
attributes the block's forward reads (``num_attention_heads`` / ``all_head_size``, ``n_heads``,
``num_heads`` / ``split_size``) and records the per-layer widths in ``config.hwprune_pruned_layers``, so
the model runs, saves with ``save_pretrained`` and reloads with :func:`hwprune.apply.hf.from_pretrained`.

Example:
    >>> from transformers import BertConfig, BertModel
    >>> from hwprune.graph import discover_groups
    >>> bert = BertModel(BertConfig(vocab_size=100, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
    ...                             intermediate_size=128))
    >>> [(g.name, g.size) for g in discover_groups(bert, None) if g.prunable][:2]     # 128 neurons, 4 heads
    [('encoder.layer.0.intermediate.dense', 128), ('encoder.layer.0.attention', 4)]
"""

from __future__ import annotations

import abc
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
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


class HFConv1D(abc.ABC):
    """``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layer) as a type, without importing
    transformers: ``isinstance(m, HFConv1D)``. Its weight is ``(in, out)``, the transpose of
    ``nn.Linear``'s; ``nf`` is the output width and ``nx`` the input width."""

    @classmethod
    def __subclasshook__(cls, sub):
        if cls is HFConv1D and any(k.__name__ == "Conv1D" and k.__module__.startswith("transformers.")
                                   for k in sub.__mro__):
            return True
        return NotImplemented


def _conv1d(m, attr: str) -> bool:
    return isinstance(getattr(m, attr, None), HFConv1D)


def _int_attrs(m, *attrs: str) -> bool:
    return all(isinstance(getattr(m, a, None), int) for a in attrs)


def _exclude_hint(name: str) -> str:
    return f"exclude the layer to keep it whole (--exclude {name})"


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
    _declare_heads(ctx, name, sa.num_attention_heads, sa.attention_head_size,
                   [(f"{name}.self.{p}", getattr(sa, p)) for p in ("query", "key", "value")],
                   (f"{name}.output.dense", m.output.dense))


@adapter("bert-feed-forward", is_bert_feed_forward)
def _declare_bert_neurons(ctx: Ctx, name: str, m: nn.Module) -> None:
    _declare_neurons(ctx, (f"{name}.intermediate.dense", m.intermediate.dense),
                     (f"{name}.output.dense", m.output.dense))


def _declare_heads(ctx: Ctx, name: str, heads: int, head_size: int, qkv: list[tuple[str, nn.Module]],
                   out: tuple[str, nn.Module]) -> None:
    """Heads of attention with separate Q, K, V ``nn.Linear``s and an output ``nn.Linear``."""
    _, rows = head_ids(ctx, heads, head_size, name)
    for path, lin in qkv:
        if lin.out_features != len(rows):
            raise ModelError(f"layer '{path}': {lin.out_features} outputs, expected {heads} heads x {head_size}"
                             " (grouped-query attention, with fewer key/value heads, is not supported); "
                             + _exclude_hint(name))
        ctx.member(path, "weight", 0, rows, PRODUCER)
        if lin.bias is not None:
            ctx.member(path, "bias", 0, rows, PRODUCER)
        ctx.layer_kind[path] = "linear"
    path, lin = out
    if lin.in_features != len(rows):
        raise ModelError(f"layer '{path}': {lin.in_features} inputs, expected {heads} heads x {head_size}; "
                         + _exclude_hint(name))
    ctx.member(path, "weight", 1, rows, CONSUMER)
    ctx.layer_kind[path] = "linear"


def _declare_neurons(ctx: Ctx, up: tuple[str, nn.Module], down: tuple[str, nn.Module]) -> None:
    """Neurons of ``up`` (an ``nn.Linear``) → elementwise activation → ``down`` (an ``nn.Linear``)."""
    (up_path, up_lin), (down_path, down_lin) = up, down
    if down_lin.in_features != up_lin.out_features:
        raise ModelError(f"layer '{down_path}': {down_lin.in_features} inputs, but '{up_path}' has "
                         f"{up_lin.out_features} outputs")
    neurons = ctx.new(up_lin.out_features)
    ctx.member(up_path, "weight", 0, neurons, PRODUCER)
    if up_lin.bias is not None:
        ctx.member(up_path, "bias", 0, neurons, PRODUCER)
    ctx.member(down_path, "weight", 1, neurons, CONSUMER)
    ctx.layer_kind[up_path] = ctx.layer_kind[down_path] = "linear"


# --- attention and MLP modules that hold their projections directly ----------------------------------


@dataclass(frozen=True)
class FlatAttention:
    """An attention module holding Q, K, V and output ``nn.Linear``s as attributes and its head count
    and head size as ints; its forward reshapes with the head size (``view(..., -1, head_size)``), so
    after slicing only the head count attribute changes (:mod:`hwprune.apply.hf`)."""

    name: str
    projections: tuple[str, str, str, str]  # query, key, value, output
    heads: str  # attribute: number of heads
    head_size: str  # attribute: rows per head

    def matches(self, m: nn.Module) -> bool:
        return all(_linear(m, a) for a in self.projections) and _int_attrs(m, self.heads, self.head_size)

    def declare(self, ctx: Ctx, name: str, m: nn.Module) -> None:
        q, k, v, o = self.projections
        _declare_heads(ctx, name, getattr(m, self.heads), getattr(m, self.head_size),
                       [(f"{name}.{p}", getattr(m, p)) for p in (q, k, v)], (f"{name}.{o}", getattr(m, o)))


@dataclass(frozen=True)
class FlatMLP:
    """An MLP module ``up`` → ``act`` → ``down`` (``nn.Linear``s, hidden → FFN → hidden)."""

    name: str
    up: str
    down: str
    act: str

    def matches(self, m: nn.Module) -> bool:
        if not (_linear(m, self.up) and _linear(m, self.down) and callable(getattr(m, self.act, None))):
            return False
        up, down = getattr(m, self.up), getattr(m, self.down)
        return up.in_features == down.out_features  # back to the hidden width: the block's inside

    def declare(self, ctx: Ctx, name: str, m: nn.Module) -> None:
        _declare_neurons(ctx, (f"{name}.{self.up}", getattr(m, self.up)),
                         (f"{name}.{self.down}", getattr(m, self.down)))


FLAT_ATTENTION = (
    FlatAttention("distilbert-attention", ("q_lin", "k_lin", "v_lin", "out_lin"), "n_heads", "attention_head_size"),
    FlatAttention("qkvo-attention", ("q_proj", "k_proj", "v_proj", "o_proj"), "num_attention_heads", "head_dim"),
)
FLAT_MLP = (
    FlatMLP("distilbert-ffn", "lin1", "lin2", "activation"),
    FlatMLP("fc-mlp", "fc1", "fc2", "activation_fn"),
)
for _spec in FLAT_ATTENTION + FLAT_MLP:
    adapter(_spec.name, _spec.matches)(_spec.declare)


# --- GPT-2: fused QKV in transformers' Conv1D (weight (in, out)) -----------------------------------------


def is_gpt2_attention(m: nn.Module) -> bool:
    """GPT-2 self-attention; cross-attention (``q_attn``, a ``c_attn`` of K and V only) is not matched."""
    return (_conv1d(m, "c_attn") and _conv1d(m, "c_proj") and _int_attrs(m, "num_heads", "head_dim", "split_size")
            and not getattr(m, "is_cross_attention", False) and not hasattr(m, "q_attn"))


def is_gpt2_mlp(m: nn.Module) -> bool:
    return _conv1d(m, "c_fc") and _conv1d(m, "c_proj") and callable(getattr(m, "act", None))


@adapter("gpt2-attention", is_gpt2_attention)
def _declare_gpt2_heads(ctx: Ctx, name: str, m: nn.Module) -> None:
    # c_attn: (hidden, 3·H·d), output columns Q | K | V; head h is columns h·d … (h+1)·d of each third.
    heads, d = m.num_heads, m.head_dim
    _, rows = head_ids(ctx, heads, d, name)
    if m.c_attn.weight.shape[1] != 3 * len(rows) or m.split_size != len(rows):
        raise ModelError(f"layer '{name}.c_attn': {m.c_attn.weight.shape[1]} outputs, expected Q, K and V of "
                         f"{heads} heads x {d}; " + _exclude_hint(name))
    ctx.member(f"{name}.c_attn", "weight", 1, np.tile(rows, 3), PRODUCER)
    ctx.member(f"{name}.c_attn", "bias", 0, np.tile(rows, 3), PRODUCER)
    if m.c_proj.weight.shape[0] != len(rows):
        raise ModelError(f"layer '{name}.c_proj': {m.c_proj.weight.shape[0]} inputs, expected {heads} heads x {d}; "
                         + _exclude_hint(name))
    ctx.member(f"{name}.c_proj", "weight", 0, rows, CONSUMER)
    ctx.layer_kind[f"{name}.c_attn"] = ctx.layer_kind[f"{name}.c_proj"] = "linear"


@adapter("gpt2-mlp", is_gpt2_mlp)
def _declare_gpt2_neurons(ctx: Ctx, name: str, m: nn.Module) -> None:
    up, down = m.c_fc.weight, m.c_proj.weight  # (hidden, FFN) and (FFN, hidden)
    if down.shape[0] != up.shape[1]:
        raise ModelError(f"layer '{name}.c_proj': {down.shape[0]} inputs, but '{name}.c_fc' has {up.shape[1]} outputs")
    neurons = ctx.new(up.shape[1])
    ctx.member(f"{name}.c_fc", "weight", 1, neurons, PRODUCER)
    ctx.member(f"{name}.c_fc", "bias", 0, neurons, PRODUCER)
    ctx.member(f"{name}.c_proj", "weight", 0, neurons, CONSUMER)
    ctx.layer_kind[f"{name}.c_fc"] = ctx.layer_kind[f"{name}.c_proj"] = "linear"


def matching_adapter(m: nn.Module) -> Adapter | None:
    """The first registered adapter that matches ``m`` (discovery and the after-slice fix-ups use the same)."""
    return next((a for a in ADAPTERS if a.matches(m)), None)


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
        hit = matching_adapter(m)
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
