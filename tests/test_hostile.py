"""Careless and hostile input (issue 15): every case is one clear line naming what is wrong, before any
training, and a refused command changes nothing on disk.

Each test names the case of the issue it pins. The expected message is the one a user needs (the flag or
file, and what to do), not a copy of the implementation's wording elsewhere.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from hwprune.cli.main import main
from hwprune.errors import CheckpointError, TargetError
from hwprune.target import load_target, parse_target
from hwprune.training.checkpoint import Checkpointer

from conftest import cli_env, one_line_error
from helpers_models import channel_run_folder

HOST = Path(__file__).resolve().parents[1] / "targets" / "host-cpu.yaml"
FAST = ["--target", "host-cpu", "--sparsity", "0.5", "--quiet", "--no-latency"]


# --- 1. duplicate YAML keys -------------------------------------------------------------------------

@pytest.mark.parametrize("extra, key", [
    ("groups: {conv: {channels: 4}}\n", "groups"),  # the issue's command: a second top-level groups
    ("name: other\n", "name"),
])
def test_a_duplicate_top_level_key_is_refused(tmp_path, extra, key):
    path = tmp_path / "dup.yaml"
    path.write_text(HOST.read_text() + extra)
    with pytest.raises(TargetError, match=f"dup.yaml: key '{key}' appears twice"):
        load_target(path)


def test_a_duplicate_nested_key_is_refused():
    text = ("name: t\ndevice: {name: cpu, arch: x86_64, local: true, local: false}\n"
            "groups: {conv: {channels: 8}}\nruntime: {}\n")
    with pytest.raises(TargetError, match="key 'local' appears twice"):
        parse_target(text, "t.yaml")


def test_a_folder_given_as_target_is_named_as_a_folder(tmp_path):
    with pytest.raises(TargetError, match="is a folder"):
        load_target(tmp_path)


# --- 2, 8, 9: values no run can use are refused before anything is loaded or written ----------------

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(["--batch-size", "--latency-batch-size", "--latency-repeats", "--seed", "--workers",
                             "--image-size"]),
       value=st.integers(min_value=-10**6, max_value=-1))
def test_negative_counts_are_refused_before_any_work(tmp_path_factory, capsys, flag, value):
    out = tmp_path_factory.mktemp("neg") / "run"
    one_line_error(capsys, ["fit", *FAST, flag, str(value), "--out", str(out)], flag, "expected a whole number")
    assert not out.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--epochs", "-1", "0", "0"], "--epochs -1 0 0: expected three whole numbers >= 0"),
    (["--batch-size", "0"], "--batch-size 0: expected a whole number >= 1"),
    (["--latency-repeats", "0"], "--latency-repeats 0: expected a whole number >= 1"),
    (["--lr", "-1"], "--lr -1.0: expected a positive learning rate"),
    (["--lr", "nan"], "--lr nan: expected a positive learning rate"),
    (["--finetune-lr-scale", "0"], "--finetune-lr-scale 0.0: expected a fraction of --lr"),
    (["--finetune-lr-scale", "inf"], "--finetune-lr-scale inf: expected a fraction of --lr"),
])
def test_the_issues_bad_numbers_are_one_line(tmp_path, capsys, argv, needle):
    one_line_error(capsys, ["fit", *FAST, *argv, "--out", str(tmp_path / "r")], needle)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("value", ["inf", "nan", "0.5"])
def test_speedup_errors_name_the_speedup_flag(tmp_path, capsys, value):
    err = one_line_error(capsys, ["fit", "--target", "host-cpu", "--speedup", value, "--out", str(tmp_path / "r")],
                          f"--speedup {value if value != 'inf' else 'inf'}", "expected a factor of at least 1")
    assert "--latency-ms" not in err


# --- 5, 7: resume keeps its settings; a refused fit changes nothing ----------------------------------

def _saved_run(folder: Path, **args):
    folder.mkdir(parents=True)
    saved = {"args": {"target": "host-cpu", "sparsity": 0.7, "seed": None, **args}, "command": None}
    (folder / "run.json").write_text(json.dumps(saved))
    return (folder / "run.json").read_bytes()


def test_resume_with_another_seed_is_refused(tmp_path, capsys):
    _saved_run(tmp_path / "r")
    one_line_error(capsys, ["fit", "--resume", str(tmp_path / "r"), "--seed", "7"], "--seed 7 differs")


def test_a_refused_fit_leaves_the_folder_as_it_was(tmp_path, capsys):
    before = _saved_run(tmp_path / "r")
    # a run that trained an epoch binds its folder (one that never did is replaced: test_fit_rerun.py)
    Checkpointer(tmp_path / "r").save({"stage": "dense", "epoch": 1})
    listing = sorted(os.listdir(tmp_path / "r"))
    one_line_error(capsys, ["fit", "--target", "host-cpu", "--sparsity", "0.5", "--quiet", "--out", str(tmp_path / "r")],
                    "holds another run", "--sparsity 0.5 differs", f"--resume {tmp_path / 'r'}")
    assert (tmp_path / "r" / "run.json").read_bytes() == before
    assert sorted(os.listdir(tmp_path / "r")) == listing


# --- 10: a broken run.json on --resume -------------------------------------------------------------

@pytest.mark.parametrize("content", [b"{", b"", b"[]", b"{}", b"\xff\xfe\x00binary", b'{"args": 3}'])
def test_a_broken_run_json_is_one_line(tmp_path, capsys, content):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "run.json").write_bytes(content)
    one_line_error(capsys, ["fit", "--resume", str(tmp_path / "r")], "run.json", "start a new run")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_any_garbage_run_json_is_one_line(tmp_path_factory, capsys, content):
    folder = tmp_path_factory.mktemp("garbage")
    (folder / "run.json").write_bytes(content)
    code = main(["fit", "--resume", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0 and "Traceback" not in err


# --- 11: where the output cannot go -----------------------------------------------------------------

def test_out_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    f = tmp_path / "README.md"
    f.write_text("the user's file")
    one_line_error(capsys, ["fit", *FAST, "--out", str(f)], "that is a file, not a folder")
    assert f.read_text() == "the user's file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the check needs a plain user")
def test_out_in_a_read_only_folder_is_refused_before_training(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        one_line_error(capsys, ["fit", *FAST, "--out", str(ro / "run")], "cannot write there")
    finally:
        ro.chmod(0o755)


# --- 4: a flipped bit in a checkpoint is detected ----------------------------------------------------

def test_a_flipped_bit_in_a_checkpoint_is_detected(tmp_path, capsys):
    ck = Checkpointer(tmp_path)
    marker = torch.arange(4096, dtype=torch.float32) + 0.5  # bytes that occur once in the file
    ck.save({"stage": "dense", "epoch": 1, "model": {"w": marker}})
    ck.save({"stage": "dense", "epoch": 2, "model": {"w": marker * 2}})
    raw = bytearray(ck.path.read_bytes())
    at = bytes(raw).find((marker * 2).numpy().tobytes())
    assert at > 0
    raw[at + 1000] ^= 0x01  # one bit of one weight, as a bad disk would
    ck.path.write_bytes(bytes(raw))
    # torch itself loads it without a word (its zip reader does not check CRCs) ...
    flipped = torch.load(ck.path, weights_only=True)["model"]["w"]
    assert not torch.equal(flipped, marker * 2)
    # ... the checkpointer does not: it reports the corruption and resumes from the previous one
    assert ck.load()["epoch"] == 1
    assert "does not match the checksum" in capsys.readouterr().err
    ck.prev.unlink()
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        ck.load()


# --- 6: two fits into one folder ---------------------------------------------------------------------

def test_a_second_fit_into_a_folder_in_use_is_refused(tmp_path, capsys):
    folder = tmp_path / "r"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from hwprune.io import folder_lock\n"
         f"with folder_lock({str(folder)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env=cli_env())
    try:
        assert holder.stdout.readline().strip() == "held"  # a deterministic point: the lock is taken
        one_line_error(capsys, ["fit", *FAST, "--out", str(folder)], "is in use by hwprune fit (pid", "another --out")
        assert not (folder / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()


# --- 12: a broken or malicious pruned.pt given to export ---------------------------------------------

class _RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "code"])
def test_a_bad_weights_file_is_one_line_on_export(tmp_path, capsys, kind):
    model = channel_run_folder(tmp_path)
    weights = tmp_path / "pruned.pt"
    if kind == "garbage":
        weights.write_bytes(b"not a torch file")
    elif kind == "truncated":
        torch.save({"state_dict": model.state_dict()}, weights)
        weights.write_bytes(weights.read_bytes()[:300])
    else:
        torch.save({"state_dict": _RunsCode()}, weights)
    one_line_error(capsys, ["export", str(tmp_path), "--format", "onnx", "--no-check"], "pruned.pt",
                    "not a readable hwprune weights file")


# --- 13: a closed pipe ---------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["env", "targets host-cpu"])
def test_output_into_a_closed_pipe_is_not_a_traceback(command):
    r = subprocess.run(f"{sys.executable} -m hwprune {command} | head -c 1 >/dev/null", shell=True,
                       capture_output=True, text=True, env=cli_env(), timeout=120)
    assert "Traceback" not in r.stderr and "BrokenPipeError" not in r.stderr, r.stderr


def test_an_interrupted_export_never_looks_complete(tmp_path, monkeypatch):
    """An interrupted re-export leaves the earlier export whole: it is written aside and moved in last,
    manifest.json last of all."""
    import hwprune.export.artifacts as artifacts

    channel_run_folder(tmp_path)
    artifacts.export_run(tmp_path, "onnx", check=False)
    manifest = tmp_path / "export" / "onnx" / "manifest.json"
    assert manifest.is_file()

    def files():
        return {f.name: f.read_bytes() for f in manifest.parent.iterdir() if f.is_file() and f.name != ".hwprune.lock"}

    before = files()

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts, "_save_reference", killed)
    with pytest.raises(KeyboardInterrupt):
        artifacts.export_run(tmp_path, "onnx", check=False)
    assert files() == before and not list(manifest.parent.glob(".hwprune-export-*"))


def test_profile_and_export_refuse_an_unwritable_out_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    one_line_error(capsys, ["profile", "--target", "host-cpu", "--out", str(blocker / "p.json")],
                    "that is a file, not a folder")
    channel_run_folder(tmp_path)
    one_line_error(capsys, ["export", str(tmp_path), "--format", "onnx", "--out", str(blocker)],
                    "that is a file, not a folder")
    assert not (tmp_path / "export").exists()


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    import hwprune.cli.cmd_fit as cmd_fit

    def full(path, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(cmd_fit, "atomic_write_json", full)
    one_line_error(capsys, ["fit", *FAST, "--out", str(tmp_path / "r")], "run.json: No space left on device",
                    "free space")


@settings(max_examples=30, deadline=None)
@given(key=st.sampled_from(["name", "device", "groups", "runtime"]),
       nested=st.booleans())
def test_any_key_written_twice_is_named(key, nested):
    """Top-level keys, or a key inside device (local flips where latency is measured): never the last one silently."""
    base = "name: t\ndevice: {name: cpu, arch: x86_64, local: true}\ngroups: {conv: {channels: 8}}\nruntime: {}\n"
    if nested:
        text, dup = base.replace("local: true}", "local: true, local: false}"), "local"
    else:
        text, dup = base + f"{key}: x\n", key
    with pytest.raises(TargetError, match=f"key '{dup}' appears twice"):
        parse_target(text, "t.yaml")


def test_finetune_lr_scale_reaches_the_run_and_its_saved_flags(tmp_path, capsys):
    """--finetune-lr-scale sets the fine-tune's peak learning rate; the run's config and run.json keep it
    (a resume uses it again)."""
    import json

    from hwprune.cli.main import main

    out = tmp_path / "run"
    assert main(["fit", *FAST, "--epochs", "0", "0", "1", "--finetune-lr-scale", "1", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["args"]["finetune_lr_scale"] == 1.0
    assert json.loads((out / "report.json").read_text())["run"]["config"]["finetune_lr_scale"] == 1.0
