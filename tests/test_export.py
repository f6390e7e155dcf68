"""ONNX export of sliced models: onnxruntime computes what torch computes; latency is labelled honestly."""

import copy

import numpy as np
import pytest
import torch

from hwprune.runtimes.onnxruntime import export_onnx, onnx_max_abs_diff
from hwprune.graph import discover_groups
from hwprune.runtimes.onnxruntime import measure_onnx_latency
from hwprune.apply.slicing import slice_model
from hwprune.target import load_target

from test_groups import random_keep
from topologies import TOPOLOGIES, randomize_bn


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_sliced_model_exports_at_its_new_width(name, tmp_path):
    import onnx

    cls, shape = TOPOLOGIES[name]
    torch.manual_seed(0)
    model = randomize_bn(cls()).eval()
    x = torch.randn(shape)
    groups = discover_groups(model, x)
    sliced = slice_model(copy.deepcopy(model), groups, random_keep(groups, 1)).eval()
    path = export_onnx(sliced, x[:1], tmp_path / "m.onnx")
    assert onnx_max_abs_diff(path, sliced, torch.randn(5, *shape[1:])) < 1e-4  # dynamic batch too
    # the file holds the sliced weights, not the dense ones
    init = {i.name: tuple(i.dims) for i in onnx.load(str(path)).graph.initializer}
    n_onnx = sum(int(np.prod(d)) for d in init.values())
    assert n_onnx < sum(p.numel() for p in model.parameters())


def test_remote_target_latency_says_where_it_was_measured(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU()).eval()
    path = export_onnx(model, torch.zeros(1, 1, 8, 8), tmp_path / "m.onnx")
    host = measure_onnx_latency({"m": str(path)}, load_target("host-cpu"), repeats=5, warmup=1)
    assert host.on_target and host.note == "" and host.stats["m"].runs == 5
    jetson = measure_onnx_latency({"m": str(path)}, load_target("jetson"), repeats=5, warmup=1)
    assert not jetson.on_target
    assert "NOT on the target device" in jetson.note and "this machine" in jetson.measured_on
    # what ran here is named: the CPU provider, not the TensorRT one the target asks for
    assert jetson.stats["m"].runs == 5 and "CPUExecutionProvider" in jetson.runtime


def test_latency_is_timed_in_rounds_and_the_middle_round_is_kept(tmp_path):
    """60 timed calls: three rounds of 20; 61: 21 + 20 + 20; under 60 one round. The stats are the
    round whose pruned/dense ratio is the median of the three listed."""
    x = torch.zeros(1, 1, 8, 8)
    dense = export_onnx(torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3), torch.nn.ReLU()).eval(), x, tmp_path / "d.onnx")
    pruned = export_onnx(torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU()).eval(), x, tmp_path / "p.onnx")
    paths = {"dense": str(dense), "pruned": str(pruned)}
    res = measure_onnx_latency(paths, load_target("host-cpu"), repeats=60, warmup=2)
    assert len(res.round_ratios) == 3 and res.stats["dense"].runs == res.stats["pruned"].runs == 20
    ratios = sorted(r["pruned"] for r in res.round_ratios)
    assert res.stats["pruned"].median_ms / res.stats["dense"].median_ms == pytest.approx(ratios[1])
    res = measure_onnx_latency(paths, load_target("host-cpu"), repeats=61, warmup=2)
    assert res.stats["dense"].runs in (20, 21) and len(res.round_ratios) == 3
    res = measure_onnx_latency(paths, load_target("host-cpu"), repeats=59, warmup=2)
    assert len(res.round_ratios) == 1 and res.stats["dense"].runs == 59
