"""Latency budgets end to end, on a machine whose speed the test knows.

Real timings on a loaded 2-core machine make any "faster than" assertion flaky, so the runs here are
timed on a fake clock: each onnxruntime session still runs for real, but a run takes, on that clock,
``overhead + cost per weight x weight entries`` of the model the session holds (conv and linear
weights, read from the ONNX file). The profile gives every layer
``1e-6 ms x weight entries``. The machine is then affine in the profile, so the two-point calibration
must recover its overhead and scale exactly and predict every width exactly: the expected values below
come from the machine's definition and hand counts of small-resnet's weights, not from hwprune's formulas.
Measuring speed for real belongs in benchmarks/.
"""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import hwprune
import hwprune.runtimes.onnxruntime
from hwprune.budget import Budget
from hwprune.data import load_dataset
from hwprune.errors import BudgetError, ProfileError
from hwprune.models import build_model
from hwprune.training.pipeline import FitConfig
from hwprune.latency.profile import LayerTable, Profile
from hwprune.latency.measure import ProfileSettings, plan_tables
from hwprune.latency.budget import profile_from_elsewhere
from hwprune.target import load_target

PROFILE_MS_PER_WEIGHT = 1e-6
# small-resnet at width 0.5 on 1x8x8 digits: widths 40 and 80; conv and linear weight entries, by hand
DENSE_WEIGHTS = 1 * 40 * 9 + 2 * 40 * 40 * 9 + 40 * 80 * 9 + 80 * 80 * 9 + 40 * 80 + 80 * 10  # 119560
# host-cpu keeps multiples of 8: every group at 8 units (stem, two 3x3 per stage, the 1x1 shortcut, fc)
NARROWEST_WEIGHTS = 1 * 8 * 9 + 4 * 8 * 8 * 9 + 8 * 8 + 8 * 10  # 2520


class FakeMachine:
    """Runs an ONNX model in ``overhead_ms + ms_per_weight x (its conv and linear weight entries)`` of a
    fake clock. ``install`` wraps ``hwprune.runtimes.onnxruntime.ort_session`` so that every ``run`` advances the
    clock, and times ``hwprune.runtimes.onnxruntime``'s timed calls on it instead of ``time.perf_counter``."""

    def __init__(self, overhead_ms: float, ms_per_weight: float):
        self.overhead_ms, self.ms_per_weight = overhead_ms, ms_per_weight
        self.now_ms = 0.0

    @staticmethod
    def weights(path) -> int:
        model = onnx.load(str(path))
        dims = {i.name: list(i.dims) for i in model.graph.initializer}
        return sum(int(np.prod(dims[n.input[1]])) for n in model.graph.node if n.op_type in ("Conv", "Gemm"))

    def ms(self, path) -> float:
        return self.overhead_ms + self.ms_per_weight * self.weights(path)

    def elapsed_ms(self, call) -> float:
        start = self.now_ms
        call()
        return self.now_ms - start

    def install(self, monkeypatch) -> "FakeMachine":
        real, machine = hwprune.runtimes.onnxruntime.ort_session, self

        class Session:
            def __init__(self, path, *args, **kwargs):
                self._session, self._ms = real(path, *args, **kwargs), machine.ms(path)

            def run(self, *args, **kwargs):
                machine.now_ms += self._ms
                return self._session.run(*args, **kwargs)

            def __getattr__(self, name):
                return getattr(self._session, name)

        def interleaved_times(calls, repeats, block=None):
            return {k: [self.elapsed_ms(f) for _ in range(repeats)] for k, f in calls.items()}

        monkeypatch.setattr(hwprune.runtimes.onnxruntime, "ort_session", Session)
        monkeypatch.setattr(hwprune.runtimes.onnxruntime, "interleaved_times", interleaved_times)
        return self


def _net():
    torch.manual_seed(0)
    return build_model("small-resnet", in_channels=1, num_classes=10, input_size=8, width=0.5)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    """The tables a measurement of this model would fill (same grids), each point at 1e-6 ms per weight entry."""
    net, x = _net().eval(), torch.zeros(1, 1, 8, 8)
    tables = plan_tables([(net, x, "small-resnet-0.5", "digits")], load_target("host-cpu"), ProfileSettings(max_points=4))
    layers = {}
    for key, (op, shape, grid, used_by) in tables.items():
        kernel = int(np.prod(shape.get("kernel", [1])))
        layers[key] = LayerTable(key, op, shape, grid, PROFILE_MS_PER_WEIGHT * kernel * np.outer(*grid), used_by)
    prof = Profile(target="host-cpu", created="2025-01-01T00:00:00+00:00", machine={"cpu": "none (synthetic)"},
                   measured_on="nowhere: synthetic tables", on_target_device=True, runtime={"name": "onnxruntime"},
                   libraries={}, batch_size=1, warmup=0, repeats=0, call_overhead_ms=0.0, layers=layers,
                   statistic=f"ms = {PROFILE_MS_PER_WEIGHT} x weight entries (synthetic)")
    return prof.save(tmp_path_factory.mktemp("prof") / "host-cpu.json")


