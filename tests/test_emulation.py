"""The aarch64 artifacts (jetson, rpi5 targets) run: cross-compiled here, loaded by an aarch64 Python with
TVM's runtime and onnxruntime from PyPI's aarch64 wheels under qemu-user emulation, and compared with
torch. Never timed: emulated time says nothing about the device.

Skips only where the emulation is not set up; ``bash tests/emulation/make_arm64_root.sh`` sets it up
(.ci/run does).
"""

import json
import shutil

import pytest

from hwprune.export.artifacts import export_run
from hwprune.runtimes.emulation import BUILD_HINT, emulated_python

from helpers_models import channel_run_folder

needs_emulation = pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-gcc") is None or emulated_python("aarch64") is None,
    reason=f"needs Debian's gcc-aarch64-linux-gnu and an aarch64 Python under qemu: {BUILD_HINT}")


@needs_emulation
@pytest.mark.parametrize("target", ["jetson", "rpi5"])
def test_a_channel_runs_aarch64_library_runs_under_emulation_and_matches_torch(tmp_path, target):
    channel_run_folder(tmp_path)
    result = export_run(tmp_path, "tvm", out=tmp_path / target, target=target)
    assert result.check["ok"] and result.check["max_abs_diff"] <= 1e-4
    assert "aarch64 Python under qemu-aarch64-static emulation" in result.check["runtime"]
    assert any("not timed" in n for n in result.notes)
    assert "measured" not in json.loads((tmp_path / target / "manifest.json").read_text())


@needs_emulation
def test_the_onnx_model_matches_torch_under_aarch64_onnxruntime(tmp_path):
    channel_run_folder(tmp_path)
    result = export_run(tmp_path, "onnx", target="jetson")
    assert result.check["ok"]  # here, with this machine's onnxruntime
    assert any(n.startswith("also checked with aarch64 onnxruntime") for n in result.notes), result.notes


@needs_emulation
def test_a_block_runs_bsr_library_runs_under_emulation(tmp_path, capsys):
    from hwprune.cli.main import main

    run = tmp_path / "run"
    assert main(["fit", "--target", "host-cpu", "--granularity", "blocks", "--sparsity", "0.6", "--model",
                 "helpers_models:sparse_net", "--epochs", "1", "1", "1", "--no-latency", "--quiet", "--out", str(run)]) == 0
    assert main(["export", str(run), "--format", "tvm", "--target", "jetson", "--out", str(tmp_path / "arm")]) == 0
    out = capsys.readouterr().out
    assert "checked in a fresh process (TVM" in out and "aarch64 Python under qemu" in out and "within 0.0001" in out, out
