"""Small transformers for the tests: a ViT built on nn.MultiheadAttention and a tiny random BERT."""

import torch
from torch import nn


class Block(nn.Module):
    """Pre-norm transformer block; ``batch_first=False`` blocks transpose around the attention."""

    def __init__(self, dim, heads, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        y = self.ln1(x)
        if not self.batch_first:
            y = y.transpose(0, 1)
        a = self.attn(y, y, y, need_weights=False)[0]
        if not self.batch_first:
            a = a.transpose(0, 1)
        x = x + a
        return x + self.mlp(self.ln2(x))


class TinyViT(nn.Module):
    """Patches of 4x4 pixels, learned positions, two blocks (one batch-first, one not), mean pooling."""

    def __init__(self, in_channels=3, num_classes=10, input_size=16, dim=32, heads=4):
        super().__init__()
        n = (input_size // 4) ** 2
        self.patch = nn.Conv2d(in_channels, dim, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, n, dim) * 0.1)
        self.blocks = nn.Sequential(Block(dim, heads, True), Block(dim, heads, False))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        x = self.blocks(x)
        return self.head(self.norm(x).mean(1))


def tiny_vit(in_channels=1, num_classes=10, input_size=8):
    return TinyViT(in_channels, num_classes, input_size, dim=16, heads=4)


def tiny_bert(vocab_size=100, hidden=32, heads=4, layers=2, ffn=64, seed=0):
    """A randomly initialised BertModel (no pretrained weights: fast and offline)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn, max_position_embeddings=160)
    return BertModel(cfg).eval()


def assert_saves_and_reloads(model, directory, ids, mask):
    """``save_pretrained`` then :func:`hwprune.apply.hf.from_pretrained`: the reloaded sliced model computes
    what ``model`` computes."""
    from hwprune.apply.hf import from_pretrained

    model.save_pretrained(directory)
    again = from_pretrained(directory)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   model.eval()(input_ids=ids, attention_mask=mask).last_hidden_state)
