"""A new user's own target, end to end: copy a shipped YAML, edit it, list it, profile it, budget with it.

Each test is one defect found by walking through the README as a user whose target file lives outside the
repository, with the error or label the user should see.
"""

import platform
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from hwprune.cli.main import main
from hwprune.errors import ProfileError, RuntimeUnavailable, TargetError
from hwprune.latency.budget import close_the_loop, load_profile
from hwprune.target import find_target, load_target, parse_target

REPO = Path(__file__).resolve().parents[1]


def _my_target(folder: Path, shipped: str, name: str, *edits: tuple[str, str]) -> Path:
    """The README's way to describe one's own board: copy a shipped target and edit it."""
    text = find_target(shipped).read_text().replace(f"name: {shipped}", f"name: {name}")
    text = text.replace(f"profile: {shipped}", f"profile: {name}")
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    path = folder / "my.yaml"
    path.write_text(text)
    return path


def test_a_yaml_that_is_not_a_mapping_names_the_top_level():
    with pytest.raises(TargetError, match=r"scalar.yaml: key '\(top level\)': expected a mapping"):
        parse_target("just a string\n", "scalar.yaml")


def test_a_misspelt_onnxruntime_provider_is_an_error_not_a_silent_fallback():
    pytest.importorskip("onnxruntime")
    text = find_target("host-cpu").read_text().replace("[CPUExecutionProvider]", "[CPUExecutionProvder]")
    with pytest.raises(TargetError, match=r"providers\[0\]': unknown onnxruntime provider 'CPUExecutionProvder'; "
                                          r"did you mean 'CPUExecutionProvider'"):
        parse_target(text, "my.yaml")
    # a provider this onnxruntime does not know at all (a newer one's) is left to the runtime
    parse_target(text.replace("CPUExecutionProvder", "SomeNewNpuProvider"), "my.yaml")


def test_a_board_declared_local_with_another_arch_is_not_this_machine(tmp_path, capsys):
    """A user who copies rpi5.yaml and sets local: true (to make profile stop refusing) must not get this
    x86-64 machine's latency labelled as the board's."""
    other = "x86_64" if platform.machine().lower() in ("aarch64", "arm64") else "aarch64"
    path = _my_target(tmp_path, "rpi5", "myboard", ("local: false", "local: true"), ("arch: aarch64", f"arch: {other}"))
    t = load_target(path)
    assert t.device.local and not t.is_local
    assert main(["targets", str(path)]) == 0
    out = capsys.readouterr().out
    assert "NOT this machine" in out and f"its arch is {other}" in out
    assert main(["profile", "--target", str(path), "--out", str(tmp_path / "p.json")]) == 2
    captured = capsys.readouterr()
    assert "device.local: true', but its arch is" in captured.err and "correct device.arch" in captured.err
    assert "profiling" not in captured.out  # refused before anything is loaded, not after printing it starts
    assert not (tmp_path / "p.json").exists()


def test_hints_name_the_users_target_file_not_its_name(tmp_path, capsys, monkeypatch):
    """`hwprune profile --target myboard` finds nothing: the hint must name the file the user gave."""
    monkeypatch.chdir(tmp_path)
    path = _my_target(tmp_path, "rpi5", "myboard")
    assert main(["targets", str(path)]) == 0
    out = capsys.readouterr().out
    assert "hwprune profile --target my.yaml --rpc HOST:PORT --runtime tvm" in out
    assert "--target myboard" not in out
    t = load_target(path)
    assert t.ref == "my.yaml" and load_target("rpi5").ref == "rpi5"
    with pytest.raises(ProfileError, match=r"has no measured profile yet; measure one: hwprune profile --target "
                                           r"my.yaml --rpc HOST:PORT --runtime tvm"):
        load_profile(t, None, "tvm")


def test_a_missing_profile_path_is_named_as_the_flag_gave_it(tmp_path):
    t = load_target(_my_target(tmp_path, "host-cpu", "mycpu"))
    with pytest.raises(ProfileError, match=r"^--profile .*nope.json: no such file; give a profile measured for "
                                           r"target 'mycpu', or measure one: hwprune profile --target \S*my.yaml "
                                           r"--out \S*nope.json$"):
        load_profile(t, tmp_path / "nope.json", "onnxruntime")
    with pytest.raises(ProfileError, match=r"a folder, not a profile file; .* --out \S*mycpu.json$"):
        load_profile(t, tmp_path, "onnxruntime")


def test_another_targets_profile_says_what_to_do(tmp_path):
    shipped = load_target("host-cpu").profile_path()
    if not shipped.is_file():
        pytest.skip("no shipped host-cpu profile")
    t = load_target(_my_target(tmp_path, "host-cpu", "mycpu"))
    with pytest.raises(ProfileError, match=r"measured for target 'host-cpu', not 'mycpu'; .* Measure this "
                                           r"target's: hwprune profile --target \S*my.yaml --out my-profile.json, "
                                           r"then --profile my-profile.json"):
        load_profile(t, shipped, "onnxruntime")


def test_a_budget_above_the_dense_latency_does_not_grow_without_end():
    """--latency-ms 5 on a 0.15 ms model: every plan is the dense model, measured far under the budget.
    The loop multiplied the budget by ~35 a round (planned at 197783 ms after 4 rounds)."""
    dense = {"conv": np.arange(16)}
    loop = close_the_loop(lambda ms: dense, lambda keep: 0.15, 5.0)
    assert loop["factor"] == 1.0
    assert [r["planned_ms"] for r in loop["rounds"]] == [5.0]
    # a plan that changes as the budget moves is still re-planned as before
    assert [round(r["measured_ms"], 2) for r in close_the_loop(lambda ms: {"ms": ms}, lambda k: 1.2 * k["ms"],
                                                               10.0)["rounds"]] == [12.0, 9.8]


