"""Remote devices: a real TVM RPC server and tracker on 127.0.0.1; aarch64 cross builds.

The loopback server is this machine, so what these tests show is the whole compile - upload - time
path working, with the labels naming the RPC device; they say nothing about a real board.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tvm")
pytest.importorskip("tornado")  # the tracker needs it

from hwprune.cli.main import main
from hwprune.errors import HwpruneError, RuntimeUnavailable
from hwprune.runtimes.tvm.timing import measure_tvm_latency
from hwprune.models import build_model
from hwprune.latency.profile import Profile
from hwprune.runtimes.tvm.rpc import RemoteSession, RemoteSpec, parse_endpoint, resolve_remote
from hwprune.target import load_target
from hwprune.runtimes.tvm.build import elf_machine
from hwprune.runtimes.tvm.dense import build_dense

from conftest import cli_env

KEY = "hwprune-loopback"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, log):
    env = cli_env()
    env["TVM_NUM_THREADS"] = "1"
    # its own process group: the server forks a worker, and both must go at the end
    return subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def _stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def _wait_for(log_path, needle, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in log_path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"server did not log {needle!r}:\n{log_path.read_text(errors='replace')[-2000:]}")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A plain RPC server, a tracker, and a second server registered with it under KEY, all started at
    once (each spends seconds importing TVM)."""
    d = tmp_path_factory.mktemp("rpc")
    port, tport, sport = _free_port(), _free_port(), _free_port()
    procs = []
    try:
        for name, args in (
            ("server", ["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port), "--port-end", str(port + 1)]),
            ("tracker", ["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tport), "--port-end", str(tport + 1)]),
            ("tracked", ["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(sport), "--port-end",
                         str(sport + 1), "--tracker", f"127.0.0.1:{tport}", "--key", KEY]),
        ):
            with open(d / f"{name}.log", "w") as log:
                procs.append(_start(args, log))
        _wait_for(d / "server.log", f"bind to 127.0.0.1:{port}", procs[0])
        from tvm import rpc

        deadline = time.monotonic() + 90
        while True:  # the tracked server retries until the tracker is up, then registers its key
            try:
                if KEY in json.dumps(rpc.connect_tracker("127.0.0.1", tport).summary()):
                    break
            except Exception:  # the tracker is still starting
                pass
            assert time.monotonic() < deadline, (d / "tracked.log").read_text()[-2000:]
            time.sleep(0.3)
        yield RemoteSpec("127.0.0.1", port), RemoteSpec("127.0.0.1", tport, KEY, tracker=True)
    finally:
        for p in procs:
            _stop(p)


@pytest.fixture(scope="module")
def rpc_server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def tracker(servers):
    return servers[1]


def _tiny():
    torch.manual_seed(0)
    return build_model("small-resnet", in_channels=1, num_classes=10, input_size=8, width=0.2).eval()


def _run_remote(spec, lib, x):
    # remote handles (the VM, tensors) must not outlive the session: the server serves one at a time
    with RemoteSession(spec) as sess:
        vm = sess.load_vm(lib)
        return vm["main"](sess.tensor(x)).numpy()


def test_model_runs_and_is_timed_on_the_rpc_server(rpc_server, tmp_path):
    model = _tiny()
    x = torch.randn(1, 1, 8, 8)
    lib = build_dense(model, x, "host-cpu").export(tmp_path / "m.so")
    assert np.abs(_run_remote(rpc_server, lib, x.numpy()) - model(x).detach().numpy()).max() < 1e-4
    res = measure_tvm_latency({"dense": model, "half": build_model("small-resnet", in_channels=1, num_classes=10,
                                                                   input_size=8, width=0.1).eval()},
                              x, load_target("host-cpu"), remote=rpc_server, warmup=2, repeats=10)
    assert res.measured_on == f"RPC device at 127.0.0.1:{rpc_server.port}" and res.on_target
    assert "hand schedule" in res.runtime and set(res.stats) == {"dense", "half"}
    assert res.stats["dense"].runs == res.stats["half"].runs == 10


def test_tvm_latency_is_timed_in_rounds_and_the_middle_round_is_kept():
    """As with onnxruntime (tests/test_export.py): 60 timed calls are three rounds of 20 and the stats are
    the round whose ratio is the median of the three listed; under 60, one round."""
    x = torch.zeros(1, 1, 8, 8)
    models = {"dense": nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU()).eval(),
              "pruned": nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU()).eval()}
    res = measure_tvm_latency(models, x, load_target("host-cpu"), warmup=2, repeats=60)
    assert len(res.round_ratios) == 3 and res.stats["dense"].runs == res.stats["pruned"].runs == 20
    ratios = sorted(r["pruned"] for r in res.round_ratios)
    assert res.stats["pruned"].median_ms / res.stats["dense"].median_ms == pytest.approx(ratios[1])
    res = measure_tvm_latency(models, x, load_target("host-cpu"), warmup=2, repeats=10)
    assert len(res.round_ratios) == 1 and res.stats["dense"].runs == 10


def test_tracker_hands_out_the_device_by_key(tracker):
    model = _tiny()
    res = measure_tvm_latency({"m": model}, torch.zeros(1, 1, 8, 8), load_target("host-cpu"), remote=tracker,
                              warmup=1, repeats=5)
    assert res.measured_on == f"RPC device '{KEY}' (from the tracker at 127.0.0.1:{tracker.port})"
    with pytest.raises(RuntimeUnavailable, match=f"no device with key 'nope'.*{KEY}"):
        RemoteSession(RemoteSpec(tracker.host, tracker.port, "nope", tracker=True)).__enter__()


def test_profile_over_rpc_says_where_it_was_measured(rpc_server, tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = main(["profile", "--target", "host-cpu", "--rpc", f"127.0.0.1:{rpc_server.port}", "--out", str(out),
               "--max-points", "2", "--repeats", "4"])
    assert rc == 0, capsys.readouterr().err
    prof = Profile.load(out)
    assert prof.runtime["name"] == "tvm" and "hand schedule" in prof.runtime["schedule"]
    assert prof.measured_on == f"RPC device at 127.0.0.1:{rpc_server.port}" and prof.on_target_device
    assert prof.machine["remote"] == prof.measured_on
    # the tables of the default model (small-resnet) at the grid asked for (--max-points 2; one extra: the
    # stem's 1-channel input)
    assert {t.op for t in prof.layers.values()} == {"conv2d", "linear"} and "linear" in prof.layers
    assert all(u.startswith("small-resnet:") for t in prof.layers.values() for u in t.used_by)
    assert all(len(g) <= 2 + 1 for t in prof.layers.values() for g in t.grid)


def test_unreachable_server_is_one_line():
    port = _free_port()  # nothing listens there
    with pytest.raises(RuntimeUnavailable, match=f"cannot reach the RPC device at 127.0.0.1:{port}.*rpc_server"):
        RemoteSession(RemoteSpec("127.0.0.1", port)).__enter__()


def test_endpoints_and_flags_are_checked():
    assert parse_endpoint("[::1]:9090", "--rpc") == ("::1", 9090)
    for bad in ("9090", "host:", "host:port", "h:70000"):
        with pytest.raises(HwpruneError, match="--rpc"):
            parse_endpoint(bad, "--rpc")
    t = load_target("rpi5")
    assert resolve_remote(t) is None
    with pytest.raises(HwpruneError, match="--key"):
        resolve_remote(t, tracker="h:1")
    with pytest.raises(HwpruneError, match="not both"):
        resolve_remote(t, rpc="h:1", tracker="h:2", key="k")
    assert resolve_remote(t, tracker="h:1", key="rpi").describe() == "RPC device 'rpi' (from the tracker at h:1)"


def test_no_profile_for_a_board_that_was_not_measured(tmp_path, capsys):
    out = tmp_path / "jetson.json"
    assert main(["profile", "--target", "jetson", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not this machine" in err and "--rpc" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


needs_cross = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None,
                                 reason="needs Debian's gcc-aarch64-linux-gnu (apt-get install gcc-aarch64-linux-gnu)")


@needs_cross
@pytest.mark.parametrize("target", ["jetson", "rpi5"])
def test_arm_targets_cross_compile_to_an_aarch64_library(target, tmp_path):
    build = build_dense(_tiny(), torch.zeros(1, 1, 8, 8), target)
    lib = build.export(tmp_path / "m.so")
    assert elf_machine(lib) == "aarch64"
    assert lib.read_bytes()[:4] == b"\x7fELF" and lib.read_bytes()[4] == 2  # 64-bit
    assert not build.runs_here and "NCHW4c" in build.label  # NEON: 4 fp32 lanes


@needs_cross
def test_a_channel_run_exports_an_aarch64_library_for_an_arm_target(tmp_path, monkeypatch):
    """Without the aarch64 emulation (tests/test_emulation.py runs it with) the library is written and said
    to be unchecked, with how to set the emulation up."""
    from hwprune.export.artifacts import export_run
    from helpers_models import channel_run_folder

    monkeypatch.setenv("HWPRUNE_ARM64_ROOT", str(tmp_path / "no-root"))
    channel_run_folder(tmp_path)
    result = export_run(tmp_path, "tvm", target="jetson")
    lib = tmp_path / "export" / "tvm" / "model.so"
    assert elf_machine(lib) == "aarch64"
    assert result.manifest["format"] == "hwprune-tvm-dense" and result.check is None
    assert any("not loadable on this machine" in n and "make_arm64_root.sh" in n for n in result.notes)


@needs_cross
def test_an_aarch64_library_is_refused_here_and_by_an_x86_server(rpc_server):
    model = _tiny()
    with pytest.raises(RuntimeUnavailable, match="--rpc"):
        measure_tvm_latency({"m": model}, torch.zeros(1, 1, 8, 8), load_target("jetson"), repeats=2)
    with pytest.raises(RuntimeUnavailable, match="cannot load"):
        measure_tvm_latency({"m": model}, torch.zeros(1, 1, 8, 8), load_target("jetson"), remote=rpc_server, repeats=2)
