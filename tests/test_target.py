"""Target YAML: the shipped targets load, and every mistake is one clear error naming file and key."""

import os

import pytest

from hwprune.errors import TargetError
from hwprune.target import (BlockShape, ChannelShape, HeadShape, find_target, list_targets, load_target,
                            parse_target)

GOOD = """
name: t
device: {name: my board, arch: aarch64}
groups:
  conv: {channels: 8, blocks: [16, 1]}
  linear: {neurons: 4}
  attention: {heads: 2}
runtime:
  onnxruntime: {providers: [CPUExecutionProvider], threads: 2}
  tvm: {target: {kind: llvm, mtriple: aarch64-linux-gnu}}
  rpc: {host: 10.0.0.2, port: 9090}
latency: {profile: t, batch_size: 4}
"""


def test_shipped_targets_load():
    names = list_targets()
    assert {"host-cpu", "jetson", "rpi5"} <= set(names)
    for name in names:
        t = load_target(name)
        assert t.groups and t.onnxruntime.providers
    host = load_target("host-cpu")
    assert host.is_local and host.multiple_for("conv") == 8
    jetson = load_target("jetson.yaml")
    assert not jetson.is_local and jetson.shape_for("linear", "blocks") == BlockShape(16, 16)
    assert jetson.tvm.target["mtriple"] == "aarch64-linux-gnu"


def test_full_schema_round_trip():
    t = parse_target(GOOD, "good.yaml")
    assert t.groups["conv"] == (ChannelShape(8), BlockShape(16, 1))
    assert t.groups["attention"] == (HeadShape(2),)
    assert t.multiple_for("linear") == 4 and t.multiple_for("attention") == 2
    assert t.group_multiple({"conv", "linear"}) == 8
    assert t.rpc.host == "10.0.0.2" and t.rpc.port == 9090
    assert t.latency.batch_size == 4 and t.onnxruntime.threads == 2


def test_bare_name_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_target("jetson.yaml").name == "jetson.yaml"
    assert find_target("targets/host-cpu.yaml").name == "host-cpu.yaml"
    assert load_target("rpi5").name == "rpi5"


@pytest.mark.parametrize("ref", ["missing/jetson.yaml", "a/rpi5.yaml", "../rpi5.yaml", "./host-cpu.yaml",
                                 "a/b/rpi5.yaml", "boards/jetson"])
def test_missing_path_is_not_replaced_by_a_shipped_target(tmp_path, monkeypatch, ref):
    # A path with a folder (other than the literal "targets/") names the user's own file: if it is
    # missing, that is an error, never the shipped target that shares its file name.
    monkeypatch.chdir(tmp_path)  # pytest's fresh folder: none of these paths exist, nor does ../rpi5.yaml
    with pytest.raises(TargetError) as e:
        find_target(ref)
    msg = str(e.value)
    assert f"'{ref}' not found" in msg and "bare name" in msg and "host-cpu, jetson, rpi5" in msg


def test_local_path_wins_over_shipped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jetson.yaml").write_text(GOOD)
    assert load_target("jetson.yaml").name == "t"


