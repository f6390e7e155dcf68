"""The TVM dense path: compile a (channel-sliced) CNN with TVM for a target, export it, run it.

Two schedules, and every latency says which one it came from:

* ``"hand"`` (the default): hwprune's own kernels (:mod:`.kernels`): NCHW[L]c blocked convolutions
  with register tiles vectorised over the target's lanes, BatchNorm folded, ReLU and residual adds
  fused. No tuning: the build takes about a second.
* ``"default"``: the model imported through torch.export and compiled with TVM's default pipeline,
  no schedule applied (any model torch.export captures; 20-70x slower than onnxruntime here).

Example:
    >>> import tempfile
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
    ...                     nn.Linear(512, 10))
    >>> b = build_dense(net.eval(), torch.zeros(1, 1, 8, 8), "host-cpu")
    >>> b.schedule, b.label
    ('hand', 'hand schedule (hwprune NCHW8c kernels, no tuning)')
    >>> with tempfile.TemporaryDirectory() as d:
    ...     b.export(f"{d}/model.so").name
    'model.so'
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ....errors import HwpruneError
from ....target import Target, load_target
from .. import build as tvm_build

SCHEDULES = ("hand", "default")


def schedule_label(schedule: str, lanes: int) -> str:
    """How a TVM build was scheduled, in words (every reported TVM latency carries it)."""
    if schedule == "hand":
        return f"hand schedule (hwprune NCHW{lanes}c kernels, no tuning)"
    return "default (TVM's default pipeline, untuned)"


@dataclass
class DenseBuild:
    """A compiled model: the executable and how it was made."""

    executable: Any = field(repr=False)
    target: Target
    schedule: str  # "hand" | "default"
    label: str
    build_seconds: float
    input_shape: tuple[int, ...]
    kernel_calls: int | None = None

    @property
    def runs_here(self) -> bool:
        return tvm_build.runs_here(self.target)

    def export(self, path: str | os.PathLike) -> Path:
        """Write the shared library (cross-linked for aarch64 targets); loads with TVM's runtime alone."""
        return tvm_build.export_library(self.executable, path, self.target)

    def vm(self):
        if not self.runs_here:
            raise HwpruneError(f"this build is for {tvm_build.target_arch(self.target)}; it cannot run on this "
                               f"machine ({os.uname().machine}). Time it on the device with --rpc HOST:PORT")
        return tvm_build.virtual_machine(self.executable)

    def run(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Run the model on one input of ``input_shape`` here."""
        tvm = tvm_build.require_tvm()
        x = x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        out = self.vm()["main"](tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32)))
        if not hasattr(out, "numpy"):  # the torch.export importer returns a one-element tuple
            out = out[0]
        return out.numpy()


def build_dense(model: nn.Module, example: torch.Tensor, target: Target | str, *, schedule: str = "hand") -> DenseBuild:
    """Compile ``model`` (eval mode) for the target at the example's input shape (batch included)."""
    if schedule not in SCHEDULES:
        raise HwpruneError(f"TVM schedule '{schedule}': expected one of {', '.join(SCHEDULES)}")
    tvm_build.require_tvm()
    target = load_target(target) if not isinstance(target, Target) else target
    model = model.eval()
    lanes = tvm_build.vector_lanes(target)
    calls = None
    if schedule == "hand":
        from .lower import lower

        # parallel loops only where the target runs more than one thread (0 = the runtime's default)
        parallel = target.onnxruntime.threads != 1
        mod, calls = lower(model, example, lanes=lanes, parallel=parallel)
    else:
        from ..relax_import import import_torch

        # the one torch -> Relax import (parameters bound as constants for the untuned default)
        mod = tvm_build.default_schedule(import_torch(model, example).bound(), target)
    ex, seconds = tvm_build.compile_relax(mod, target)
    return DenseBuild(ex, target, schedule, schedule_label(schedule, lanes), seconds, tuple(example.shape), calls)
