"""Attention heads and MLP neurons: discovery, slicing == masking, attributes, save/reload, ONNX.

Two families: Hugging Face BERT (a tiny randomly initialised BertModel, found by module pattern) and
models built on torch.nn.MultiheadAttention (a small ViT, traced with torch.fx).
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from hwprune.budget import Budget, project
from hwprune.errors import BudgetError, ModelError
from hwprune.graph import discover_groups
from hwprune.apply.attention import HeadPrunedMultiheadAttention
from hwprune.apply.reload import load_sliced

from topologies import random_keep
from hwprune.apply.slicing import mask_model, slice_model
from hwprune.target import parse_target

from transformer_models import TinyViT, tiny_bert

TARGET = parse_target(
    "name: t\ndevice: {name: x, arch: x86_64}\n"
    "groups: {linear: {neurons: 8}, attention: {heads: 2}}\nruntime: {}\n"
)


def bert_inputs(batch=3, length=12, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length // 2 :] = 0  # padding, so the attention mask matters
    return ids, mask


def hidden(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


# --- BERT ------------------------------------------------------------------------------------------


def test_bert_groups_are_heads_and_neurons_per_layer():
    bert = tiny_bert()
    groups = {g.name: g for g in discover_groups(bert, bert_inputs(), target=TARGET)}
    assert sorted(groups) == ["encoder.layer.0.attention", "encoder.layer.0.intermediate.dense",
                              "encoder.layer.1.attention", "encoder.layer.1.intermediate.dense"]
    heads = groups["encoder.layer.0.attention"]
    assert (heads.kind, heads.size, heads.multiple) == ("heads", 4, 2)  # the target's attention multiple
    q = next(m for m in heads.members if m.key == "encoder.layer.0.attention.self.query.weight:0")
    assert q.unit_of.tolist() == np.repeat(np.arange(4), 8).tolist()  # head size 32 / 4 = 8 rows each
    assert "encoder.layer.0.attention.output.dense.weight:1" in heads.signature
    ffn = groups["encoder.layer.0.intermediate.dense"]
    assert (ffn.kind, ffn.size, ffn.multiple) == ("neurons", 64, 8)
    assert set(ffn.signature) == {"encoder.layer.0.intermediate.dense.weight:0", "encoder.layer.0.intermediate.dense.bias:0",
                                  "encoder.layer.0.output.dense.weight:1"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bert_sliced_equals_masked(seed):
    bert = tiny_bert(seed=seed)
    ids, mask = bert_inputs(seed=seed)
    groups = discover_groups(bert, (ids, mask))
    keep = random_keep(groups, seed)
    masked = mask_model(copy.deepcopy(bert), groups, keep)
    sliced = slice_model(copy.deepcopy(bert), groups, keep)
    torch.testing.assert_close(hidden(sliced, ids, mask), hidden(masked, ids, mask), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hidden(bert, ids, mask), hidden(masked, ids, mask), atol=1e-4)
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in bert.parameters())
    for i in range(2):
        sa = sliced.encoder.layer[i].attention.self
        kept = len(keep[f"encoder.layer.{i}.attention"])
        assert (sa.num_attention_heads, sa.all_head_size, sa.query.out_features) == (kept, kept * 8, kept * 8)
        assert sliced.config.hwprune_pruned_layers[f"encoder.layer.{i}"] == {
            "num_attention_heads": kept, "intermediate_size": len(keep[f"encoder.layer.{i}.intermediate.dense"])}


def test_bert_saves_and_reloads_without_patches(tmp_path):
    import hwprune.apply.hf

    bert = tiny_bert()
    ids, mask = bert_inputs()
    groups = discover_groups(bert, (ids, mask))
    sliced = slice_model(bert, groups, random_keep(groups, 3))
    expected = hidden(sliced, ids, mask)
    sliced.save_pretrained(tmp_path / "pruned")
    again = hwprune.apply.hf.from_pretrained(tmp_path / "pruned")
    torch.testing.assert_close(hidden(again, ids, mask), expected, rtol=0, atol=0)
    # the plain state_dict route: a fresh dense model, resized to the saved widths
    fresh = load_sliced(tiny_bert(seed=9), sliced.state_dict())
    torch.testing.assert_close(hidden(fresh, ids, mask), expected, rtol=0, atol=0)


def test_reload_refuses_weights_of_another_architecture():
    from hwprune.errors import PlanError

    sd = tiny_bert(ffn=64).state_dict()
    sd["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(70, 32)  # more neurons than the model has
    with pytest.raises(PlanError, match="encoder.layer.0.intermediate.dense"):
        load_sliced(tiny_bert(ffn=64), sd)


def test_bert_onnx_matches_torch(tmp_path):
    import onnxruntime as ort

    from hwprune.text.minilm import SentenceEncoder

    bert = tiny_bert()
    ids, mask = bert_inputs()
    groups = discover_groups(bert, (ids, mask))
    sliced = slice_model(bert, groups, random_keep(groups, 4))
    enc = SentenceEncoder(sliced).eval()
    path = tmp_path / "bert.onnx"
    torch.onnx.export(enc, (ids, mask), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                      dynamic_axes={"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids2, mask2 = bert_inputs(batch=5, length=20, seed=7)  # other shapes than the exported example
    out = sess.run(None, {"input_ids": ids2.numpy(), "attention_mask": mask2.numpy()})[0]
    with torch.no_grad():
        ref = enc(ids2, mask2).numpy()
    assert out.shape == (5, 32)
    assert np.max(np.abs(out - ref)) < 1e-5


def test_unknown_transformer_attention_is_an_error_naming_the_layer():
    # Llama's attention keeps no head count attribute (and may group its key/value heads): no adapter
    # matches it, and its gated MLP matches none either (GPT-2, ViT, DistilBERT: tests/test_zoo_transformers.py)
    from transformers import LlamaConfig, LlamaModel

    llama = LlamaModel(LlamaConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                                   intermediate_size=32, vocab_size=50))
    with pytest.raises(ModelError, match=r"layer 'layers\.0\.self_attn' \(LlamaAttention\)"
                                         r".*--exclude layers\.0\.self_attn"):
        discover_groups(llama, None)
    with pytest.raises(ModelError, match="no block matches"):
        discover_groups(llama, None, exclude=["layers.0.self_attn"])


def test_excluded_bert_layer_keeps_its_width():
    bert = tiny_bert()
    names = {g.name for g in discover_groups(bert, None, exclude=["encoder.layer.1"])}
    assert names == {"encoder.layer.0.attention", "encoder.layer.0.intermediate.dense"}


# --- nn.MultiheadAttention (ViT) ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_vit_sliced_equals_masked(seed):
    torch.manual_seed(seed)
    vit = TinyViT().eval()
    x = torch.randn(2, 3, 16, 16)
    groups = discover_groups(vit, x, target=TARGET)
    by_name = {g.name: g for g in groups}
    attn = by_name["blocks.0.attn"]
    assert (attn.kind, attn.size, attn.multiple, attn.prunable) == ("heads", 4, 2, True)
    assert set(attn.signature) == {"blocks.0.attn.in_proj_weight:0", "blocks.0.attn.in_proj_bias:0",
                                   "blocks.0.attn.out_proj.weight:1"}
    assert by_name["blocks.0.mlp.0"].prunable and by_name["blocks.0.mlp.0"].multiple == 8
    keep = random_keep(groups, seed)
    masked = mask_model(copy.deepcopy(vit), groups, keep)
    sliced = slice_model(copy.deepcopy(vit), groups, keep)
    with torch.no_grad():
        torch.testing.assert_close(sliced(x), masked(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(vit(x), masked(x), atol=1e-4)
    for i in range(2):
        a = sliced.blocks[i].attn
        assert isinstance(a, HeadPrunedMultiheadAttention)
        assert a.num_heads == len(keep[f"blocks.{i}.attn"]) and a.head_dim == 8 and a.embed_dim == 32
        assert a.in_proj_weight.shape == (3 * a.num_heads * 8, 32) and a.out_proj.in_features == a.num_heads * 8


def test_head_pruned_attention_masks_match_the_masked_layer():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 5:] = True
    causal = torch.ones(5, 7, dtype=torch.bool).triu(1)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, q, kv):
            return self.attn(q, kv, kv, key_padding_mask=pad, attn_mask=causal, need_weights=False)[0]

    model = Wrap().eval()
    groups = discover_groups(model, (q, kv))
    keep = {"attn": np.array([1, 3])}
    masked = mask_model(copy.deepcopy(model), groups, keep)
    sliced = slice_model(copy.deepcopy(model), groups, keep)
    with torch.no_grad():
        torch.testing.assert_close(sliced(q, kv), masked(q, kv), rtol=1e-5, atol=1e-5)
        out, w = sliced.attn(q, kv, kv, key_padding_mask=pad, attn_mask=causal)
    assert w.shape == (2, 5, 7) and torch.allclose(w.sum(-1), torch.ones(2, 5))
    with pytest.raises(ValueError, match="2-D"):
        sliced.attn(q, kv, kv, attn_mask=torch.zeros(8, 5, 7))


def test_vit_state_dict_reload_and_onnx(tmp_path):
    from hwprune.runtimes.onnxruntime import export_onnx, onnx_max_abs_diff

    torch.manual_seed(0)
    vit = TinyViT().eval()
    x = torch.randn(4, 3, 16, 16)
    groups = discover_groups(vit, x)
    sliced = slice_model(vit, groups, random_keep(groups, 5))
    torch.save(sliced.state_dict(), tmp_path / "vit.pt")
    torch.manual_seed(1)
    fresh = load_sliced(TinyViT(), torch.load(tmp_path / "vit.pt", weights_only=True), x[:1]).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), sliced(x), rtol=0, atol=0)
    export_onnx(sliced, x[:1], tmp_path / "vit.onnx")
    assert onnx_max_abs_diff(tmp_path / "vit.onnx", sliced, x) < 1e-5


def test_unsupported_multihead_attention_names_the_layer():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)

        def forward(self, q, kv):
            return self.attn(q, kv, kv)[0]

    with pytest.raises(ModelError, match="layer 'attn'.*kdim/vdim.*--exclude attn"):
        discover_groups(Cross(), (torch.zeros(1, 3, 16), torch.zeros(1, 4, 8)))


# --- budgets -------------------------------------------------------------------------------------------


def test_sparsity_removes_the_fraction_of_heads_and_of_neurons_separately():
    bert = tiny_bert(heads=4, ffn=64)
    groups = discover_groups(bert, None, target=TARGET)
    rng = np.random.default_rng(0)
    n = sum(g.size for g in groups if g.prunable)
    proj = project(groups, rng.random(n), Budget("sparsity", 0.5))
    for g in groups:
        assert len(proj.keep[g.name]) == g.size // 2  # 2 of 4 heads, 32 of 64 neurons, in every layer
    # heads never go to zero: at most all but one multiple (2 of 4 heads) can be removed, and a budget
    # beyond that is refused before any work, naming the heads
    with pytest.raises(BudgetError, match="attention heads.*at most 0.5000"):
        project(groups, rng.random(n), Budget("sparsity", 0.6))
    with pytest.raises(ModelError, match="keep at least"):
        slice_model(bert, groups, {"encoder.layer.0.attention": np.array([], dtype=np.int64)})


# --- regularizers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(__import__("hwprune.regularizers", fromlist=["REGISTRY"]).REGISTRY))
def test_every_regularizer_zeroes_whole_heads_and_neurons(method):
    """A regularizer sees heads and neurons as units: what it removes is a whole head (its Q, K and V rows
    and biases) or a whole neuron, never a part of one. The regularizer's lifecycle as the pipeline runs
    it: attach, penalty gradient steps with its after_step, then its projection, finalize and masking."""
    from hwprune.budget import Budget
    from hwprune.graph.groups import UnitIndex
    from hwprune.regularizers import RegContext, SparsitySchedule, build_regularizer
    from hwprune.apply.slicing import mask_model

    bert = tiny_bert()
    groups = discover_groups(bert, None)
    index = UnitIndex(bert, groups)
    schedule = SparsitySchedule(0.5, 20, ramp=0.5)
    from hwprune.budget import project as plan_counts

    # the per-group counts the pipeline plans at the stage's start (what gradual cuts toward)
    first = plan_counts(groups, index.sq_norms().sqrt().double().numpy(), Budget("sparsity", 0.5))
    planned = [len(first.keep[g.name]) for g in index.groups]
    reg = build_regularizer(method, RegContext(bert, index, keep_units=index.n_units // 2, total_steps=20,
                                               schedule=schedule, planned_keep=planned))
    reg.attach(resumed=False)
    params = list(bert.parameters()) + [p for g in reg.extra_parameters() for p in g["params"]]
    for step in range(20 if reg.trains else 0):
        pen = reg.penalty()
        if pen is not None:  # a plain gradient step on the penalty alone
            for p in params:
                p.grad = None
            pen.backward()
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p -= 0.05 * p.grad
        reg.after_step(0.05, step)
    if method in ("wgsef", "gradual"):  # both zero whole units during training already
        assert (index.sq_norms() == 0).any(), f"{method} zeroed no unit during training"
    proj = reg.project(groups, Budget("sparsity", 0.5))
    reg.finalize(groups, proj.keep)
    mask_model(bert, groups, proj.keep)
    zero = (index.sq_norms() == 0).numpy()
    removed = proj.keep_mask == 0
    assert removed.sum() == proj.removed_units > 0
    assert zero[removed].all(), f"{method}: a removed unit is not zero"  # kept units may be zero too (wgsef)
    sa = bert.encoder.layer[0].attention.self
    rows = torch.stack([getattr(sa, p).weight.detach().abs().sum(1) + getattr(sa, p).bias.detach().abs()
                        for p in ("query", "key", "value")]).view(3, 4, 8)
    head_zero = rows == 0
    assert (head_zero.all(dim=(0, 2)) == head_zero.any(dim=(0, 2))).all()  # a head is all zero or not at all
    up = bert.encoder.layer[0].intermediate.dense
    neuron_zero = (up.weight.detach().abs().sum(1) + up.bias.detach().abs()) == 0
    per_group = index.split(torch.as_tensor(zero))
    assert int(head_zero.all(dim=(0, 2)).sum()) == int(per_group["encoder.layer.0.attention"].sum())
    assert int(neuron_zero.sum()) == int(per_group["encoder.layer.0.intermediate.dense"].sum())
