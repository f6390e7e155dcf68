"""Latency profiles: measured, written, loaded and checked; every malformed file is one clear error."""

import copy
import json

import numpy as np
import pytest
import torch

from hwprune.cli.main import main
from hwprune.errors import ProfileError
from hwprune.graph import discover_groups
from hwprune.latency.shapes import layer_uses
from hwprune.models import build_model
from hwprune.latency.profile import Profile
from hwprune.latency.measure import ProfileSettings, measure_profile, subsample
from hwprune.target import load_target

FAST = ProfileSettings(max_points=3, repeats=6, rounds=2, warmup=1)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    torch.manual_seed(0)
    net = build_model("small-resnet", in_channels=1, num_classes=10, input_size=8, width=0.3).eval()
    x = torch.zeros(1, 1, 8, 8)
    prof = measure_profile([(net, x, "small-resnet", "digits")], load_target("host-cpu"), settings=FAST, progress=None)
    path = prof.save(tmp_path_factory.mktemp("prof") / "host-cpu.json")
    return net, x, prof, path


def test_profile_covers_every_layer_of_the_model(measured):
    net, x, prof, _ = measured
    uses, _, _ = layer_uses(net, x, discover_groups(net, x, target=load_target("host-cpu")))
    assert {u.key for u in uses} == set(prof.layers)
    for u in uses:
        t = prof.layers[u.key]
        assert t.covers(*(g[0] for g in u.grids)) and t.covers(*(g[-1] for g in u.grids))
        assert f"small-resnet:{u.name}" in t.used_by
        assert all(len(g) <= FAST.max_points + 1 for g in t.grid)  # one extra: the 1-channel stem input
    assert prof.runtime["name"] == "onnxruntime" and prof.on_target_device
    assert prof.machine["hostname"] and prof.machine["arch"] and prof.libraries["onnxruntime"]
    assert prof.batch_size == 1 and prof.created[:2] == "20"


def test_round_trip_through_the_file(measured):
    _, _, prof, path = measured
    loaded = Profile.load(path)
    assert loaded.to_dict() == json.loads(path.read_text())
    assert loaded.to_dict()["layers"] == prof.to_dict()["layers"]
    t = next(iter(loaded.layers.values()))
    idx = tuple(len(g) - 1 for g in t.grid)
    assert t.predict(*(g[-1] for g in t.grid)) == pytest.approx(t.ms[idx])


def _mutate(path, tmp_path, fn):
    data = json.loads(path.read_text())
    fn(data)
    out = tmp_path / "bad.json"
    out.write_text(json.dumps(data))
    return out