def _cpu_model_name() -> str:
    """This machine's CPU as /proc/cpuinfo names it (what a profile measured here records)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    pytest.skip("no CPU model name in /proc/cpuinfo")


def test_a_profile_of_this_cpu_carries_no_note_and_one_of_another_cpu_does(profile_path):
    prof = Profile.load(profile_path)
    prof.machine = {"cpu": _cpu_model_name()}
    assert profile_from_elsewhere(prof, None) is None
    prof.machine = {"cpu": "Some Other CPU 9000"}
    note = profile_from_elsewhere(prof, None)
    assert f"measured on Some Other CPU 9000, not on this machine ({_cpu_model_name()})" in note
    assert "hwprune profile --target host-cpu" in note
    prof.machine = {}  # a profile that does not say where it was measured: nothing to compare
    assert profile_from_elsewhere(prof, None) is None


def _config(budget, profile_path):
    return FitConfig(budget=budget, epochs_dense=1, epochs_regularize=1, epochs_finetune=1, latency_repeats=100,
                     profile=str(profile_path))


def test_speedup_budget_end_to_end(digits, profile_path, tmp_path, monkeypatch):
    machine = FakeMachine(overhead_ms=0.05, ms_per_weight=1e-5).install(monkeypatch)  # scale 1e-5 / 1e-6 = 10
    run = tmp_path / "run"
    hwprune.fit(_net(), digits.train, test_data=digits.test, target="host-cpu", out_dir=run, progress=None,
                config=_config(Budget("speedup", 2.0), profile_path))
    rep = json.loads((run / "report.json").read_text())
    lm = rep["latency_model"]
    cal = lm["model"]["calibration"]
    dense_ms, narrowest_ms = 0.05 + 1e-5 * DENSE_WEIGHTS, 0.05 + 1e-5 * NARROWEST_WEIGHTS
    assert machine.weights(run / "dense.onnx") == DENSE_WEIGHTS
    pruned_ms = machine.ms(run / "model.onnx")
    # calibrated before training on the dense and the narrowest model: the machine's overhead and scale
    assert cal["dense_ms"] == pytest.approx(dense_ms) and cal["min_ms"] == pytest.approx(narrowest_ms)
    assert cal["overhead_ms"] == pytest.approx(0.05) and cal["scale"] == pytest.approx(10.0)
    # the budget is the measured dense latency / 2; the projection meets it, and the prediction is exact
    assert lm["budget_ms"] == pytest.approx(dense_ms / 2)
    assert rep["requested"] == {"speedup": 2.0, "latency_ms": pytest.approx(dense_ms / 2)}
    # a latency budget keeps the uniform width unless --allocation says otherwise (docs/benchmarks.md)
    assert rep["projection"]["allocation"] == "uniform"
    assert lm["predicted_ms"] == {"dense": pytest.approx(dense_ms), "pruned": pytest.approx(pruned_ms)}
    assert lm["predicted_ms"]["pruned"] <= lm["budget_ms"] * (1 + 1e-9)
    # the files the run wrote were timed, each under its own name, and the speedup asked for was achieved
    assert rep["latency_ms"] == {"dense": pytest.approx(dense_ms), "pruned": pytest.approx(pruned_ms)}
    assert rep["achieved"]["speedup"] == pytest.approx(dense_ms / pruned_ms)
    assert rep["achieved"]["speedup"] >= 2.0 * (1 - 1e-9)
    assert lm["error"] == {"dense": pytest.approx(0.0, abs=1e-9), "pruned": pytest.approx(0.0, abs=1e-9)}
    # the anchors re-timed with the pruned model give the same machine again
    assert lm["same_session"] == {"narrowest_ms": pytest.approx(narrowest_ms), "predicted_pruned_ms": pytest.approx(pruned_ms),
                                  "error_pruned": pytest.approx(0.0, abs=1e-9), "scale": pytest.approx(10.0),
                                  "overhead_ms": pytest.approx(0.05)}
    assert lm["within_10pct"] is True and lm["within_10pct_of_planning"] is True
    assert "latency predicted (ms)" in (run / "report.md").read_text()
    # the profile names another CPU than this one: the run says so, in the calibration and in report.md
    here = _cpu_model_name()
    assert cal["profile_measured_on"] == "nowhere: synthetic tables"
    assert cal["profile_note"].startswith(f"the latency profile was measured on none (synthetic), not on this machine ({here})")
    assert "note: the latency profile was measured on none (synthetic)" in (run / "report.md").read_text()
    saved = json.loads((run / "latency_model.json").read_text())
    assert saved == cal

    # Rerun on the finished folder with the machine twice as slow: the calibration comes from the run
    # folder (same budget and predictions), the latency is measured again, the planning error is the
    # drift (+100%), and the same-session anchors absorb it.
    FakeMachine(overhead_ms=0.1, ms_per_weight=2e-5).install(monkeypatch)
    again = hwprune.fit(_net(), digits.train, test_data=digits.test, target="host-cpu", out_dir=run, progress=None,
                        config=_config(Budget("speedup", 2.0), profile_path))
    lm2 = again.report.get("latency_model")
    assert lm2["model"]["calibration"] == cal
    assert lm2["budget_ms"] == lm["budget_ms"] and lm2["predicted_ms"] == lm["predicted_ms"]
    assert lm2["measured_ms"] == {"dense": pytest.approx(2 * dense_ms), "pruned": pytest.approx(2 * pruned_ms)}
    assert lm2["error"] == {"dense": pytest.approx(1.0), "pruned": pytest.approx(1.0)}
    assert lm2["within_10pct_of_planning"] is False
    assert lm2["same_session"]["scale"] == pytest.approx(20.0) and lm2["same_session"]["overhead_ms"] == pytest.approx(0.1)
    assert lm2["same_session"]["error_pruned"] == pytest.approx(0.0, abs=1e-9) and lm2["within_10pct"] is True


def test_latency_below_the_floor_is_rejected_before_training(digits, profile_path, tmp_path, monkeypatch):
    FakeMachine(overhead_ms=0.05, ms_per_weight=1e-5).install(monkeypatch)
    run = tmp_path / "run"
    with pytest.raises(BudgetError, match=r"--latency-ms 1e-05 cannot be met.*Reachable range"):
        hwprune.fit(_net(), digits.train, target="host-cpu", out_dir=run, progress=None,
                    config=_config(Budget("latency", 1e-5), profile_path))
    assert not (run / "checkpoint.pt").exists()  # no epoch was trained


def test_profile_of_another_runtime_is_refused(digits, profile_path, tmp_path):
    with pytest.raises(ProfileError, match="measured with onnxruntime, but this run measures latency with tvm"):
        cfg = _config(Budget("latency", 1.0), profile_path)
        cfg.latency_runtime = "tvm"
        hwprune.fit(_net(), digits.train, target="host-cpu", out_dir=tmp_path / "r", progress=None, config=cfg)


class SlowMiddleMachine(FakeMachine):
    """``overhead_ms + ms_per_weight x sqrt(weight entries)``: concave, so a latency model anchored on the
    dense and the narrowest model (with a profile linear in the weights) predicts the widths between
    them faster than this machine runs them, as VGG-16-BN's middle widths ran on a real CPU."""

    def ms(self, path) -> float:
        return self.overhead_ms + self.ms_per_weight * float(np.sqrt(self.weights(path)))


