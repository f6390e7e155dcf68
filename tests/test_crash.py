"""Crash safety: corrupt checkpoints fall back to the previous one, diverging runs stop cleanly."""

import torch
from torch.utils.data import Subset

import pytest

import hwprune
from hwprune.budget import Budget
from hwprune.training.checkpoint import Checkpointer
from hwprune.data import load_dataset
from hwprune.errors import CheckpointError
from hwprune.training.pipeline import FitConfig
from hwprune.errors import DivergedError

from helpers_models import _TinyResNet


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    ck = Checkpointer(tmp_path)
    ck.save({"epoch": 1, "w": torch.ones(3)})
    ck.save({"epoch": 2, "w": torch.ones(3)})
    data = ck.path.read_bytes()
    ck.path.write_bytes(data[: len(data) // 2])  # a crash in the middle of a (non-atomic) copy
    assert ck.load()["epoch"] == 1
    assert "corrupt or truncated" in capsys.readouterr().err
    ck.prev.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="No usable checkpoint"):
        ck.load()


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    import pickle

    (tmp_path / "checkpoint.pt").write_bytes(pickle.dumps({"format": "hwprune-checkpoint/1", "x": Evil()}))
    with pytest.raises(CheckpointError):
        Checkpointer(tmp_path).load()


class _Explodes(_TinyResNet):
    """Turns its output into NaN after a number of training forwards."""

    def __init__(self, after):
        super().__init__(1, 10)
        self.after, self.calls = after, 0

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                out = out * float("nan")
        return out


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    data = load_dataset("digits")
    train = Subset(data.train, list(range(128)))  # 2 steps per epoch
    cfg = FitConfig(budget=Budget("sparsity", 0.5), epochs_dense=3, epochs_regularize=1, epochs_finetune=1)
    with pytest.raises(DivergedError, match="last good checkpoint is kept"):
        hwprune.fit(_Explodes(after=3), train, target="host-cpu", config=cfg, out_dir=tmp_path, progress=None)
    saved = Checkpointer(tmp_path).load()
    assert saved["stage"] == "dense" and saved["epoch"] == 1  # the epoch before the NaN


def test_collapse_to_zero_width_stops_the_run():
    from hwprune.graph import discover_groups
    from hwprune.graph.groups import UnitIndex
    from hwprune.training.pipeline import check_collapse
    from hwprune.regularizers import RegContext, build_regularizer

    model = _TinyResNet(1, 10)
    groups = discover_groups(model, torch.zeros(1, 1, 8, 8))
    index = UnitIndex(model, groups)
    reg = build_regularizer("slimming", RegContext(model, index, keep_units=24))
    check_collapse(reg)  # healthy
    with torch.no_grad():
        model.c1[1].weight.zero_()
        model.c1[1].bias.zero_()
    with pytest.raises(DivergedError, match="collapsed to zero width"):
        check_collapse(reg)


def test_killed_between_rotation_and_write_resumes_from_the_previous(tmp_path):
    """save() renames checkpoint.pt to .prev.pt, then writes the new one atomically: a kill in between
    leaves only .prev.pt, which is used."""
    ck = Checkpointer(tmp_path)
    ck.save({"epoch": 1})
    ck.save({"epoch": 2})
    ck.path.unlink()  # the state right after the rename, before the new file lands
    assert ck.load()["epoch"] == 1
    assert not list(tmp_path.glob(".checkpoint.pt.*.tmp")), "no temporary files are left visible"