def test_listing_survives_a_broken_target_and_names_the_file_to_use(tmp_path, capsys, monkeypatch):
    team = tmp_path / "team"
    team.mkdir()
    (team / "broken.yaml").write_text("name: broken\nlatncy: {}\n")
    (team / "folder.yaml").mkdir()
    _my_target(team, "rpi5", "myboard")
    monkeypatch.setenv("HWPRUNE_TARGETS", str(team))
    assert main(["targets"]) == 1
    captured = capsys.readouterr()
    assert "host-cpu" in captured.out and "my (name: myboard)" in captured.out
    assert "broken.yaml: key 'latncy': unknown key" in captured.err and "folder" not in captured.err


def _silent_server():
    """A port that accepts TCP connections and never answers (another service, or a half-open firewall)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    held = []

    def accept():
        while True:
            try:
                held.append(sock.accept())
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return sock


def test_an_rpc_server_that_never_answers_times_out():
    pytest.importorskip("tvm")
    from hwprune.runtimes.tvm.rpc import RemoteSpec, RemoteSession, check_reachable

    sock = _silent_server()
    try:
        spec = RemoteSpec("127.0.0.1", sock.getsockname()[1])
        t0 = time.monotonic()
        with pytest.raises(RuntimeUnavailable, match=r"cannot reach the RPC device at 127.0.0.1:\d+: no TVM RPC "
                                                     r"answer within 1 s"):
            check_reachable(spec, connect_timeout_s=1)
        with pytest.raises(RuntimeUnavailable, match="no TVM RPC answer within 1 s"):
            with RemoteSession(spec, connect_timeout_s=1):
                pass
        assert time.monotonic() - t0 < 8
    finally:
        sock.close()


def _closed_port() -> int:
    """A local port nothing listens on (bound, read, closed)."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def test_profile_checks_the_rpc_address_before_compiling(tmp_path, capsys):
    pytest.importorskip("tvm")
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    port = _closed_port()
    path = _my_target(tmp_path, "host-cpu", "mycpu")
    out = tmp_path / "p.json"
    assert main(["profile", "--target", str(path), "--rpc", f"127.0.0.1:{port}", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert f"cannot reach the RPC device at 127.0.0.1:{port}" in captured.err
    assert "compiling" not in captured.out and "profiling" not in captured.out
    assert not out.exists()


def test_a_users_copy_of_a_shipped_target_profiles_beside_its_file_not_over_the_shipped_profile(tmp_path, capsys):
    """The README's way to describe one's own CPU is to copy host-cpu.yaml; a copy that keeps
    `profile: host-cpu` used to have `hwprune profile` overwrite the shipped profiles/host-cpu.json."""
    shipped = load_target("host-cpu").profile_path()
    before = shipped.read_bytes()
    mine = tmp_path / "boards" / "my.yaml"
    mine.parent.mkdir()
    shutil.copy(find_target("host-cpu"), mine)
    t = load_target(mine)
    assert not t.is_shipped and load_target("host-cpu").is_shipped
    assert t.profile_path() == shipped                                   # nothing beside it yet: the shipped one is read
    assert t.profile_path(writing=True) == mine.parent / "host-cpu.json"  # but a new one is written beside the file

    assert main(["profile", "--target", str(mine), "--max-points", "2", "--repeats", "4"]) == 0
    assert f"wrote {mine.parent / 'host-cpu.json'}" in capsys.readouterr().out
    assert shipped.read_bytes() == before                                # the shipped profile is untouched
    assert load_target(mine).profile_path() == mine.parent / "host-cpu.json"  # and the user's own is read from now on


def test_a_target_without_a_profile_key_is_told_how_to_use_the_profile_it_measured(tmp_path, capsys, monkeypatch):
    """A target naming no latency.profile: fit's hint must lead somewhere fit then finds (it used to write
    profiles/<name>.json, which the target still did not name, so fit refused again)."""
    text = find_target("host-cpu").read_text().replace("  profile: host-cpu\n", "").replace("name: host-cpu", "name: bare")
    mine = tmp_path / "bare.yaml"
    mine.write_text(text)
    t = load_target(mine)
    assert t.profile_path() is None
    with pytest.raises(ProfileError, match=r"measure one: hwprune profile --target \S*bare.yaml --out bare.json, then "
                                           r"pass --profile bare.json"):
        load_profile(t, None, "onnxruntime")
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "--target", str(mine), "--max-points", "2", "--repeats", "4"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'bare.json'}" in out                       # beside the user's file, not in profiles/
    assert f"pass --profile {tmp_path / 'bare.json'} to hwprune fit" in out
    assert load_profile(t, tmp_path / "bare.json", "onnxruntime").target == "bare"


def test_fit_checks_the_rpc_address_before_training(tmp_path, capsys):
    """`fit --rpc` to a wrong address used to train the whole run and fail only at the final latency step."""
    pytest.importorskip("tvm")
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    port = _closed_port()
    out = tmp_path / "run"
    assert main(["fit", "--target", "host-cpu", "--sparsity", "0.3", "--rpc", f"127.0.0.1:{port}",
                 "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert f"cannot reach the RPC device at 127.0.0.1:{port}" in captured.err
    assert "epoch" not in captured.out                      # nothing was trained
    assert not list(out.glob("checkpoint*"))
