"""A new user's walk from a run folder to its artifacts: reload the pruned model into PyTorch, load each
export with its runtime alone and compare; hostile run folders and interrupted re-exports.

The run folders are written by hand (``channel_run_folder``: what ``hwprune fit`` leaves, without the
minutes of training); the artifacts are real (onnxruntime, TVM's runtime).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli_env, one_line_error
from helpers_models import channel_run_folder

import hwprune
from hwprune.errors import HwpruneError, PlanError
from hwprune.models import build_model

ARGS = {"in_channels": 1, "num_classes": 10, "input_size": 8}


def fresh():
    return build_model("small-resnet", **ARGS)


def finished_run(folder):
    """channel_run_folder, with the plan inside pruned.pt too, as hwprune fit writes it."""
    channel_run_folder(folder)
    saved = torch.load(folder / "pruned.pt", weights_only=True)
    saved["plan"] = json.loads((folder / "plan.json").read_text())
    torch.save(saved, folder / "pruned.pt")
    return folder


def snapshot(folder):
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file() and f.name != ".hwprune.lock"}


def test_a_pruned_run_reloads_into_pytorch_and_matches_onnxruntime(tmp_path):
    import onnxruntime as ort

    from hwprune.apply.reload import load_pruned
    from hwprune.export.artifacts import export_run

    run = finished_run(tmp_path)
    state = torch.load(run / "pruned.pt", weights_only=True)["state_dict"]
    with pytest.raises(RuntimeError, match="size mismatch"):  # what every user tries first
        fresh().load_state_dict(state)
    model = load_pruned(fresh(), run).eval()  # the run folder, or its pruned.pt
    again = load_pruned(fresh(), run / "pruned.pt").eval()
    by_hand = hwprune.apply_plan(fresh(), str(run / "plan.json"))  # a plan.json path works as well as a Plan
    by_hand.load_state_dict(state)
    export_run(run, "onnx", check=False)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sess = ort.InferenceSession(str(run / "export" / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        for m in (model, again, by_hand.eval()):
            np.testing.assert_allclose(m(x).numpy(), y, atol=1e-4, rtol=1e-4)


def test_the_tvm_library_matches_the_reloaded_model(tmp_path):
    tvm = pytest.importorskip("tvm")
    from hwprune.apply.reload import load_pruned
    from hwprune.export.artifacts import export_run

    run = finished_run(tmp_path)
    export_run(run, "tvm", check=False)
    manifest = json.loads((run / "export" / "tvm" / "manifest.json").read_text())
    lib = tvm.runtime.load_module(str(run / "export" / "tvm" / "model.so"))
    vm = tvm.runtime.vm.VirtualMachine(lib, tvm.cpu())
    x = torch.randn(manifest["inputs"][0]["shape"], generator=torch.Generator().manual_seed(2))
    y = vm["main"](tvm.runtime.tensor(x.numpy()))
    y = (y if hasattr(y, "numpy") else y[0]).numpy()
    with torch.no_grad():
        np.testing.assert_allclose(load_pruned(fresh(), run).eval()(x).numpy(), y, atol=1e-4, rtol=1e-4)


def test_reload_errors_name_what_to_give(tmp_path):
    from hwprune.apply.reload import load_pruned, load_sliced

    run = finished_run(tmp_path)
    state = torch.load(run / "pruned.pt", weights_only=True)["state_dict"]
    with pytest.raises(PlanError, match="example_inputs"):
        load_sliced(fresh(), state)
    with pytest.raises(HwpruneError, match="no such file"):
        load_pruned(fresh(), tmp_path / "nope")
    with pytest.raises(PlanError, match="expected a Plan"):
        hwprune.apply_plan(fresh(), 42)
    # the dense model's weights with the run's plan: one paragraph naming the file and the first key
    torch.save({"state_dict": fresh().state_dict(), "plan": json.loads((run / "plan.json").read_text())},
               tmp_path / "other.pt")
    with pytest.raises(PlanError, match=r"other\.pt.*size mismatch for .*same run"):
        load_pruned(fresh(), tmp_path / "other.pt")


def _edit_json(path, change):
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def _narrower_plan(d):
    d["groups"][0]["keep"] = d["groups"][0]["keep"][:2]


HOSTILE = {
    # what is done to the run folder -> what the one-line error must say
    "plan-json-given": (None, ["plan.json: a file, not a run folder", "here "]),
    "run-json-list": (lambda r: (r / "run.json").write_text("[]"), ["run.json", "found list"]),
    "run-json-args-int": (lambda r: (r / "run.json").write_text('{"args": 5}'), ["run.json", "'args'", "found int"]),
    "model-args": (lambda r: _edit_json(r / "plan.json", lambda d: d["meta"].update(model_args={"in_channels": 1})),
                   ["plan.json", "meta.model_args", "small-resnet"]),
    "plan-narrower": (lambda r: _edit_json(r / "plan.json", _narrower_plan),
                      ["pruned.pt", "size mismatch for conv1.weight", "same run"]),
    "pruned-pt-removed": (lambda r: ((r / "report.json").write_text("{}"), (r / "pruned.pt").unlink()),
                          ["no pruned.pt, though its run finished", "put it back"]),
    "plan-truncated": (lambda r: (r / "plan.json").write_bytes((r / "plan.json").read_bytes()[:500]),
                       ["plan.json", "not valid JSON", "pruned.pt keeps a copy"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_run_folder_is_one_line(tmp_path, capsys, case):
    run = finished_run(tmp_path / "run")
    damage, needles = HOSTILE[case]
    given = run / "plan.json" if damage is None else run
    if damage is not None:
        damage(run)
    one_line_error(capsys, ["export", str(given), "--format", "onnx", "--no-check"], *needles)
    assert not (run / "export" / "onnx" / "model.onnx").exists()


def test_a_target_given_on_the_command_line_is_named(tmp_path, capsys):
    run = finished_run(tmp_path)
    one_line_error(capsys, ["export", str(run), "--format", "onnx", "--no-check", "--target", "no-such-board"],
                   "--target no-such-board", "not found")


@pytest.mark.parametrize("fmt", ["onnx", "npz"])
def test_a_batch_size_for_a_format_without_one_is_refused(tmp_path, capsys, fmt):
    one_line_error(capsys, ["export", str(tmp_path / "any"), "--format", fmt, "--batch-size", "8"],
                   "--batch-size 8", "only --format tvm", "drop --batch-size")


def test_a_folder_in_the_way_is_one_line_and_nothing_is_written(tmp_path, capsys):
    run = finished_run(tmp_path / "run")
    (tmp_path / "out" / "model.onnx").mkdir(parents=True)
    err = one_line_error(capsys, ["export", str(run), "--format", "onnx", "--no-check", "--out", str(tmp_path / "out")],
                         "model.onnx: a folder is in the way", "move it")
    assert ".tmp" not in err and ".hwprune-export-" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name != ".hwprune.lock") == ["model.onnx"]


def test_a_reexport_that_fails_its_check_leaves_the_earlier_export(tmp_path, monkeypatch):
    import hwprune.export.artifacts as artifacts

    run = finished_run(tmp_path)
    out = run / "export" / "onnx"
    artifacts.export_run(run, "onnx", check=False)
    before = snapshot(out)
    saved = torch.load(run / "pruned.pt", weights_only=True)  # the run's weights change (a re-run) ...
    saved["state_dict"] = {k: v * 2 if v.is_floating_point() else v for k, v in saved["state_dict"].items()}
    torch.save(saved, run / "pruned.pt")
    monkeypatch.setattr(artifacts, "TOLERANCE", -1.0)  # ... and the new export's real check fails
    with pytest.raises(HwpruneError) as e:
        artifacts.export_run(run, "onnx")
    assert str(out) in str(e.value) and ".hwprune-export-" not in str(e.value)
    assert "nothing was written" in str(e.value)
    assert snapshot(out) == before and not list(out.glob(".hwprune-export-*"))


def test_ctrl_c_during_a_reexport_leaves_the_earlier_export(tmp_path):
    """A real SIGINT to `hwprune export` while it writes and checks: one message, no traceback, and the
    earlier export (manifest included) is byte for byte what it was; a staging folder that a killed
    export left behind is cleaned by the next one."""
    from hwprune.export.artifacts import export_run

    run = finished_run(tmp_path)
    out = run / "export" / "onnx"
    export_run(run, "onnx", check=False)
    (out / ".hwprune-export-killed").mkdir()  # what SIGKILL leaves
    before = snapshot(out)
    proc = subprocess.Popen([sys.executable, "-m", "hwprune", "export", str(run), "--format", "onnx"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.time() + 60
    # interrupted while the new export is checked in a fresh process: its files exist, not yet in place
    while time.time() < deadline and proc.poll() is None and not children.read_text().strip():
        time.sleep(0.05)
    assert proc.poll() is None, "the export finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "nothing was written" in err, err
    assert snapshot(out) == before and not list(out.glob(".hwprune-export-*"))
