"""Saving and reloading pruned Hugging Face models (transformers is imported only when called).

A sliced model saves as usual with ``model.save_pretrained(path)``: its ``config.json`` still
describes the architecture it was pruned from, plus ``hwprune_pruned_layers`` (the kept heads and FFN
width of each layer), and ``model.safetensors`` holds the smaller tensors (under the checkpoint names
transformers writes, which for some models, ViT among them, are not the module names).
``AutoModel.from_pretrained`` would build the full-width model and fail on the shapes;
:func:`from_pretrained` lets transformers build it, slices it to the saved widths as soon as it is
built, and lets transformers load the weights (key conversions and tied weights as usual).

After every slice, :func:`_update_hf_attributes` runs the fix-up registered (``@fixup``) for each
graph adapter (:data:`hwprune.graph.hf.ADAPTERS`) on every block that adapter matches: it sets the
attributes the block's forward reads (head counts, GPT-2's ``split_size``) from the sliced tensors and
returns the block's kept widths. A ``Conv1D`` (GPT-2's transposed linear) is resized like ``nn.Linear``.

Example:
    >>> import tempfile
    >>> from transformers import BertConfig, BertModel
    >>> from hwprune.apply.slicing import slice_model
    >>> from hwprune.graph import discover_groups
    >>> bert = BertModel(BertConfig(vocab_size=100, hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
    ...                             intermediate_size=128)).eval()
    >>> pruned = slice_model(bert, discover_groups(bert, None), {"encoder.layer.0.attention": [0, 1]})  # 2 of 4 heads
    >>> with tempfile.TemporaryDirectory() as d:
    ...     pruned.save_pretrained(d)
    ...     again = from_pretrained(d)                  # hwprune.hf.from_pretrained
    >>> again.config.hwprune_pruned_layers
    {'encoder.layer.0': {'intermediate_size': 128, 'num_attention_heads': 2}}
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from torch import nn

from ..errors import ModelError
from ..graph.hf import FLAT_ATTENTION, FLAT_MLP, HFConv1D, FlatAttention, FlatMLP, is_hf_model, matching_adapter
from .resizers import after_slice, resizer

# adapter name -> fix(name, module) -> (layer, widths): update the block's attributes after slicing and
# say how wide it now is; `layer` is the key of config.hwprune_pruned_layers the widths go under.
FixUp = Callable[[str, nn.Module], tuple[str, dict[str, int]]]
FIXUPS: dict[str, FixUp] = {}


def fixup(adapter_name: str):
    """Register the after-slice fix-up of the blocks a graph adapter declares (one per adapter)."""

    def deco(fn: FixUp) -> FixUp:
        if adapter_name in FIXUPS:
            raise ValueError(f"fix-up for adapter '{adapter_name}' is registered twice")
        FIXUPS[adapter_name] = fn
        return fn

    return deco


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def from_pretrained(path: str | os.PathLike, **kwargs):
    """Load a model saved with ``save_pretrained`` after hwprune sliced it (or a dense one).

    transformers itself loads the weights (``cls.from_pretrained``: its checkpoint key conversions, e.g.
    ViT's legacy names, and tied weights apply as usual); the model it builds is sliced to the widths
    in ``config.hwprune_pruned_layers`` right after it is built, so the saved tensors fit. ``kwargs``
    go to ``from_pretrained``.
    """
    import transformers

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json there; save the pruned model with save_pretrained(path)")
    config = transformers.AutoConfig.from_pretrained(str(path))
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.MODEL_MAPPING[type(config)]  # no architectures saved: the base model
    widths = getattr(config, "hwprune_pruned_layers", None)
    if not widths:
        return cls.from_pretrained(str(path), **kwargs).eval()

    def __init__(self, config, *args, **kw):
        cls.__init__(self, config, *args, **kw)
        slice_to_widths(self, config.hwprune_pruned_layers)

    # same name and module as cls: transformers looks its weight conversions up by both
    sliced_cls = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__,
                                             "__qualname__": cls.__qualname__})
    model = sliced_cls.from_pretrained(str(path), **kwargs)
    model.__class__ = cls  # the subclass only changed how it is built
    return model.eval()


def slice_to_widths(model: nn.Module, widths: dict[str, dict[str, int]]) -> nn.Module:
    """Slice a freshly built transformers model (in place) to the per-layer widths hwprune recorded
    (``config.hwprune_pruned_layers``: ``{layer: {num_attention_heads, intermediate_size}}``); which
    units stay does not matter, the weights are loaded next."""
    import numpy as np

    from ..errors import PlanError
    from ..graph import discover_groups
    from .slicing import slice_model

    groups, keep = discover_groups(model, None), {}
    for g in groups:
        layer = max((k for k in widths if k == "" or g.name.startswith(k + ".")), key=len, default=None)
        key = "num_attention_heads" if g.kind == "heads" else "intermediate_size"
        n = widths[layer].get(key) if layer is not None else None
        if n is None or n == g.size:
            continue
        if not 0 < n < g.size:
            raise PlanError(f"group '{g.name}': the saved config keeps {n} {g.kind} of {g.size}; "
                            "the weights come from another architecture")
        keep[g.name] = np.arange(n)
    return slice_model(model, groups, keep) if keep else model


@resizer(HFConv1D)
def _resize_conv1d(m: nn.Module, old: dict) -> None:
    """transformers' Conv1D: weight ``(nx, nf)``, bias ``(nf,)``."""
    m.nx, m.nf = m.weight.shape


@after_slice
def _update_hf_attributes(model: nn.Module) -> None:
    """Run each matched block's fix-up; record the per-layer widths in the config of a transformers model."""
    widths: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        hit = matching_adapter(m)
        if hit is None:
            continue
        fix = FIXUPS.get(hit.name)
        if fix is None:  # a sliced block with stale attributes would fail (or be wrong) at its next forward
            raise ModelError(f"layer '{name}': adapter '{hit.name}' has no after-slice fix-up; register one with "
                             "hwprune.apply.hf.fixup")
        layer, w = fix(name, m)
        widths.setdefault(layer, {}).update(w)
    config = getattr(model, "config", None)
    if is_hf_model(model) and config is not None:
        # The config keeps describing the architecture the weights came from (from_config builds it);
        # this key says how each layer was pruned; from_pretrained slices a fresh model to it.
        config.hwprune_pruned_layers = widths


# --- the fix-ups, one per adapter -----------------------------------------------------------------------


@fixup("bert-attention")
def _fix_bert_attention(name: str, m: nn.Module):
    sa = m.self
    heads = sa.query.out_features // sa.attention_head_size
    sa.num_attention_heads, sa.all_head_size = heads, heads * sa.attention_head_size
    return name.rsplit(".attention", 1)[0], {"num_attention_heads": heads}


@fixup("bert-feed-forward")
def _fix_bert_feed_forward(name: str, m: nn.Module):
    return name, {"intermediate_size": m.intermediate.dense.out_features}


def _flat_attention_fixup(spec: FlatAttention) -> FixUp:
    def fix(name: str, m: nn.Module):
        heads = getattr(m, spec.projections[0]).out_features // getattr(m, spec.head_size)
        setattr(m, spec.heads, heads)
        return _parent(name), {"num_attention_heads": heads}

    return fix


def _flat_mlp_fixup(spec: FlatMLP) -> FixUp:
    def fix(name: str, m: nn.Module):
        return _parent(name), {"intermediate_size": getattr(m, spec.up).out_features}

    return fix


for _spec in FLAT_ATTENTION:
    fixup(_spec.name)(_flat_attention_fixup(_spec))
for _spec in FLAT_MLP:
    fixup(_spec.name)(_flat_mlp_fixup(_spec))


@fixup("gpt2-attention")
def _fix_gpt2_attention(name: str, m: nn.Module):
    # forward splits c_attn's output into Q, K, V at split_size and reshapes with head_dim; embed_dim
    # stays the hidden width (c_proj still writes it)
    m.split_size = m.c_attn.nf // 3
    m.num_heads = m.split_size // m.head_dim
    return _parent(name), {"num_attention_heads": m.num_heads}


@fixup("gpt2-mlp")
def _fix_gpt2_mlp(name: str, m: nn.Module):
    return _parent(name), {"intermediate_size": m.c_fc.nf}

