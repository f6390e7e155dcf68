"""torchrun with 2 processes gives what 1 process gives, up to floating-point noise."""

import json
import subprocess
import sys

import pytest

from conftest import cli_env


def run(cmd, cwd):
    r = subprocess.run(cmd, cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-3000:]
    return r


def compare(tmp_path, method):
    args = ["fit", "--target", "host-cpu", "--sparsity", "0.5", "--model", "helpers_models:tiny_resnet",
            "--method", method, "--epochs", "2", "2", "1", "--no-latency", "--quiet"]
    run([sys.executable, "-m", "hwprune", *args, "--out", "one"], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run([*torchrun, "-m", "hwprune", *args, "--out", "two"], tmp_path)
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    # the same data, batches, BN statistics and gradients: the losses agree to float precision
    for a, b in zip(one["history"], two["history"]):
        if a["stage"] == "dense":
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.02, abs=0.01)
    assert json.loads((tmp_path / "one" / "plan.json").read_text())["groups"] == \
        json.loads((tmp_path / "two" / "plan.json").read_text())["groups"]
    assert two["achieved"]["sparsity"] == one["achieved"]["sparsity"] == 0.5
    assert two["accuracy"]["pruned"] == pytest.approx(one["accuracy"]["pruned"], abs=0.015)  # ≤ 5 of 360 digits
    assert two["onnx"]["max_abs_diff"] < 1e-4


def test_two_processes_match_one_with_wgsef(tmp_path):
    compare(tmp_path, "wgsef")


def test_two_processes_match_one_with_polarization(tmp_path):
    """Polarization's mean runs over every scale factor of the network: DDP keeps them identical on
    every rank, so each rank computes the same mean without a collective."""
    compare(tmp_path, "polarization")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["slimming", "group-lasso", "deephoyer", "autoprune", "ista-bn", "magnitude", "uniform"])
def test_two_processes_match_one(tmp_path, method):
    compare(tmp_path, method)
