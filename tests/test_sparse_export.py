"""Block-sparse export: the Relax graph rewrite, the TVM library in a fresh process, scipy npz, and the CLI
from a block-mode fit to every format."""

import json
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from hwprune.graph.blocks import BlockIndex, block_groups
from hwprune.budget import Budget, project
from hwprune.export.check import check_in_fresh_process
from hwprune.apply.plan import Plan
from hwprune.runtimes.tvm.bsr.packing import sparse_layers

from helpers_models import sparse_net
from test_blocks import block_target

tvm = pytest.importorskip("tvm")


def masked_net(rows, cols, sparsity=0.6, seed=0):
    """sparse_net with random BN statistics and a random block plan applied (masked)."""
    torch.manual_seed(seed)
    model = sparse_net(3, 5, 8).eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
    x = torch.zeros(1, 3, 8, 8)
    groups, _ = block_groups(model, x, block_target(rows, cols))
    index = BlockIndex(model, groups)
    proj = project(groups, np.random.default_rng(seed).random(index.n_units), Budget("sparsity", sparsity))
    index.mask_(index.keep_from_plan(proj.keep))
    return model, Plan.from_groups(groups, proj.keep, x.shape)


@pytest.mark.parametrize("block,batch", [((8, 1), 1), pytest.param((4, 4), 3, marks=pytest.mark.slow)])
def test_relax_rewrite_puts_every_sparse_layer_on_a_bsr_kernel(block, batch):
    from hwprune.runtimes.tvm.relax_import import import_torch
    from hwprune.export.tvm_bsr import _layer_of_weight, build_sparse_module, rewrite_sparse

    model, plan = masked_net(*block)
    layers = sparse_layers(model, plan)
    assert {l.name for l in layers} == {"conv", "pw", "fc1"}  # head is the classifier: dense
    x = torch.randn(batch, 3, 8, 8)
    imported = import_torch(model, x)
    mod, done = rewrite_sparse(imported.mod, _layer_of_weight(layers, imported.var_of))
    text = imported.bound(mod)["main"].script()
    # the sparse weights are gone from the graph: no conv2d is left, and the one matmul is the head's
    assert "R.nn.conv2d" not in text and text.count("R.matmul") == 1
    assert {d.name for d in done} == {"conv", "pw", "fc1"}
    assert {d.name: d.im2col for d in done} == {"conv": True, "pw": False, "fc1": False}
    build = build_sparse_module(model, x, layers, {"kind": "llvm", "mcpu": "core-avx2"})
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(build.run(x.numpy()), want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # the CLI test below checks the exported library in a fresh process too
def test_shared_library_loads_in_a_fresh_process(tmp_path):
    from hwprune.export.tvm_bsr import build_sparse_module

    model, plan = masked_net(16, 1)
    x = torch.randn(2, 3, 8, 8)
    build = build_sparse_module(model, x, sparse_layers(model, plan), {"kind": "llvm", "mcpu": "core-avx2"})
    so = build.export(tmp_path / "m.so")
    with torch.no_grad():
        np.savez(tmp_path / "ref.npz", input=x.numpy(), output=model(x).numpy())
    result = check_in_fresh_process("tvm", so, tmp_path / "ref.npz")
    assert result["ok"] and result["max_abs_diff"] < 1e-4 and not result["hwprune_imported"]
    # the check is not vacuous: other expected outputs fail it
    np.savez(tmp_path / "bad.npz", input=x.numpy(), output=np.zeros_like(model(x).detach().numpy()))
    assert check_in_fresh_process("tvm", so, tmp_path / "bad.npz")["max_abs_diff"] > 1e-2


def cli(capsys, *args):
    """The CLI entry point, in this process (the artifacts' checks still run in fresh processes)."""
    from hwprune.cli.main import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_block_fit_then_every_export_format(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = cli(capsys, "fit", "--target", "host-cpu", "--granularity", "blocks", "--sparsity", "0.6", "--model",
                       "helpers_models:sparse_net", "--epochs", "1", "1", "1", "--no-latency", "--out", str(run))
    assert code == 0, err
    plan = json.loads((run / "plan.json").read_text())
    assert plan["granularity"] == "blocks" and all(g["block"] == [16, 1] for g in plan["groups"])
    kept = sum(len(g["keep"]) for g in plan["groups"])
    total = sum(g["size"] for g in plan["groups"])
    assert total - kept == round(0.6 * total)  # the budget, exactly, in blocks
    report = json.loads((run / "report.json").read_text())
    assert report["achieved"]["sparsity"] == round(0.6 * total) / total and report["blocks"]["layers"]
    state = torch.load(run / "pruned.pt", weights_only=True)["state_dict"]

    for fmt in ("npz", "tvm", "onnx"):
        code, out, err = cli(capsys, "export", str(run), "--format", fmt, *(["--measure"] if fmt == "tvm" else []))
        assert code == 0, err
        assert "checked in a fresh process" in out and "within 0.0001" in out, out

    # npz: scipy alone gives back exactly the fine-tuned, masked weights, and dropped blocks are absent
    folder = run / "export" / "npz"
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["layers"]:
        a = sp.load_npz(folder / entry["file"])
        assert entry["format"] == "bsr" and a.blocksize == (16, 1) and list(a.shape) == entry["padded_shape"]
        o, k = entry["shape"]
        w = state[entry["layer"] + ".weight"].reshape(o, k).numpy()
        np.testing.assert_array_equal(a.toarray()[:o, :k], w)
        group = next(g for g in plan["groups"] if g["name"] == entry["layer"])
        assert entry["nnz_blocks"] == len(group["keep"]) and a.data.shape[0] == len(group["keep"])
    # tvm: every sparse layer is on a kernel; the library also runs here on real digits, against a model
    # the test rebuilds from the run folder itself
    tvm_manifest = json.loads((run / "export" / "tvm" / "manifest.json").read_text())
    assert {l["layer"] for l in tvm_manifest["layers"]} == {e["layer"] for e in manifest["layers"]}
    # --measure: TVM against onnxruntime in three rounds (host-cpu's 200 calls), the middle ratio kept
    measured = tvm_manifest["measured"]
    assert measured["rounds"] == 3 and len(measured["round_ratios"]) == 3
    assert sorted(measured["round_ratios"])[1] == pytest.approx(measured["ratio"], abs=2e-4)
    from hwprune.data import load_dataset
    from hwprune.apply.plan import apply_plan

    model = apply_plan(sparse_net(1, 10, 8), Plan.load(run / "plan.json"))
    model.load_state_dict(state)
    x = load_dataset("digits").test[7][0][None]
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(run / "export" / "tvm" / "model.so")), tvm.cpu())
    with torch.no_grad():
        np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x.numpy())).numpy(), model.eval()(x).numpy(),
                                   atol=1e-4, rtol=1e-4)


