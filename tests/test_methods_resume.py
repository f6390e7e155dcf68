"""Each new method resumes inside its regularized stage and ends exactly where an uninterrupted run ends.

The uninterrupted runs use options the registry-parametrized test in test_methods_common.py does not
(ista-bn's alpha, wgsef with HSPG): they also check that those settings meet the budget exactly.
"""

import json

import pytest
import torch

import hwprune
from hwprune.budget import Budget
from hwprune.data import load_dataset
from hwprune.training.pipeline import FitConfig

from helpers_models import tiny_resnet
from methods_helpers import assert_exact_budget_and_onnx


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _fit(method, options, out, data, stop_at=None):
    def progress(msg):
        if stop_at and msg.startswith(stop_at):
            raise Interrupt(msg)

    torch.manual_seed(0)
    cfg = FitConfig(budget=Budget("sparsity", 0.5), method=method, method_options=dict(options),
                    epochs_dense=1, epochs_regularize=2, epochs_finetune=1)
    return hwprune.fit(tiny_resnet(1, 10, 8), data.train, test_data=data.test, target="host-cpu", config=cfg,
                       out_dir=out, progress=progress, measure=False)


# Every method whose regularized stage has state (strengths, gates, masks, warm starts, controllers),
# with options the registry-parametrized test does not use where a method has them.
TRAINING = [("polarization", {}), ("autoprune", {}), ("ista-bn", {"alpha": 0.5}),
            ("wgsef", {"hspg": True, "hspg_switch": 0.3}), ("wgsef", {}), ("gradual", {}), ("group-lasso", {}),
            ("slimming", {}), ("deephoyer", {})]


def test_every_training_method_is_covered():
    from hwprune.regularizers import REGISTRY

    trained = {name for name, cls in REGISTRY.items() if cls.trains}
    assert trained <= {m for m, _ in TRAINING}, f"add to TRAINING: {sorted(trained - {m for m, _ in TRAINING})}"


@pytest.mark.parametrize("method, options, stop_at", [
    *[(m, o, "[regularize 2/2]") for m, o in TRAINING],
    ("wgsef", {}, "[dense 1/1]"),  # killed after the dense stage's only epoch was saved
    ("wgsef", {}, "[project]"),  # between the projection's checkpoint and the fine-tune
    ("gradual", {}, "[finetune 1/1]"),  # in the fine-tune (its teacher and its hold come back on resume)
    ("gradual", {}, "[export]"),  # after the fine-tuned weights are saved, before the report
])
def test_a_run_interrupted_in_any_stage_resumes_to_the_same_result(digits, tmp_path, method, options, stop_at):
    _fit(method, options, tmp_path / "ref", digits)
    with pytest.raises(Interrupt):
        # e.g. "[regularize 2/2]": the checkpoint of regularized epoch 1 is on disk when epoch 2 is logged
        _fit(method, options, tmp_path / "cut", digits, stop_at=stop_at)
    _fit(method, options, tmp_path / "cut", digits)
    ref = json.loads((tmp_path / "ref" / "report.json").read_text())
    cut = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert_exact_budget_and_onnx(ref)
    assert json.loads((tmp_path / "ref" / "plan.json").read_text())["groups"] == \
        json.loads((tmp_path / "cut" / "plan.json").read_text())["groups"]
    assert ref["accuracy"] == cut["accuracy"]
    assert ref["projection"]["zero_fraction_before"] == cut["projection"]["zero_fraction_before"]
