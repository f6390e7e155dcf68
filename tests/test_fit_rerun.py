"""A run folder across a refused, a failed, a corrected, an interrupted and a finished ``hwprune fit``:
checks that need only the flags come before any data is loaded and before the folder is touched; a
run that never trained does not bind its folder; SIGTERM ends like Ctrl-C; a finished run is left alone."""

import json
import signal
import subprocess
import sys

import pytest

import hwprune
from hwprune.budget import Budget
from hwprune.cli.main import main
from hwprune.errors import CheckpointError, HwpruneError
from hwprune.training.checkpoint import Checkpointer
from hwprune.training.pipeline import FitConfig

from conftest import cli_env, one_line_error
from helpers_models import tiny_resnet

FAST = ["--target", "host-cpu", "--model", "helpers_models:tiny_resnet", "--epochs", "2", "2", "1", "--no-latency",
        "--quiet"]


@pytest.fixture
def no_data(monkeypatch):
    """Loading data fails the test: what is checked here must be refused before it."""
    import hwprune.data

    def load_dataset(*a, **k):
        raise AssertionError("data was loaded")

    monkeypatch.setattr(hwprune.data, "load_dataset", load_dataset)


@pytest.mark.parametrize("extra, needles", [
    (["--allocation", "sensitivity", "--granularity", "blocks"],
     ["--allocation sensitivity works on channels", "use --allocation learned or global with --granularity blocks"]),
    (["--method-option", "nosuch=1"],  # gradual's settings, as its Config declares them
     ["--method-option nosuch=1:", "has no setting nosuch", "its settings: normalize, end, every"]),
    (["--method", "wgsef", "--method-option", "strength=abc"],
     ["--method-option strength=abc:", "wgsef strength 'abc': expected a number"]),
    (["--method", "nosuch"], ["unknown method 'nosuch'", "gradual", "wgsef"]),
])
def test_flag_errors_come_before_data_and_leave_no_folder(tmp_path, capsys, no_data, extra, needles):
    out = tmp_path / "x"
    one_line_error(capsys, ["fit", "--sparsity", "0.7", *FAST, "--out", str(out), *extra], *needles)
    assert not out.exists()  # no run.json to poison the folder for the corrected command


def test_sensitivity_allocation_with_blocks_is_refused_by_the_config():
    with pytest.raises(HwpruneError, match="--allocation sensitivity works on channels"):
        FitConfig(budget=Budget("sparsity", 0.5), granularity="blocks", allocation="sensitivity")
    FitConfig(budget=Budget("sparsity", 0.5), granularity="channels", allocation="sensitivity")  # still fine


def test_a_run_that_never_trained_leaves_its_folder_to_the_corrected_command(tmp_path, capsys):
    out = tmp_path / "r"
    # 0.99 of the units cannot be removed: refused in the folder (it needs the model), before any epoch
    assert main(["fit", "--sparsity", "0.99", *FAST, "--seed", "3", "--out", str(out)]) == 2
    assert "Reachable range" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["args"]["sparsity"] == 0.99
    assert not (out / "checkpoint.pt").exists()
    (out / "latency_model.json").write_text("{}")  # a calibration the failed run measured for its settings

    assert main(["fit", "--sparsity", "0.5", *FAST, "--out", str(out)]) == 0
    capsys.readouterr()
    saved = json.loads((out / "run.json").read_text())["args"]
    assert (saved["sparsity"], saved["seed"]) == (0.5, None)  # the run that finished, not the failed one
    assert not (out / "latency_model.json").exists()  # not reused by a run it was not measured for
    # the corrected run trained: now the folder is bound to it
    one_line_error(capsys, ["fit", "--sparsity", "0.6", *FAST, "--out", str(out)], "holds another run", "--sparsity 0.6")



def test_a_finished_run_is_reported_and_left_alone(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["fit", "--sparsity", "0.5", *FAST, "--out", str(out)]) == 0
    capsys.readouterr()
    files = {f: ((out / f).read_bytes(), (out / f).stat().st_mtime_ns) for f in ("report.json", "model.onnx", "run.json")}
    for argv in (["fit", "--resume", str(out)], ["fit", "--sparsity", "0.5", *FAST, "--out", str(out)]):
        assert main(argv) == 0
        printed = capsys.readouterr().out
        assert "this run is finished" in printed and str(out / "report.md") in printed
        assert f"hwprune export {out}" in printed
        assert files == {f: ((out / f).read_bytes(), (out / f).stat().st_mtime_ns) for f in files}


