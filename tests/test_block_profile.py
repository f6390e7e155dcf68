"""Block profiles: BSR kernel time over block densities, measured here, stored in the profile's blocks section,
loaded with one-line errors, interpolated by predict_block_latency and used by the TVM export's manifest.

Timings on a loaded machine are noisy: nothing here asserts that sparser is faster."""

import json

import numpy as np
import pytest
import torch

from hwprune.latency.measure_blocks import kept_counts, measure_block_profile, parse_densities
from hwprune.graph.blocks import block_groups
from hwprune.cli.main import main
from hwprune.errors import ProfileError
from hwprune.latency.profile import Profile
from hwprune.latency.profile_blocks import predict_block_latency
from hwprune.latency.profile_blocks import block_layer_latency
from hwprune.latency.measure import ProfileSettings
from hwprune.target import load_target

from conftest import TESTS
from helpers_models import tiny_resnet

tvm = pytest.importorskip("tvm")

FAST = ProfileSettings(repeats=4, rounds=2, warmup=1)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    torch.manual_seed(0)
    net = tiny_resnet(1, 10, 8).eval()
    x = torch.zeros(1, 1, 8, 8)
    prof = measure_block_profile([(net, x, "tiny", "digits")], load_target("host-cpu"), densities=[0.3, 1.0],
                                 settings=FAST, progress=None)
    path = prof.save(tmp_path_factory.mktemp("bprof") / "host-cpu.json")
    return net, x, prof, path


def test_every_sparse_layer_is_covered_at_every_density(measured):
    net, x, prof, _ = measured
    groups, _ = block_groups(net, x, load_target("host-cpu"))
    section = prof.blocks
    covered = {u for t in section.tables.values() for u in t.used_by}
    assert {f"tiny:{g.name}" for g in groups} == covered
    assert len(section.tables) < len(groups)  # identical shapes are measured once
    for t in section.tables.values():
        assert t.block == (16, 1) and t.kept_blocks == kept_counts(t.n_blocks, [0.3, 1.0])
        assert t.densities == [k / t.n_blocks for k in t.kept_blocks] and t.densities[-1] == 1.0
        assert len(t.ms) == len(t.densities) and all(np.isfinite(t.ms)) and np.isfinite(t.dense_ms)
        assert t.columns == 64  # batch 1 x 8x8 output positions
    assert section.runtime == "tvm (hwprune BSR kernels)" and section.dense_runtime.startswith("onnxruntime")
    assert section.batch_size == 1 and section.info["block"] == {"conv": [16, 1], "linear": [16, 1]}
    assert prof.layers == {} and prof.on_target_device  # no width tables were asked for


def test_round_trip_through_the_file(measured):
    _, _, prof, path = measured
    loaded = Profile.load(path)
    assert loaded.to_dict() == json.loads(path.read_text()) == prof.to_dict()


def test_predict_interpolates_linearly_and_names_uncovered_layers(measured):
    _, _, prof, path = measured
    prof = Profile.load(path)
    t = prof.blocks.tables["conv2d k3x3 s1x1 p1x1 d1x1 in8x8 16x144 block 16x1"]
    (d0, d1), (m0, m1) = t.densities, t.ms
    for name in ("tiny:c1.0", "c1.0", t.key):
        assert predict_block_latency(prof, {name: d0}) == pytest.approx(m0, abs=1e-12)
        assert predict_block_latency(prof, {name: d1}) == pytest.approx(m1, abs=1e-12)
    mid = d0 + 0.25 * (d1 - d0)
    assert predict_block_latency(prof, {"c1.0": mid}) == pytest.approx(m0 + 0.25 * (m1 - m0))
    both = block_layer_latency(prof, {"c1.0": d1, "c2.0": mid})
    assert predict_block_latency(prof, {"c1.0": d1, "c2.0": mid}) == pytest.approx(sum(both.values()))
    with pytest.raises(ProfileError, match="layer 'fc9' is not covered.*hwprune profile --target host-cpu "
                                           "--granularity blocks") as e:
        predict_block_latency(prof, {"c1.0": 0.5, "fc9": 0.5})
    assert "\n" not in str(e.value)
    with pytest.raises(ProfileError, match="layer 'c1.0': density 0.01 is outside the measured"):
        predict_block_latency(prof, {"c1.0": 0.01})
    prof.blocks = None
    with pytest.raises(ProfileError, match="has no blocks section"):
        predict_block_latency(prof, {"c1.0": 0.5})


def _table(d):
    return d["blocks"]["tables"][0]


