"""Weight blocks in transformers: which linears of a BERT get blocks (no trace), ``fluctuation`` on blocks
(scores and bias compensation), and the TVM build of a block-sparse sentence encoder: BSR kernels for the
linears, hand kernels for the attention products and GELU, two inputs (token ids and mask)."""

import numpy as np
import pytest
import torch
from torch import nn

from hwprune.graph.blocks import BlockIndex, block_groups, mask_blocks
from hwprune.budget import Budget, project
from hwprune.regularizers import RegContext, build_regularizer

from test_blocks import block_target

pytest.importorskip("transformers")

from transformer_models import tiny_bert  # noqa: E402


def bert_blocks(model, **kw):
    return block_groups(model, None, block_target(16, 1), **kw)


def test_bert_blocks_are_the_attention_and_mlp_linears_and_the_rest_stays_dense_with_a_reason():
    model = tiny_bert(layers=2)
    groups, skipped = bert_blocks(model)
    per_layer = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"]
    assert [g.name for g in groups] == [f"encoder.layer.{i}.{p}" for i in range(2) for p in per_layer]
    assert {g.name: g.grid for g in groups}["encoder.layer.0.intermediate.dense"] == (4, 32)  # 64 x 32 in 16x1 blocks
    assert set(skipped) == {"embeddings.word_embeddings", "embeddings.position_embeddings",
                            "embeddings.token_type_embeddings", "pooler.dense"}
    assert "outside the attention and MLP blocks" in skipped["pooler.dense"]
    # an excluded block keeps its linears dense
    groups, skipped = bert_blocks(model, exclude=["encoder.layer.1.attention"])
    assert not any(g.name.startswith("encoder.layer.1.attention") for g in groups) and len(groups) == 8
    assert skipped["encoder.layer.1.attention.self.query"] == "excluded"


