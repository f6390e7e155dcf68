"""``nn.MultiheadAttention`` with heads removed, and the resizer that turns a sliced one into it.

PyTorch's own layer cannot run with fewer heads than its embedding allows: it derives the head size
from the *input* width (``head_dim = embed_dim // num_heads``), so a layer with 3 of its 4 heads left
reshapes its Q/K/V rows wrongly (the hand patches of ``num_heads`` users complain about). After
slicing, hwprune changes the layer's class to :class:`HeadPrunedMultiheadAttention`, a subclass that
keeps the head size and computes the same attention for the heads that remain. The parameter names
(``in_proj_weight``, ``in_proj_bias``, ``out_proj.*``) do not change, so ``state_dict`` files stay
loadable, and the forward is plain matmul/softmax, which exports to ONNX.

Example:
    >>> from hwprune.apply.slicing import slice_model
    >>> from hwprune.graph import discover_groups
    >>> class SelfAttention(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
    ...     def forward(self, x):
    ...         return self.attn(x, x, x, need_weights=False)[0]
    >>> net, x = SelfAttention(), torch.randn(1, 5, 64)
    >>> net = slice_model(net, discover_groups(net, x), {"attn": [0, 1, 3]})      # head 2 removed
    >>> type(net.attn).__name__, net.attn.num_heads, tuple(net(x).shape)
    ('HeadPrunedMultiheadAttention', 3, (1, 5, 64))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resizers import resizer


class HeadPrunedMultiheadAttention(nn.MultiheadAttention):
    """A multi-head attention layer whose Q/K/V width (``num_heads * head_dim``) may differ from its
    input width (``embed_dim``) and its output width (``out_proj.out_features``).

    Same call signature and results as ``nn.MultiheadAttention`` for the heads it keeps; returned
    attention weights average over the kept heads. Per-head 3-D ``attn_mask`` tensors are refused:
    they were written for the original head count.
    """

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first and not unbatched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        # (L, N, E) from here on, as in F.multi_head_attention_forward
        tgt, bsz, _ = query.shape
        src = key.shape[0]
        h, d = self.num_heads, self.head_dim
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).reshape(tgt, bsz * h, d).transpose(0, 1)
        k = F.linear(key, w_k, b_k).reshape(src, bsz * h, d).transpose(0, 1)
        v = F.linear(value, w_v, b_v).reshape(src, bsz * h, d).transpose(0, 1)
        scores = torch.bmm(q * (float(d) ** -0.5), k.transpose(1, 2)).view(bsz, h, tgt, src)
        scores = scores + self._additive_mask(attn_mask, key_padding_mask, is_causal, tgt, src, scores)
        attn = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            attn = F.dropout(attn, p=self.dropout)
        out = torch.bmm(attn.view(bsz * h, tgt, src), v)  # (N*h, L, d)
        out = out.transpose(0, 1).reshape(tgt, bsz, h * d)
        out = self.out_proj(out)
        if self.batch_first and not unbatched:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
        if not need_weights:
            return out, None
        weights = attn.mean(dim=1) if average_attn_weights else attn
        return out, weights.squeeze(0) if unbatched else weights

    def _additive_mask(self, attn_mask, key_padding_mask, is_causal, tgt, src, like) -> Tensor:
        """The masks as one additive (N or 1, 1, L, S) tensor: -inf where attention is not allowed."""
        mask = torch.zeros((), dtype=like.dtype, device=like.device)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=like.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() != 2:
                raise ValueError(
                    f"HeadPrunedMultiheadAttention: a {attn_mask.dim()}-D attn_mask holds one mask per original head; "
                    f"this layer has {self.num_heads} heads left. Pass a 2-D (L, S) mask")
            mask = mask + _additive(attn_mask, like).view(1, 1, tgt, src)
        if key_padding_mask is not None:
            mask = mask + _additive(key_padding_mask, like).view(-1, 1, 1, src)
        return mask


def _additive(mask: Tensor, like: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype, device=like.device).masked_fill(mask, float("-inf"))
    return mask.to(like.dtype)


@resizer(nn.MultiheadAttention)
def _resize_mha(m: nn.MultiheadAttention, old: dict) -> None:
    rows, width = m.in_proj_weight.shape
    m.num_heads = rows // 3 // m.head_dim
    m.embed_dim = m.kdim = m.vdim = width
    # In place, so that the parent's reference, hooks and parameter names stay as they were.
    m.__class__ = HeadPrunedMultiheadAttention