BAD = {
    "not a mapping": (lambda d: d.update(blocks=[]), "key 'blocks'"),
    "no tables": (lambda d: d["blocks"].pop("tables"), "key 'blocks.tables': missing required key"),
    "batch": (lambda d: d["blocks"].update(batch_size=0), "key 'blocks.batch_size'"),
    "op": (lambda d: _table(d).update(op="pool"), "key 'blocks.tables[0].op'"),
    "matrix": (lambda d: _table(d).update(matrix=[16]), "key 'blocks.tables[0].matrix'"),
    "block": (lambda d: _table(d).update(block=[0, 1]), "key 'blocks.tables[0].block'"),
    "density > 1": (lambda d: _table(d)["densities"].__setitem__(-1, 1.5), "key 'blocks.tables[0].densities'"),
    "density order": (lambda d: _table(d)["densities"].reverse(), "key 'blocks.tables[0].densities'"),
    "ms length": (lambda d: _table(d).update(ms=[1.0]), "key 'blocks.tables[0].ms'"),
    "ms negative": (lambda d: _table(d)["ms"].__setitem__(0, -1.0), "key 'blocks.tables[0].ms'"),
    "dense_ms": (lambda d: _table(d).update(dense_ms="fast"), "key 'blocks.tables[0].dense_ms'"),
    "missing dense_ms": (lambda d: _table(d).pop("dense_ms"), "key 'blocks.tables[0].dense_ms': missing"),
    "duplicate": (lambda d: d["blocks"]["tables"].append(_table(d)), "key 'blocks.tables[2].key': expected unique"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_blocks_section_is_one_clear_error(measured, tmp_path, case):
    fn, expected = BAD[case]
    data = json.loads(measured[3].read_text())
    fn(data)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ProfileError) as e:
        Profile.load(bad)
    msg = str(e.value)
    assert str(bad) in msg and expected in msg and "\n" not in msg


def test_densities_and_kept_counts():
    assert parse_densities("1, 0.1,0.1") == [0.1, 1.0]
    for bad in ("0", "1.5", "x", ""):
        with pytest.raises(ProfileError, match="--densities"):
            parse_densities(bad)
    assert kept_counts(9, [0.01, 0.3, 1.0]) == [1, 3, 9]


def test_cli_adds_a_blocks_section_and_keeps_the_width_tables(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(TESTS)
    out = tmp_path / "p.json"
    base = ["profile", "--target", "host-cpu", "--out", str(out), "--model", "helpers_models:tiny_resnet",
            "--repeats", "4"]
    assert main(base + ["--max-points", "2"]) == 0
    widths = Profile.load(out).to_dict()["layers"]
    capsys.readouterr()
    assert main(base + ["--granularity", "blocks", "--densities", "0.5,1"]) == 0
    shown = capsys.readouterr().out
    assert "16x144 block 16x1" in shown and f"wrote {out}" in shown and "width tables unchanged" in shown
    prof = Profile.load(out)
    assert prof.to_dict()["layers"] == widths and prof.blocks.tables
    assert all(t.densities[-1] == 1.0 and len(t.densities) == 2 for t in prof.blocks.tables.values())
    # refused before any work, one line each
    assert main(base + ["--granularity", "blocks", "--rpc", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "this machine only" in err and len(err.strip().splitlines()) == 1
    assert main(base + ["--granularity", "blocks", "--densities", "0.5,2"]) == 2
    assert "--densities" in capsys.readouterr().err
    assert main(base + ["--granularity", "blocks", "--runtime", "tvm"]) == 2
    assert "measured with onnxruntime" in capsys.readouterr().err
    assert Profile.load(out).to_dict() == prof.to_dict()


def test_export_manifest_gets_a_labelled_prediction(tmp_path, monkeypatch):
    from hwprune.export.artifacts import predicted_sparse_time
    from hwprune.export.tvm_bsr import build_sparse_module
    from hwprune.runtimes.tvm.bsr.packing import sparse_layers

    from test_sparse_export import masked_net

    model, plan = masked_net(16, 1)
    layers = sparse_layers(model, plan)
    x = torch.zeros(1, 3, 8, 8)
    build = build_sparse_module(model, x, layers, {"kind": "llvm", "mcpu": "core-avx2"})
    target = load_target("host-cpu")
    monkeypatch.setenv("HWPRUNE_PROFILES", str(tmp_path))
    pred, why = predicted_sparse_time(target, layers, build.layers, 1)
    assert pred is None and "--granularity blocks" in why  # the repo's profile does not cover sparse_net
    # a sentence encoder's layers are not what hwprune profile measures: the hint must not send the user there
    pred, why = predicted_sparse_time(target, layers, build.layers, 1, cnn=False)
    assert pred is None and "--model MODEL" not in why and "hwprune export --measure" in why
    prof = measure_block_profile([(model, x, "sparse_net", "-")], target, densities=[0.01, 1.0], settings=FAST,
                                 progress=None)
    prof.save(tmp_path / "host-cpu.json")
    pred, why = predicted_sparse_time(target, layers, build.layers, 1)
    assert why == "" and {r["layer"] for r in pred["layers"]} == {"conv", "pw", "fc1"}
    assert "not a measurement" in pred["what"]
    # measured here, so the label says this machine's CPU, in words of its own (not the stored "this machine: ")
    assert pred["measured_on"] == prof.measured_on.removeprefix("this machine: ") + " (this machine's CPU)"
    for row in pred["layers"]:
        layer = next(l for l in layers if l.name == row["layer"])
        assert row["density"] == pytest.approx(layer.density, abs=1e-6)
        assert row["predicted_ms"] == pytest.approx(prof.blocks.tables[row["table"]].predict(layer.density), abs=1e-6)
    assert pred["total_ms"] == pytest.approx(sum(r["predicted_ms"] for r in pred["layers"]), abs=1e-5)
    pred, why = predicted_sparse_time(target, layers, build.layers, 4)
    assert pred is None and "batch 1" in why and "batch 4" in why
    # a profile copied from another machine: its stored "this machine: ..." is that machine, not this one
    other = json.loads((tmp_path / "host-cpu.json").read_text())
    other["machine"]["cpu"] = "Some Other CPU 9000"
    other["measured_on"] = "this machine: Some Other CPU 9000 (x86_64, 2 cores), vm"
    (tmp_path / "host-cpu.json").write_text(json.dumps(other))
    pred, why = predicted_sparse_time(target, layers, build.layers, 1)
    assert pred["measured_on"].startswith("Some Other CPU 9000 (x86_64, 2 cores), vm, not this machine (this one: ")
    del prof.blocks.tables[next(iter(prof.blocks.tables))]
    prof.save(tmp_path / "host-cpu.json")
    pred, why = predicted_sparse_time(target, layers, build.layers, 1)
    assert pred is None and "does not cover" in why and "--granularity blocks" in why