def test_a_run_json_of_the_same_flags_keeps_the_calibration(tmp_path):
    """A run killed before its first epoch and started again with the same flags reuses what it measured."""
    import argparse

    from hwprune.cli.cmd_fit import _SAVED, _write_run_json

    args = argparse.Namespace(**{**dict.fromkeys(_SAVED), "target": "host-cpu", "speedup": 2.0})
    _write_run_json(tmp_path, args, None)
    (tmp_path / "latency_model.json").write_text("{}")
    _write_run_json(tmp_path, args, None)
    assert (tmp_path / "latency_model.json").exists()
    args.speedup = 1.5
    _write_run_json(tmp_path, args, None)
    assert not (tmp_path / "latency_model.json").exists()


def test_a_checkpoint_of_other_settings_names_them_and_the_folder(tmp_path):
    import torch
    from hwprune.data import load_dataset

    digits = load_dataset("digits")
    cfg = FitConfig(budget=Budget("sparsity", 0.5), epochs_dense=1, epochs_regularize=1, epochs_finetune=1)
    torch.manual_seed(0)
    hwprune.fit(tiny_resnet(1, 10, 8), digits.train, test_data=digits.test, target="host-cpu", config=cfg,
                out_dir=tmp_path / "run", progress=None, measure=False)
    other = FitConfig(budget=Budget("sparsity", 0.5), epochs_dense=1, epochs_regularize=1, epochs_finetune=1,
                      allocation="uniform")
    with pytest.raises(CheckpointError) as e:
        hwprune.fit(tiny_resnet(1, 10, 8), digits.train, target="host-cpu", config=other, out_dir=tmp_path / "run",
                    progress=None, measure=False)
    msg = str(e.value)
    assert "allocation the default in the run, 'uniform' now" in msg
    assert f"hwprune fit --resume {tmp_path / 'run'}" in msg and "DIR" not in msg


# SIGTERMs itself right after its first checkpoint (the end of dense epoch 1 of 2).
TERM_AFTER_SAVE = """
import os, signal, sys
from hwprune.training.checkpoint import Checkpointer
from hwprune.cli.main import main
real = Checkpointer.save
def save(self, payload):
    real(self, payload)
    os.kill(os.getpid(), signal.SIGTERM)
Checkpointer.save = save
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_ends_like_ctrl_c_and_the_run_resumes(tmp_path):
    args = ["fit", "--sparsity", "0.5", *FAST, "--out", "run"]
    stopped = subprocess.run([sys.executable, "-c", TERM_AFTER_SAVE, *args], cwd=tmp_path, env=cli_env(),
                             capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert "interrupted. Resume with: hwprune fit --resume run" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    state = Checkpointer(tmp_path / "run").load()
    assert (state["stage"], state["epoch"]) == ("dense", 1)

    args = ["fit", "--resume", "run", "--no-latency"]
    resumed = subprocess.run([sys.executable, "-m", "hwprune", *args], cwd=tmp_path, env=cli_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # the first epoch printed next is epoch 2: the message counts epoch 1 as done
    assert "(resumed in stage 'dense' after epoch 1)" in resumed.stdout
    assert "[dense 1/2]" not in resumed.stdout and "[dense 2/2]" in resumed.stdout


def test_the_default_run_folder_is_one_folder_whatever_the_data_path_or_model_file():
    """`--data imagefolder:./photos` made runs/<stamp>-...-imagefolder:. / photos-...: two nested folders, one
    with a ':' in its name (not a valid file name on Windows, awkward in every shell)."""
    from hwprune.training.config import FitConfig
    from hwprune.training.pipeline import _default_dir

    d = _default_dir(FitConfig(budget=Budget("sparsity", 0.7)),
                     {"model": "./nets/my_net.py:make", "data": "imagefolder:./photos", "target": "host-cpu"})
    assert d.parent.name == "runs" and len(d.parts) == 2
    assert d.name.endswith("-nets-my_net-py-make-imagefolder-photos-host-cpu-sparsity0.7"), d.name
