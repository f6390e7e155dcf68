"""Hostile target YAML (property-based): every input gives one line naming what is wrong, or a valid
target; never a traceback, never a hang. YAML is loaded with the safe loader: no code runs."""

import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hwprune.errors import TargetError
from hwprune.target import parse_target

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
FAST = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


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


@settings(max_examples=30, deadline=3000)
@given(st.integers(min_value=2, max_value=9), st.integers(min_value=2, max_value=12))
def test_alias_bombs_do_not_hang(width, depth):
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, depth):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    doc = "\n".join(lines) + f"\nname: t\ndevice: {{name: x, arch: x86_64}}\ngroups: {{conv: {{channels: *l{depth - 1}}}}}\nruntime: {{}}\n"
    check(doc)


def test_python_tags_are_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    check(f"!!python/object/apply:os.system ['touch {marker}']")
    assert not marker.exists()


def test_huge_file_is_refused_quickly():
    check("[" * 200_000)
