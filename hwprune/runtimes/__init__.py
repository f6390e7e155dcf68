"""Runtimes that time models: one interface, one registry.

A :class:`Runtime` times several models together (interleaved, :mod:`.clock`) and labels where it
ran. ``onnxruntime`` runs here with the target's providers; ``tvm`` compiles with hwprune's dense TVM
path and runs here or on an RPC device (:mod:`.tvm`). Every other module asks :func:`runtime` for one
by name and never tests the name itself; the CLI's ``--runtime`` / ``--latency-runtime`` choices are
:data:`RUNTIMES`.

Example:
    >>> sorted(RUNTIMES)
    ['onnxruntime', 'tvm']
    >>> runtime("tvm").remote
    True
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, ClassVar

from ..errors import ProfileError


class Runtime:
    """``remote``: whether it can run on an RPC device; ``net_of_call``: whether its per-layer profile
    times already exclude the per-call overhead (onnxruntime's node times do, TVM's function times not);
    ``task_inputs``: whether it times a model through the task's own export and inputs (``export``,
    ``feeds``), which tasks other than classification need."""

    name: ClassVar[str]
    description: ClassVar[str]
    remote: ClassVar[bool]
    net_of_call: ClassVar[bool]
    task_inputs: ClassVar[bool]

    def time_models(self, models: dict, example, target, *, remote=None, batch_size: int | None = None,
                    repeats: int | None = None, export: Callable | None = None, feeds=None, exported=None):
        """A :class:`~hwprune.runtimes.clock.LatencyResult` of ``models`` (torch modules) timed
        together. ``export(model, path)``: how to write one for this runtime; ``exported``: files already
        written, by name; ``feeds``: the task's inputs for timing (a sentence encoder's token ids)."""
        raise NotImplementedError


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    description = "onnxruntime with the target's execution providers, on this machine"
    remote = False
    net_of_call = True
    task_inputs = True

    def time_models(self, models, example, target, *, remote=None, batch_size=None, repeats=None, export=None,
                    feeds=None, exported=None):
        from .onnxruntime import export_onnx
        from .onnxruntime import measure_onnx_latency

        export = export or (lambda m, path: export_onnx(m.eval(), example, path))
        exported = {k: Path(v) for k, v in (exported or {}).items() if Path(v).is_file()}
        with tempfile.TemporaryDirectory(prefix="hwprune-lat-") as tmp:
            paths = {}
            for k, m in models.items():
                if k not in exported:
                    exported[k] = Path(tmp) / f"{k}.onnx"
                    export(m.eval(), exported[k])
                paths[k] = str(exported[k])
            return measure_onnx_latency(paths, target, batch_size=batch_size, repeats=repeats, feeds=feeds)


class Tvm(Runtime):
    name = "tvm"
    description = "hwprune's hand-scheduled TVM build, here or on an RPC device"
    remote = True
    net_of_call = False
    task_inputs = False

    def time_models(self, models, example, target, *, remote=None, batch_size=None, repeats=None, export=None,
                    feeds=None, exported=None):
        from .tvm.timing import measure_tvm_latency

        return measure_tvm_latency(models, example, target, remote=remote, batch_size=batch_size, repeats=repeats)


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (OnnxRuntime(), Tvm())}


def runtime(name: str, flag: str = "--runtime") -> Runtime:
    """The runtime called ``name``; an unknown name is a one-line error listing the valid ones."""
    if name not in RUNTIMES:
        raise ProfileError(f"{flag} {name!r}: expected one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]