def test_a_plan_the_clock_says_is_too_slow_is_planned_again_before_training(digits, profile_path, tmp_path, monkeypatch):
    machine = SlowMiddleMachine(overhead_ms=0.05, ms_per_weight=3e-3).install(monkeypatch)
    run = tmp_path / "run"
    hwprune.fit(_net(), digits.train, test_data=digits.test, target="host-cpu", out_dir=run, progress=None,
                config=_config(Budget("speedup", 2.0), profile_path))
    rep = json.loads((run / "report.json").read_text())
    budget_ms = (0.05 + 3e-3 * np.sqrt(DENSE_WEIGHTS)) / 2  # this machine's dense latency / 2, by hand
    loop = rep["latency_model"]["loop"]
    assert loop["budget_ms"] == pytest.approx(budget_ms)
    # planned at the budget, the widths ran slower than it on this machine: the profile's prediction missed
    first = loop["rounds"][0]
    assert first["planned_ms"] == pytest.approx(budget_ms) and first["measured_ms"] > 1.03 * budget_ms
    # so it planned at a lower budget, and the model it trained and exported meets the real one on the clock
    assert loop["factor"] < 1 and len(loop["rounds"]) >= 2
    assert machine.ms(run / "model.onnx") <= budget_ms
    assert rep["achieved"]["speedup"] >= 2.0 * (1 - 1e-9)
    assert "latency loop, the planned widths timed before training" in (run / "report.md").read_text()