@pytest.mark.parametrize(
    "change, key, expected",
    [
        (("conv: {channels: 8, blocks: [16, 1]}", "conv: {channels: 0}"), "groups.conv.channels", "integer in [1, 4096]"),
        (("conv: {channels: 8, blocks: [16, 1]}", "conv: {channels: eight}"), "groups.conv.channels", "integer"),
        (("conv: {channels: 8, blocks: [16, 1]}", "conv: {blocks: [16, -1]}"), "groups.conv.blocks", "[1, 4096]"),
        (("conv: {channels: 8, blocks: [16, 1]}", "conv: {blocks: [16, 1, 1]}"), "groups.conv.blocks", "[rows, cols]"),
        (("conv: {channels: 8, blocks: [16, 1]}", "conv: {blocks: 16}"), "groups.conv.blocks", "[rows, cols]"),
        (("conv: {channels: 8, blocks: [16, 1]}", "conv: {filters: 8}"), "groups.conv.filters", "valid keys here: blocks, channels"),
        (("conv: {channels: 8, blocks: [16, 1]}", "conv: {channels: 99999999999999999999}"), "groups.conv.channels", "[1, 4096]"),
        (("conv: {channels: 8, blocks: [16, 1]}", "conv: {}"), "groups.conv", "declares no shape"),
        (("attention: {heads: 2}", "attention: {heads: true}"), "groups.attention.heads", "integer"),
        (("linear: {neurons: 4}", "mlp: {neurons: 4}"), "groups.mlp", "unknown key"),
        (("arch: aarch64", "arch: arm64"), "device.arch", "one of"),
        (("threads: 2", "threads: -1"), "runtime.onnxruntime.threads", "[0, 1024]"),
        (("providers: [CPUExecutionProvider]", "providers: CPUExecutionProvider"), "runtime.onnxruntime.providers", "list"),
        (("port: 9090", "port: 70000"), "runtime.rpc.port", "[1, 65535]"),
        (("port: 9090}", "port: 9090, tracker: true}"), "runtime.rpc.key", "tracker needs a device key"),
        (("tvm: {target: {kind: llvm, mtriple: aarch64-linux-gnu}}", "tvm: {target: 'llvm -mcpu=x'}"), "runtime.tvm.target", "mapping"),
        (("batch_size: 4", "batch_size: 0"), "latency.batch_size", "[1, 65536]"),
        (("name: t", "name: 't x'"), "name", "letters, digits"),
        (("name: t\n", "name: t\ncolour: red\n"), "colour", "unknown key"),
    ],
)
def test_bad_values_name_file_and_key(change, key, expected):
    old, new = change
    assert old in GOOD
    with pytest.raises(TargetError) as e:
        parse_target(GOOD.replace(old, new), "board.yaml")
    msg = str(e.value)
    assert msg.startswith("board.yaml: key '" + key + "'"), msg
    assert expected in msg
    assert "\n" not in msg


def test_missing_required_key_and_typo_hint():
    without_groups = GOOD.split("groups:")[0] + "runtime:" + GOOD.split("runtime:")[1]
    with pytest.raises(TargetError, match=r"board.yaml: key 'groups': missing required key"):
        parse_target(without_groups, "board.yaml")
    with pytest.raises(TargetError, match=r"key 'grupos': unknown key; did you mean 'groups'\?"):
        parse_target(GOOD.replace("groups:", "grupos:"), "board.yaml")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "the file is empty"),
        ("name: [unclosed", "invalid YAML at line 1"),
        ("- a\n- b\n", "expected a mapping"),
        (b"name: \xff\xfe\n", "not UTF-8"),
        ("a: &x [*x]\n", "key"),
        ("!!python/object/apply:os.system ['echo hacked']", "invalid YAML"),
    ],
)
def test_malformed_files(text, expected):
    with pytest.raises(TargetError) as e:
        parse_target(text, "bad.yaml")
    assert str(e.value).startswith("bad.yaml: ")
    assert expected in str(e.value)


def test_unknown_target_lists_shipped_ones():
    with pytest.raises(TargetError) as e:
        load_target("no-such-board")
    assert "host-cpu" in str(e.value) and "jetson" in str(e.value)


def test_unreadable_file(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text(GOOD)
    os.chmod(p, 0)
    if os.access(p, os.R_OK):  # root can read anything
        pytest.skip("running as root: permissions are not enforced")
    with pytest.raises(TargetError, match="cannot read"):
        load_target(p)


def test_profile_path_resolution(tmp_path):
    t = load_target("host-cpu")
    assert t.profile_path().name == "host-cpu.json"
    (tmp_path / "p.yaml").write_text(GOOD.replace("profile: t", "profile: profiles/mine.json"))
    assert load_target(tmp_path / "p.yaml").profile_path() == tmp_path / "profiles" / "mine.json"


def test_cli_show_names_the_profile_machine_and_counts_threads(tmp_path, monkeypatch, capsys):
    import json

    from hwprune.cli.main import main
    from hwprune.target.files import REPO_ROOT

    # host-cpu's profile, as if copied from another machine: its stored "this machine: ..." is that one
    prof = json.loads((REPO_ROOT / "profiles" / "host-cpu.json").read_text())
    prof["machine"]["cpu"] = "Some Other CPU 9000"
    prof["measured_on"] = "this machine: Some Other CPU 9000 (x86_64, 2 cores), vm"
    (tmp_path / "host-cpu.json").write_text(json.dumps(prof))
    monkeypatch.setenv("HWPRUNE_PROFILES", str(tmp_path))
    assert main(["targets", "host-cpu"]) == 0
    out = capsys.readouterr().out
    assert "(measured on Some Other CPU 9000 (x86_64, 2 cores), vm, not this machine (this one: " in out, out
    assert "this machine: Some Other" not in out
    assert "['CPUExecutionProvider'], 1 thread;" in out  # host-cpu.yaml: threads: 1