def test_export_errors_are_one_line(tmp_path, capsys):
    code, _, err = cli(capsys, "export", str(tmp_path / "nope"), "--format", "npz")
    assert code == 2 and "no such run folder" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "half").mkdir()
    code, _, err = cli(capsys, "export", str(tmp_path / "half"), "--format", "tvm")
    assert code == 2 and "no plan.json" in err and len(err.strip().splitlines()) == 1
    # nothing trained (no checkpoint): --resume would only repeat what stopped it, so the hint is a new fit
    assert "stopped before training anything" in err and "--resume" not in err
    (tmp_path / "half" / "checkpoint.pt").write_bytes(b"")  # a run stopped mid-training is resumed
    code, _, err = cli(capsys, "export", str(tmp_path / "half"), "--format", "tvm")
    assert code == 2 and f"hwprune fit --resume {tmp_path / 'half'}" in err
    # a channel run has no sparse layers: npz/tvm are refused before any work, naming what to do
    from hwprune.graph import discover_groups

    model = sparse_net(3, 5, 8)
    groups = [g for g in discover_groups(model, torch.zeros(1, 3, 8, 8)) if g.prunable]
    Plan.from_groups(groups, {g.name: np.arange(g.size // 2) for g in groups}, (1, 3, 8, 8)).save(tmp_path / "ch" / "plan.json")
    code, _, err = cli(capsys, "export", str(tmp_path / "ch"), "--format", "npz")
    assert code == 2 and "this run pruned channels" in err and "--format onnx" in err and len(err.strip().splitlines()) == 1


def test_measure_times_a_channel_runs_dense_library(tmp_path, capsys):
    """--format tvm --measure on a channel run: the dense-path library against onnxruntime on the same sliced
    model, labelled with this machine (it used to print and write exactly what it does without --measure)."""
    from helpers_models import channel_run_folder

    channel_run_folder(tmp_path)
    code, out, err = cli(capsys, "export", str(tmp_path), "--format", "tvm", "--measure", "--no-check")
    assert code == 0, err
    measured = json.loads((tmp_path / "export" / "tvm" / "manifest.json").read_text())["measured"]
    tvm_name, ort_name = "TVM model.so (dense path)", "onnxruntime, same sliced model"
    assert list(measured["median_ms"]) == [tvm_name, ort_name]
    assert "hand schedule" in measured["runtimes"][tvm_name]
    # host-cpu.yaml: repeats 200, threads 1 (so the hand schedule has no parallel loops), the local machine
    assert measured["repeats"] == 200 and measured["rounds"] == 3
    assert measured["threads"] == {tvm_name: 1, ort_name: 1}
    assert measured["measured_on"].startswith("this machine: ") and measured["on_target"] is True
    med = measured["median_ms"]
    # TVM over onnxruntime, not the inverse; the medians are rounded to 4 places (~0.3% at 0.03 ms)
    assert measured["ratio"] == pytest.approx(med[tvm_name] / med[ort_name], rel=1e-2)
    assert f"measured (batch 1, {measured['measured_on']}): {tvm_name}" in out, out


@pytest.mark.parametrize("fmt", ["onnx", "npz"])
def test_measure_is_refused_for_a_format_it_cannot_time(tmp_path, capsys, fmt):
    # refused before the run folder is even read: the flag, not the folder, is the mistake
    code, _, err = cli(capsys, "export", str(tmp_path / "nope"), "--format", fmt, "--measure")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--measure works with --format tvm only" in err and f"--format {fmt}" in err


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="needs Debian's gcc-aarch64-linux-gnu")
def test_measure_says_why_an_aarch64_dense_library_is_not_timed(tmp_path):
    from hwprune.export.artifacts import export_run
    from helpers_models import channel_run_folder

    channel_run_folder(tmp_path)
    result = export_run(tmp_path, "tvm", target="jetson", check=False, measure=True)
    assert "measured" not in result.manifest
    assert any(n.startswith("not measured: the library is built for aarch64") for n in result.notes), result.notes