def fluctuation_on_blocks(model, groups, **options):
    index = BlockIndex(model, groups)
    return index, build_regularizer("fluctuation", RegContext(model, index, keep_units=index.n_units // 2), options)


def test_fluctuation_block_scores_follow_input_and_output_variance():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(256, 3) * torch.tensor([1.0, 3.0, 0.5])
    groups, _ = block_groups(net, x[:1], block_target(16, 1))
    assert [g.name for g in groups] == ["0"]  # "2" writes the output
    index, reg = fluctuation_on_blocks(net, groups)
    reg.calibrate(lambda n: net(x[:n]))
    with torch.no_grad():
        y = net[0](x).double()
    w = net[0].weight.detach().double()
    terms = x.double().var(0, unbiased=False)[None, :] * w**2 / y.var(0, unbiased=False)[:, None]  # (32, 3)
    expect = terms.reshape(2, 16, 3).sum(1).reshape(-1)  # 2 block rows x 3 columns, row-major
    assert np.allclose(reg.scores(), expect.numpy(), rtol=1e-6)
    _, raw = fluctuation_on_blocks(net, groups, relative=False)
    raw.calibrate(lambda n: net(x[:n]))
    raw_expect = (x.double().var(0, unbiased=False)[None, :] * w**2).reshape(2, 16, 3).sum(1).reshape(-1)
    assert np.allclose(raw.scores(), raw_expect.numpy(), rtol=1e-6)


def test_a_block_reading_a_constant_input_goes_first_and_compensation_keeps_the_output_exact():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(128, 4)
    x[:, 2] = 1.5  # input column 2 never varies: its blocks change nothing but a constant
    before = net(x).detach()
    groups, _ = block_groups(net, x[:1], block_target(16, 1))
    index, reg = fluctuation_on_blocks(net, groups)
    reg.calibrate(lambda n: net(x[:n]))
    scores = reg.scores()
    assert scores[[2, 6]].tolist() == [0.0, 0.0] and (np.delete(scores, [2, 6]) > 0).all()
    proj = reg.project(groups, Budget("sparsity", 2 / 8))
    assert sorted(proj.keep["0"].tolist()) == [0, 1, 3, 4, 5, 7]
    reg.finalize(groups, proj.keep)
    mask_blocks(net, groups, proj.keep)
    assert float(net[0].weight.detach()[:, 2].abs().max()) == 0.0
    assert torch.allclose(net(x), before, atol=1e-5)
    assert reg.fold_report.folded == {"0": "bias"}


def masked_encoder(seed=0, sparsity=0.5):
    """A tiny BERT in the sentence-embedding wrapper, half of its 16x1 blocks masked (random plan)."""
    from hwprune.runtimes.tvm.bsr.packing import SparseLayer
    from hwprune.text.minilm import SentenceEncoder

    bert = tiny_bert(vocab_size=100, hidden=32, heads=4, layers=2, ffn=64, seed=seed)
    groups, _ = bert_blocks(bert)
    index = BlockIndex(bert, groups)
    proj = project(groups, np.random.default_rng(seed).random(index.n_units), Budget("sparsity", sparsity))
    index.mask_(index.keep_from_plan(proj.keep))
    layers = [SparseLayer.from_dense("encoder." + g.name, "linear", bert.get_submodule(g.name).weight.detach().numpy(),
                                     g.block, g.block_mask(proj.keep[g.name]),
                                     bias=bert.get_submodule(g.name).bias.detach().numpy()) for g in groups]
    return SentenceEncoder(bert).eval(), layers


def test_sentence_encoder_builds_with_bsr_linears_and_hand_attention_kernels_and_matches_torch():
    pytest.importorskip("tvm")
    from hwprune.runtimes.tvm.relax_import import import_torch
    from hwprune.export.tvm_bsr import _layer_of_weight, build_sparse_module, rewrite_sparse

    enc, layers = masked_encoder()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # padding: the mask reaches the attention
    imported = import_torch(enc, (ids, mask))
    assert imported.n_inputs == 2 and [p.name for p in imported.mod["main"].params[:2]] == ["input_ids", "attention_mask"]
    mod, done = rewrite_sparse(imported.mod, _layer_of_weight(layers, imported.var_of))
    text = imported.bound(mod)["main"].script()
    assert len(done) == 12 and all(d.spec.columns == 32 for d in done)  # batch 2 x 16 tokens per kernel call
    # no matmul is left: linears on BSR kernels, Q·Kᵀ and P·V (per head) on the batched-matmul kernel
    assert "R.matmul" not in text and "R.nn.gelu" not in text and "R.nn.softmax" not in text
    assert text.count("bmm_8x16x8x16") == 2 and text.count("bmm_8x16x16x8") == 2 and text.count("gelu_2x16x64") == 2
    assert text.count("softmax_2x4x16x16") == 2
    build = build_sparse_module(enc, (ids, mask), layers, {"kind": "llvm", "mcpu": "core-avx2"})
    with torch.no_grad():
        want = enc(ids, mask).numpy()
    got = build.run(ids.numpy(), mask.numpy())
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - want).max() < 1e-5 and np.abs(got).max() > 0.1  # a real embedding, not zeros


def test_hand_kernels_for_batched_matmul_softmax_and_gelu_match_numpy_and_torch():
    tvm = pytest.importorskip("tvm")
    from hwprune.runtimes.tvm.dense.kernels import batch_matmul, gelu, softmax

    target = tvm.target.Target({"kind": "llvm", "mcpu": "core-avx2"})
    rng = np.random.default_rng(0)
    for b, n, k, m in [(3, 5, 7, 16), (2, 8, 4, 24)]:  # rows not a multiple of the tile, odd reductions
        a, bb = rng.standard_normal((b, n, k), np.float32), rng.standard_normal((b, k, m), np.float32)
        out = tvm.runtime.tensor(np.zeros((b, n, m), np.float32))
        tvm.compile(batch_matmul(b, n, k, m), target=target)(tvm.runtime.tensor(a), tvm.runtime.tensor(bb), out)
        np.testing.assert_allclose(out.numpy(), a @ bb, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not a multiple of 8"):
        batch_matmul(1, 4, 4, 12)
    x = np.linspace(-9, 9, 3 * 40, dtype=np.float32).reshape(3, 40)
    y = tvm.runtime.tensor(np.zeros_like(x))
    tvm.compile(gelu((3, 40)), target=target)(tvm.runtime.tensor(x), y)
    np.testing.assert_allclose(y.numpy(), torch.nn.functional.gelu(torch.from_numpy(x)).numpy(), atol=1e-5)

    for shape in [(2, 3, 16), (5, 12)]:  # rows of a multiple of 8 (vectorized) and of 12 (not)
        x = (rng.standard_normal(shape) * 6).astype(np.float32)
        x[0, ..., 0] = 80.0  # a dominant logit: the row's max is subtracted first
        y = tvm.runtime.tensor(np.zeros_like(x))
        tvm.compile(softmax(shape), target=target)(tvm.runtime.tensor(x), y)
        want = torch.softmax(torch.from_numpy(x), -1).numpy()
        np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-7)

def test_two_input_artifacts_load_and_match_in_a_fresh_process(tmp_path):
    """The TVM library and the ONNX model of a sentence encoder (token ids + mask in), checked as the
    exporter checks them: in a new interpreter with the runtime alone, inputs in reference.npz order."""
    pytest.importorskip("tvm")
    from hwprune.export.artifacts import LoadedRun, _save_reference
    from hwprune.export.check import check_in_fresh_process
    from hwprune.runtimes.onnxruntime import export_onnx
    from hwprune.export.tvm_bsr import build_sparse_module

    enc, layers = masked_encoder(seed=1)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0
    run = LoadedRun(tmp_path, enc, None, None, (ids, mask), "test", ("input_ids", "attention_mask"), "embedding")
    with torch.no_grad():
        out = enc(ids, mask).numpy()
    ref = _save_reference(tmp_path / "ref.npz", {**run.reference_inputs((ids, mask)), "output": out})
    assert np.load(ref)["input.0.input_ids"].dtype == np.int64  # token ids are not turned into floats
    so = build_sparse_module(enc, (ids, mask), layers, {"kind": "llvm", "mcpu": "core-avx2"}).export(tmp_path / "m.so")
    onnx_path = export_onnx(enc, (ids, mask), tmp_path / "m.onnx", input_names=run.input_names, output_name="embedding")
    for kind, artifact in (("tvm", so), ("onnx", onnx_path)):
        result = check_in_fresh_process(kind, artifact, ref)
        assert result["ok"] and result["max_abs_diff"] < 1e-5, (kind, result)
    # the mask matters: the same ids without padding give another embedding, and the check sees it
    bad = _save_reference(tmp_path / "bad.npz", {**run.reference_inputs((ids, torch.ones_like(mask))), "output": out})
    assert check_in_fresh_process("tvm", so, bad)["max_abs_diff"] > 1e-3
