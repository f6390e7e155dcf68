"""Latency budgets end to end, on a real measured profile and real onnxruntime timings (small settings)."""

import json

import numpy as np
import pytest
import torch

import hwprune
from hwprune.budget import Budget
from hwprune.data import load_dataset
from hwprune.errors import BudgetError, ProfileError
from hwprune.models import build_model
from hwprune.pipeline import FitConfig
from hwprune.profiler import ProfileSettings, measure_profile
from hwprune.target import load_target


def _net():
    torch.manual_seed(0)
    return build_model("small-resnet", in_channels=1, num_classes=10, input_size=8, width=0.5)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    prof = measure_profile([(_net().eval(), torch.zeros(1, 1, 8, 8), "small-resnet-0.5", "digits")],
                           load_target("host-cpu"), settings=ProfileSettings(max_points=4, repeats=12, rounds=3),
                           progress=None)
    return prof.save(tmp_path_factory.mktemp("prof") / "host-cpu.json")


def _config(budget, profile_path):
    return FitConfig(budget=budget, epochs_dense=1, epochs_regularize=1, epochs_finetune=1, latency_repeats=100,
                     profile=str(profile_path))


def test_speedup_budget_end_to_end(digits, profile_path, tmp_path):
    run = tmp_path / "run"
    hwprune.fit(_net(), digits.train, test_data=digits.test, target="host-cpu", out_dir=run, progress=None,
                config=_config(Budget("speedup", 2.0), profile_path))
    rep = json.loads((run / "report.json").read_text())
    lm = rep["latency_model"]
    cal = lm["model"]["calibration"]
    # the budget is the measured dense latency / 2, and the projection meets it as predicted
    assert lm["budget_ms"] == pytest.approx(cal["dense_ms"] / 2.0)
    assert lm["predicted_ms"]["pruned"] <= lm["budget_ms"] * (1 + 1e-9)
    assert lm["predicted_ms"]["dense"] == pytest.approx(cal["dense_ms"])
    assert rep["requested"] == {"speedup": 2.0, "latency_ms": pytest.approx(lm["budget_ms"])}
    # measured in the same run, dense and pruned interleaved; the error is reported, not assumed
    assert set(lm["measured_ms"]) == {"dense", "pruned"} and "within_10pct" in lm
    assert lm["error"]["pruned"] == pytest.approx(lm["measured_ms"]["pruned"] / lm["predicted_ms"]["pruned"] - 1)
    same = lm["same_session"]  # the anchors re-timed with the pruned model
    assert 0 < same["narrowest_ms"] < lm["measured_ms"]["dense"]
    assert same["error_pruned"] == pytest.approx(lm["measured_ms"]["pruned"] / same["predicted_pruned_ms"] - 1)
    assert lm["within_10pct"] == (abs(same["error_pruned"]) <= 0.10)
    assert rep["latency_ms"]["pruned"] < rep["latency_ms"]["dense"]
    assert rep["achieved"]["speedup"] == pytest.approx(rep["latency_ms"]["dense"] / rep["latency_ms"]["pruned"])
    assert "latency predicted (ms)" in (run / "report.md").read_text()
    # the calibration is kept in the run folder: resuming predicts exactly the same
    saved = json.loads((run / "latency_model.json").read_text())
    assert saved["dense_ms"] == cal["dense_ms"] and saved["scale"] == pytest.approx(cal["scale"])
    again = hwprune.fit(_net(), digits.train, test_data=digits.test, target="host-cpu", out_dir=run, progress=None,
                        config=_config(Budget("speedup", 2.0), profile_path))
    assert again.report.get("latency_model.predicted_ms") == lm["predicted_ms"]


def test_latency_below_the_floor_is_rejected_before_training(digits, profile_path, tmp_path):
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