BAD = {
    "format": (lambda d: d.update(format="something-else"), "key 'format'"),
    "version": (lambda d: d.update(version=99), "key 'version'"),
    "missing layers": (lambda d: d.pop("layers"), "key 'layers': missing required key"),
    "op": (lambda d: d["layers"][0].update(op="pool"), "key 'layers[0].op'"),
    "axes": (lambda d: d["layers"][0].update(axes=["x"]), "key 'layers[0].axes'"),
    "grid order": (lambda d: d["layers"][0]["grid"][-1].reverse(), "key 'layers[0].grid[1]'"),
    "ms shape": (lambda d: d["layers"][0].update(ms=[[1.0]]), "key 'layers[0].ms'"),
    "ms negative": (lambda d: d["layers"][0]["ms"][0].__setitem__(0, -1.0), "key 'layers[0].ms'"),
    "overhead": (lambda d: d.update(call_overhead_ms="fast"), "key 'call_overhead_ms'"),
    "batch": (lambda d: d.update(batch_size=0), "key 'batch_size'"),
    "duplicate": (lambda d: d["layers"].append(d["layers"][0]), "unique keys"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_profile_is_one_clear_error(measured, tmp_path, case):
    fn, expected = BAD[case]
    bad = _mutate(measured[3], tmp_path, fn)
    with pytest.raises(ProfileError) as e:
        Profile.load(bad)
    msg = str(e.value)
    assert str(bad) in msg and expected in msg and "\n" not in msg


def test_unreadable_files(tmp_path):
    with pytest.raises(ProfileError, match="no such profile.*hwprune profile"):
        Profile.load(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON.*line 1"):
        Profile.load(tmp_path / "x.json")


@pytest.mark.parametrize("n, most", [(20, 5), (20, 2), (10, 4), (7, 6), (3, 3), (2, 8)])
def test_subsample_keeps_both_ends_and_at_most_the_count_asked(n, most):
    values = list(range(8, 8 * n + 1, 8))
    got = subsample(reversed(values + values[:2]), most)  # any order, duplicates: a sorted set comes back
    assert got[0] == values[0] and got[-1] == values[-1]
    assert len(got) == min(n, most) and got == sorted(set(got)) and set(got) <= set(values)


@pytest.mark.parametrize("n, most", [(20, 5), (10, 4), (100, 7)])
def test_subsample_spreads_the_points_evenly(n, most):
    """Evenly spread: the steps between chosen points (in positions of the full list) differ by at most one."""
    values = list(range(8, 8 * n + 1, 8))
    steps = np.diff([values.index(v) for v in subsample(values, most)])
    assert steps.max() - steps.min() <= 1


def test_cli_writes_a_profile_and_refuses_a_mismatched_append(tmp_path, capsys):
    out = tmp_path / "p.json"
    args = ["profile", "--target", "host-cpu", "--out", str(out), "--max-points", "2", "--repeats", "4"]
    assert main(args) == 0
    shown = capsys.readouterr().out
    assert "conv2d k3x3 s1x1 p1x1 d1x1 in8x8" in shown and f"wrote {out}" in shown
    first = Profile.load(out)
    assert main(args + ["--append", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "cannot append" in err and "batch size 1 vs 2" in err
    assert Profile.load(out).to_dict() == first.to_dict()  # untouched
    assert main(["profile", "--target", "host-cpu", "--out", str(out), "--max-points", "1"]) == 2
    assert "--max-points 1" in capsys.readouterr().err


def test_append_keeps_the_blocks_section(measured):
    """Appending width tables for another model must not drop the block-density tables (it did: the
    shipped profile lost its blocks section on `hwprune profile --append`)."""
    from hwprune.target.files import profile_dirs

    net, x, prof, _ = measured
    shipped = Profile.load(profile_dirs()[0] / "host-cpu.json")
    assert shipped.blocks is not None
    prof = copy.copy(prof)
    prof.blocks = shipped.blocks
    other = build_model("small-resnet", in_channels=1, num_classes=10, input_size=8, width=0.5).eval()
    out = measure_profile([(other, x, "small-resnet-half", "digits")], load_target("host-cpu"), settings=FAST,
                          existing=prof, progress=None)
    assert out.blocks is not None and out.blocks.to_dict() == shipped.blocks.to_dict()
    assert set(prof.layers) <= set(out.layers)


def test_a_new_width_profile_over_an_old_one_keeps_its_blocks_section_and_says_what_it_drops(tmp_path, capsys):
    """`hwprune profile` without --append replaced the whole file: the blocks section (minutes of
    --granularity blocks measuring) and other models' tables went without a word."""
    from hwprune.target.files import profile_dirs

    out = tmp_path / "p.json"
    fast = ["--max-points", "2", "--repeats", "4"]
    assert main(["profile", "--target", "host-cpu", "--out", str(out)] + fast) == 0
    mine = Profile.load(out)
    mine.blocks = Profile.load(profile_dirs()[0] / "host-cpu.json").blocks  # as if measured here, with this machine
    assert mine.blocks is not None
    mine.save(out)
    capsys.readouterr()

    assert main(["profile", "--target", "host-cpu", "--out", str(out), "--model", "helpers_models:tiny_resnet"] + fast) == 0
    shown = capsys.readouterr().out
    assert "layer shapes this model does not have are gone (measure with --append" in shown
    assert "its blocks section (--granularity blocks) is kept" in shown
    again = Profile.load(out)
    assert again.blocks.to_dict() == mine.blocks.to_dict()
    assert not set(mine.layers) <= set(again.layers)  # the default model's own shapes were replaced, as documented

    again.machine = {**again.machine, "hostname": "another-box"}  # a blocks section from another machine
    again.save(out)
    assert main(["profile", "--target", "host-cpu", "--out", str(out), "--model", "helpers_models:tiny_resnet"] + fast) == 0
    assert "its blocks section is dropped: it was measured differently (machine hostname 'another-box'" in capsys.readouterr().out
    assert Profile.load(out).blocks is None
