"""Saving and reloading pruned Hugging Face models (transformers is imported only when called).

A sliced model saves as usual with ``model.save_pretrained(path)``: its ``config.json`` still
describes the architecture it was pruned from, plus ``hwprune_pruned_layers`` (the kept heads and FFN
width of each layer), and ``model.safetensors`` holds the smaller tensors. ``AutoModel.from_pretrained``
would build the full-width model and fail on the shapes; :func:`from_pretrained` builds it, slices it
to the saved widths and loads the weights.

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

from torch import nn

from ..errors import ModelError
from ..graph.hf import is_bert_feed_forward, is_bert_self_attention, is_hf_model
from .resizers import after_slice


def from_pretrained(path: str | os.PathLike):
    """Load a model saved with ``save_pretrained`` after hwprune sliced it (or a dense one)."""
    import transformers
    from safetensors.torch import load_file

    from .reload import load_sliced

    path = Path(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{path}: no model.safetensors there; save the pruned model with save_pretrained(path)")
    config = transformers.AutoConfig.from_pretrained(str(path))
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModel
        model = cls.from_config(config)
    else:
        model = cls(config)
    model.eval()
    return load_sliced(model, load_file(str(weights)))


@after_slice
def _update_bert_attributes(model: nn.Module) -> None:
    """Head counts of sliced BERT-style self-attention, and the per-layer widths in the config."""
    widths = {}
    for name, m in model.named_modules():
        if is_bert_self_attention(m):
            heads = m.query.out_features // m.attention_head_size
            if heads != m.num_attention_heads:
                m.num_attention_heads = heads
                m.all_head_size = heads * m.attention_head_size
            widths.setdefault(name.rsplit(".attention", 1)[0], {})["num_attention_heads"] = heads
        elif is_bert_feed_forward(m):
            widths.setdefault(name, {})["intermediate_size"] = m.intermediate.dense.out_features
    config = getattr(model, "config", None)
    if is_hf_model(model) and config is not None:
        # The config keeps describing the architecture the weights came from (from_config builds it);
        # this key says how each layer was pruned. hwprune.apply.hf.from_pretrained reads the shapes back.
        config.hwprune_pruned_layers = widths
