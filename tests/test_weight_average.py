"""Weight averaging at the end of the fine-tune (``FitConfig.finetune_average``, ``--finetune-average``):
the mean against numpy, which steps enter it (by hand), the fine-tuned model against the weights the
optimizer actually visited (recorded by torch's own optimizer hook), and a resume in the middle."""

import json

import numpy as np
import pytest
import torch
from torch import nn

import hwprune
from hwprune.budget import Budget
from hwprune.data import load_dataset
from hwprune.errors import HwpruneError
from hwprune.training.averaging import WeightAverage, first_averaged_step
from hwprune.training.pipeline import FitConfig

from helpers_models import tiny_resnet


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_the_average_is_numpys_mean_of_the_visited_weights():
    rng = np.random.default_rng(3)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    visited = []
    avg = WeightAverage()
    for _ in range(7):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.as_tensor(rng.normal(size=p.shape) * 10, dtype=p.dtype))
        visited.append([p.detach().numpy().copy() for p in model.parameters()])
        avg.update(model)
    restored = WeightAverage()
    restored.load_state_dict(avg.state_dict())  # what a checkpoint carries
    restored.copy_to(model)
    for i, p in enumerate(model.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), np.mean([v[i] for v in visited], axis=0), rtol=1e-5, atol=1e-5)
    assert restored.count == 7 and "1.num_batches_tracked" not in restored.mean  # buffers are not averaged


def test_the_averaged_steps_by_hand():
    assert first_averaged_step(10, 0.5) == 5  # steps 5..9: the last half
    assert first_averaged_step(10, 1.0) == 0  # every step
    assert first_averaged_step(10, 0.04) == 9  # under one step rounds to the last one, not to none
    assert first_averaged_step(7, 0.3) == 5  # round(2.1) = 2 steps: 5 and 6
    assert first_averaged_step(10, 0.0) is None


def test_an_average_of_another_model_is_refused():
    avg = WeightAverage()
    avg.update(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="weight"):
        avg.copy_to(nn.Conv2d(2, 2, 1))


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half"])
def test_a_fraction_outside_zero_one_is_refused(bad):
    with pytest.raises(HwpruneError, match="--finetune-average"):
        FitConfig(budget=Budget("sparsity", 0.5), finetune_average=bad)


def _fit(out, data, average, stop_at=None):
    class Interrupt(Exception):
        pass

    def progress(msg):
        if stop_at and msg.startswith(stop_at):
            raise Interrupt(msg)

    torch.manual_seed(0)
    cfg = FitConfig(budget=Budget("sparsity", 0.5), method="magnitude", epochs_dense=1, epochs_regularize=0,
                    epochs_finetune=2, finetune_average=average)
    try:
        return hwprune.fit(tiny_resnet(1, 10, 8), data.train, test_data=data.test, target="host-cpu", config=cfg,
                           out_dir=out, progress=progress, measure=False)
    except Interrupt:
        return None


def test_the_fine_tuned_model_holds_the_mean_of_the_last_steps(digits, tmp_path):
    """torch's optimizer hook records every step's weights; the pruned model's parameters must be the
    mean of the last 3/4 of the fine-tune's steps, computed here with numpy."""
    visited = []

    def record(optimizer, args, kwargs):
        visited.append({id(p): p.detach().numpy().copy() for g in optimizer.param_groups for p in g["params"]})

    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(record)
    try:
        res = _fit(tmp_path / "run", digits, 0.75)
    finally:
        handle.remove()
    steps_per_epoch = -(-len(digits.train) // 64)
    total = 2 * steps_per_epoch
    finetune = visited[-total:]  # the fine-tune's steps are the last ones (the dense stage's come first)
    last = finetune[total - round(0.75 * total):]
    params = list(res.model.parameters())
    assert set(finetune[0]) == {id(p) for p in params}  # the fine-tuned model's own parameters, every one
    for p in params:
        np.testing.assert_allclose(p.detach().numpy(), np.mean([v[id(p)] for v in last], axis=0), rtol=1e-4, atol=1e-6)
    # and it is not simply the last step's weights
    assert any(not np.allclose(p.detach().numpy(), finetune[-1][id(p)]) for p in params)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["run"]["config"]["finetune_average"] == 0.75
    logged = [r for r in report["history"] if r["stage"] == "finetune"][-1]["test_accuracy"]
    assert report["accuracy"]["before_average"] == logged  # before the average replaced the weights
    assert report["accuracy"]["pruned"] is not None
    # once copied in, the average is not carried by the checkpoints after the fine-tune
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False).get("weight_average") is None


def test_a_fine_tune_interrupted_mid_average_resumes_to_the_same_model(digits, tmp_path):
    ref = _fit(tmp_path / "ref", digits, 0.75)
    assert _fit(tmp_path / "cut", digits, 0.75, stop_at="[finetune 2/2]") is None  # epoch 1's average on disk
    cut = _fit(tmp_path / "cut", digits, 0.75)
    for a, b in zip(ref.model.state_dict().values(), cut.model.state_dict().values()):
        assert torch.equal(a, b)


def test_the_cli_flag_reaches_the_run_and_its_saved_flags(tmp_path, capsys):
    from hwprune.cli.main import main

    out = tmp_path / "run"
    argv = ["fit", "--target", "host-cpu", "--sparsity", "0.5", "--quiet", "--no-latency", "--epochs", "0", "0", "1"]
    assert main([*argv, "--finetune-average", "0.5", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["args"]["finetune_average"] == 0.5
    assert json.loads((out / "report.json").read_text())["run"]["config"]["finetune_average"] == 0.5
    assert main([*argv, "--finetune-average", "2", "--out", str(tmp_path / "bad")]) != 0
    assert "--finetune-average 2.0: expected the fraction" in capsys.readouterr().err
