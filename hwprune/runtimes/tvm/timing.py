"""Latency of TVM builds, on this machine or on an RPC device, labelled with where and how it was measured.

Models are compiled here with the dense path (:mod:`hwprune.runtimes.tvm.dense`); on an RPC device each
library is uploaded and timed there with ``time_evaluator``, the models taking turns like the
onnxruntime measurement, in three rounds of which the middle one by ratio is kept (``timed_in_rounds``).
The result is the same :class:`~hwprune.runtimes.clock.LatencyResult`, whose ``runtime`` names the
schedule ("hand schedule ...", never a bare "TVM") and whose ``measured_on``
names the device: "RPC device 'rpi5' (from the tracker at ...)" or "this machine: ...".

Example:
    >>> from torch import nn
    >>> from hwprune.target import load_target
    >>> net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).eval()
    >>> small = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    >>> r = measure_tvm_latency({"dense": net, "pruned": small}, torch.zeros(1, 1, 8, 8), load_target("host-cpu"),
    ...                         repeats=20)
    >>> r.runtime
    'TVM 0.27.0... hand schedule (hwprune NCHW8c kernels, no tuning), llvm core-avx2, 1 thread'
    >>> r.measured_on
    'this machine: ...'
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..clock import LatencyResult, timed_in_rounds
from .rpc import RemoteSession, RemoteSpec, time_vms
from ...target import Target, this_machine


def measure_tvm_latency(models: dict[str, torch.nn.Module], example: torch.Tensor, target: Target, *,
                        remote: RemoteSpec | None = None, schedule: str = "hand", batch_size: int | None = None,
                        warmup: int | None = None, repeats: int | None = None, seed: int = 0) -> LatencyResult:
    """Compile each model for the target and time it here or on the RPC device, interleaved."""
    import tvm

    from . import build as tvm_build
    from .dense import build_dense

    batch_size = batch_size or target.latency.batch_size
    warmup = target.latency.warmup if warmup is None else warmup
    repeats = repeats or target.latency.repeats
    x = torch.zeros((batch_size, *example.shape[1:]), dtype=example.dtype)
    builds = {k: build_dense(m, x, target, schedule=schedule) for k, m in models.items()}
    rng = np.random.default_rng(seed)
    data = {k: rng.standard_normal(tuple(x.shape)).astype(np.float32) for k in builds}
    label = next(iter(builds.values())).label
    tgt = tvm_build.target_dict(target)
    threads = 1 if target.onnxruntime.threads == 1 else (target.onnxruntime.threads or "default")
    runtime = (f"TVM {tvm.__version__} {label}, {tgt.get('kind')} {tgt.get('mcpu', '')}".rstrip()
               + f", {threads} thread{'s' if threads != 1 else ''}")
    if remote is None:
        if not tvm_build.runs_here(target):
            from ...errors import RuntimeUnavailable

            raise RuntimeUnavailable(
                f"target '{target.name}' builds {tvm_build.target_arch(target)} code, which cannot run on this "
                f"{platform.machine()} machine; time it on the device with --rpc HOST:PORT or --tracker HOST:PORT --key KEY")
        vms = {k: b.vm() for k, b in builds.items()}
        inputs = {k: tvm.runtime.tensor(data[k]) for k in builds}
        stats, ratios = timed_in_rounds(
            lambda i, n: time_vms(vms, inputs, tvm.cpu(), warmup=warmup if i == 0 else 0, repeats=n), repeats)
        on_target = target.is_local
        measured_on = this_machine()
    else:
        with tempfile.TemporaryDirectory(prefix="hwprune-tvm-") as tmp, RemoteSession(remote) as sess:
            vms = {k: sess.load_vm(b.export(Path(tmp) / f"{k}.so")) for k, b in builds.items()}
            inputs = {k: sess.tensor(data[k]) for k in builds}
            stats, ratios = timed_in_rounds(
                lambda i, n: time_vms(vms, inputs, sess.device, warmup=warmup if i == 0 else 0, repeats=n), repeats)
        on_target = True
        measured_on = remote.describe()
    note = ""
    if not on_target:
        note = (f"measured on this machine, NOT on the target device '{target.device.name}' "
                f"({target.device.arch}): the target is not reachable from here (no RPC device configured)")
    return LatencyResult(stats, batch_size, runtime, measured_on, on_target, note, warmup, ratios)
