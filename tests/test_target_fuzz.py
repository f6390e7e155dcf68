"""Hostile target YAML (property-based): every input gives one line naming what is wrong, or a valid
target; never a traceback, never a hang. YAML is loaded with the safe loader: no code runs.

No example has a deadline: how fast the loader is on a loaded machine is not what these tests check.
The alias bombs below expand to up to 3e11 strings: the tests check that they are refused with the
short one-line error naming the key, which only a loader that never walks or prints them in full can
give (one that did would not finish).
"""

import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hwprune.errors import TargetError
from hwprune.target import MAX_TARGET_BYTES, parse_target

GOOD = {
    "name": "t",
    "device": {"name": "board", "arch": "aarch64"},
    "groups": {"conv": {"channels": 8, "blocks": [16, 1]}, "linear": {"neurons": 4}, "attention": {"heads": 1}},
    "runtime": {"onnxruntime": {"providers": ["CPUExecutionProvider"], "threads": 1},
                "tvm": {"target": {"kind": "llvm"}}, "rpc": {"host": "h", "port": 9090}},
    "latency": {"profile": "t", "batch_size": 1},
}

junk = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(string.ascii_letters, max_size=8), inner, max_size=4),
    max_leaves=12,
)


def check(text, source="fuzz.yaml"):
    try:
        parse_target(text, source)
    except TargetError as e:
        msg = str(e)
        assert msg.startswith(source + ": "), msg
        assert "\n" not in msg and len(msg) < 400, msg


def leaf_paths(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from leaf_paths(v, prefix + (k,))
        else:
            yield prefix + (k,)


PATHS = list(leaf_paths(GOOD))
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(junk)
def test_arbitrary_structures(data):
    check(yaml.safe_dump(data))


@FAST
@given(st.sampled_from(PATHS), junk)
def test_one_value_replaced_by_junk(path, value):
    import copy

    d = copy.deepcopy(GOOD)
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    check(yaml.safe_dump(d))


@FAST
@given(st.sampled_from(PATHS), st.text(string.ascii_letters + "_", min_size=1, max_size=10), junk)
def test_unknown_keys_anywhere_are_named(path, key, value):
    import copy

    d = copy.deepcopy(GOOD)
    node = d
    for k in path[:-1]:
        node = node[k]
    if key in node or path[:3] == ("runtime", "tvm", "target"):  # TVM's own open mapping: TVM checks it
        return
    node[key] = value
    try:
        parse_target(yaml.safe_dump(d), "fuzz.yaml")
    except TargetError as e:
        assert f"'{'.'.join(path[:-1] + (key,))}'" in str(e) or "key '" in str(e)
    else:
        raise AssertionError(f"unknown key {key!r} under {path[:-1]} was accepted")


@FAST
@given(st.binary(max_size=300))
def test_raw_bytes_including_non_utf8(data):
    check(data)


def alias_bomb(width, depth):
    """``&l0 [lol, ...]`` nested ``depth`` deep, each level ``width`` aliases of the one below: a few hundred
    bytes that expand to ``width ** depth`` strings (up to 9 ** 12, about 3e11)."""
    text = f"&l0 [{', '.join(['lol'] * width)}]"
    for i in range(1, depth):
        text = f"&l{i} [{', '.join([text] + [f'*l{i - 1}'] * (width - 1))}]"
    return text


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=2, max_value=9), st.integers(min_value=2, max_value=12), st.booleans())
def test_alias_bombs_do_not_hang(width, depth, at_the_top):
    if at_the_top:  # the bomb under an unknown top-level key: refused by name, never walked
        doc, key = f"l: {alias_bomb(width, depth)}\n", "l"
    else:  # the bomb where an integer is expected: shown in a bounded repr
        doc, key = "", "groups.conv.channels"
    doc += (f"name: t\ndevice: {{name: x, arch: x86_64}}\n"
            f"groups: {{conv: {{channels: {'1' if at_the_top else alias_bomb(width, depth)}}}}}\nruntime: {{}}\n")
    with pytest.raises(TargetError, match=f"^fuzz.yaml: key '{key}': "):
        parse_target(doc, "fuzz.yaml")
    check(doc)  # and the refusal is one short line


def test_python_tags_are_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    check(f"!!python/object/apply:os.system ['touch {marker}']")
    assert not marker.exists()


def test_huge_file_is_refused_before_yaml_reads_it(monkeypatch):
    def no_parse(*args, **kwargs):
        raise AssertionError("PyYAML was asked to parse a file over the size limit")

    monkeypatch.setattr(yaml, "safe_load", no_parse)
    for text in ("[" * 200_000, b"[" * 200_000):
        with pytest.raises(TargetError, match=r"^big.yaml: 200000 bytes; a target file is expected to be small \(under 64 KiB\)$"):
            parse_target(text, "big.yaml")


def test_the_size_limit_is_64_kib():
    good = "name: t\ndevice: {name: x, arch: x86_64}\ngroups: {conv: {channels: 8}}\nruntime: {}\n"
    padded = good + "#" * (MAX_TARGET_BYTES - len(good) - 1) + "\n"
    assert MAX_TARGET_BYTES == 64 * 1024 and len(padded) == MAX_TARGET_BYTES
    assert parse_target(padded, "at-limit.yaml").multiple_for("conv") == 8
    with pytest.raises(TargetError, match=f"{MAX_TARGET_BYTES + 1} bytes"):
        parse_target(padded + "\n", "over.yaml")
