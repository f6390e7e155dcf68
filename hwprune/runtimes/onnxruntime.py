"""Latency measured on the target's runtime, labelled with where and how it was measured.

Dense and pruned models are timed in the same process, taking turns in short blocks of consecutive
calls after a warm-up, so that drift on a shared machine hits both alike while each model runs with
its own weights in cache, as it would in service; the median of many runs is reported, from the
middle one of three rounds (:mod:`hwprune.runtimes.clock`).

When the target's device is not this machine and no RPC device is configured, the numbers come from
this machine and every label says so: hwprune never passes one machine off as another.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..io import atomic_write_bytes

from .clock import ROUNDS, LatencyResult, take_turns, timed_in_rounds, wall_clock
from ..target import Target, this_machine

BLOCK = 10  # consecutive timed calls of one model before the next model's turn


def _input_for(sess, batch_size: int, rng: np.random.Generator):
    inp = sess.get_inputs()[0]
    shape = [batch_size if not isinstance(s, int) else s for s in inp.shape]
    shape[0] = batch_size
    return {inp.name: rng.standard_normal(shape).astype(np.float32)}


def provider_note(target: Target) -> tuple[list[str], str]:
    """The target's providers available here, and a note about the ones that are not."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    wanted = list(target.onnxruntime.providers)
    use = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
    missing = [p for p in wanted if p not in available]
    note = f"not available here: {', '.join(missing)}" if missing else ""
    return use, note


def interleaved_times(calls: dict, repeats: int, block: int = BLOCK) -> dict[str, list[float]]:
    """Milliseconds of ``repeats`` timed calls of each zero-argument callable, taking turns.

    Models take turns in blocks of consecutive calls (first call of a block untimed), not call by
    call: a model in service runs call after call with its weights in cache, and right after
    another model it would be timed with that model's cache footprint. Measured here (default
    model, 1 thread, one process): call by call was 8% slower than in blocks for the dense model and
    18-20% for it at half and 30% width. Blocks still alternate often (who goes first alternates too),
    so drift on a shared machine hits every model alike.

    Example:
        >>> t = interleaved_times({"a": lambda: None, "b": lambda: None}, repeats=20)
        >>> len(t["a"]), len(t["b"])
        (20, 20)
    """
    return take_turns({k: wall_clock(f, untimed_first=True) for k, f in calls.items()}, repeats, block)


def measure_onnx_latency(paths: dict[str, str], target: Target, *, batch_size: int | None = None,
                         warmup: int | None = None, repeats: int | None = None, seed: int = 0,
                         feeds=None, rounds: int = ROUNDS) -> LatencyResult:
    """Time each ONNX model with onnxruntime as the target configures it, interleaved, on this machine.

    ``feeds(session, batch_size)`` gives the inputs to time with (token ids for a text model); without
    it (or when it returns None) the first input gets random normal values of the model's input shape.
    The ``repeats`` timed calls are split into ``rounds`` (odd) rounds, one round under
    ``rounds * ROUND_CALLS`` calls; the stats are the middle round's (:func:`~hwprune.runtimes.clock.middle_round`).

    Example:
        >>> import tempfile
        >>> from hwprune.target import load_target
        >>> with tempfile.TemporaryDirectory() as d:
        ...     dense = export_onnx(nn.Linear(256, 256), torch.zeros(1, 256), f"{d}/dense.onnx")
        ...     pruned = export_onnx(nn.Linear(256, 64), torch.zeros(1, 256), f"{d}/pruned.onnx")
        ...     r = measure_onnx_latency({"dense": dense, "pruned": pruned}, load_target("host-cpu"), repeats=20)
        >>> sorted(r.stats), r.stats["pruned"].runs, r.runtime
        (['dense', 'pruned'], 20, 'onnxruntime ... CPUExecutionProvider, 1 thread')
    """
    import onnxruntime as ort


    batch_size = batch_size or target.latency.batch_size
    warmup = target.latency.warmup if warmup is None else warmup
    repeats = repeats or target.latency.repeats
    providers, missing_note = provider_note(target)
    sessions = {k: ort_session(p, providers, target.onnxruntime.threads) for k, p in paths.items()}
    rng = np.random.default_rng(seed)
    feeds = {k: (feeds(s, batch_size) if feeds else None) or _input_for(s, batch_size, rng) for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(warmup):
            s.run(None, feeds[k])
    calls = {k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()}
    stats, round_ratios = timed_in_rounds(lambda i, n: interleaved_times(calls, n), repeats, rounds)
    used = sessions[next(iter(sessions))].get_providers()[0] if sessions else providers[0]
    threads = target.onnxruntime.threads or "default"
    runtime = f"onnxruntime {ort.__version__} {used}, {threads} thread{'s' if threads != 1 else ''}"
    on_target = target.is_local
    notes = []
    if not on_target:
        notes.append(
            f"measured on this machine, NOT on the target device '{target.device.name}' "
            f"({target.device.arch}): the target is not reachable from here (no RPC device configured)"
        )
    if missing_note:
        notes.append(f"target providers {missing_note}; used {used}")
    return LatencyResult(stats, batch_size, runtime, this_machine(),
                         on_target, "; ".join(notes), warmup, round_ratios)


# --- the ONNX format: writing a model, opening a session, comparing with torch ------------------------

OPSET = 17


def export_onnx(model: nn.Module, example_input, path: str | os.PathLike, *, dynamic_batch: bool = True,
                input_names=("input",), output_name: str = "output", dynamic_axes: dict | None = None) -> Path:
    """Write ``model`` as ONNX (opset 17, batch axis dynamic), atomically.

    ``example_input``: one tensor, or a tuple of the model's positional inputs named ``input_names``.
    ``dynamic_axes`` (torch.onnx's format) replaces the default, a dynamic batch axis on every input
    and the output.

    Uses torch's TorchScript-based exporter: on these models it is exact and about 15x faster than the
    dynamo exporter (0.3 s against 4.7 s on a small CNN).

    Example:
        >>> import tempfile
        >>> net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU())
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = export_onnx(net, torch.zeros(1, 1, 8, 8), f"{d}/model.onnx")
        ...     onnx_max_abs_diff(path, net, torch.randn(4, 1, 8, 8)) < 1e-5     # batch 4: the batch axis is dynamic
        True
    """
    model = model.eval()
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    names = list(input_names)
    if dynamic_axes is None and dynamic_batch:
        dynamic_axes = {**{n: {0: "batch"} for n in names}, output_name: {0: "batch"}}
    buf = io.BytesIO()
    with warnings.catch_warnings(), _stdout_from_cpp_dropped():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model, args, buf, dynamo=False, opset_version=OPSET,
                input_names=names, output_names=[output_name], dynamic_axes=dynamic_axes,
            )
        except RuntimeError as e:
            raise _export_error(model, e) from None
    return atomic_write_bytes(path, buf.getvalue())


@contextlib.contextmanager
def _stdout_from_cpp_dropped():
    """Drop what torch's C++ exporter writes to file descriptor 1 while it runs: on a failure it prints the
    whole TorchScript graph ("Torch IR graph at exception", tens of lines per layer) before raising, even
    under ``--quiet``; the error raised says what failed. Python's own ``sys.stdout`` is flushed first and
    left alone."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):  # no real descriptor 1 (an embedding program): nothing to drop
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


# What model libraries offer for export, keyed by the package their layers come from.
_EXPORT_FIXES = {
    "geffnet": "call geffnet.config.set_exportable(True) before geffnet.create_model",
    "efficientnet_pytorch": "call model.set_swish(memory_efficient=False) on the EfficientNet",
    "efficientnet_lite_pytorch": "call model.set_swish(memory_efficient=False) on the EfficientNet",
    "timm": "create the model with timm.layers.set_layer_config(exportable=True)",
}


def _export_error(model: nn.Module, e: RuntimeError):
    """A clear error for the usual ONNX failure with library models: a Python (custom autograd) op."""
    from ..errors import ExportError

    text = str(e)
    first = text.splitlines()[0] if text else type(e).__name__
    if "Couldn't export Python operator" not in text:
        if "to ONNX opset version" in first and "is not supported" in first:  # an aten op ONNX has no equivalent for
            return ExportError(
                f"ONNX export failed: {first}. Write that step with ops ONNX has (a channel shuffle as view, transpose, "
                f"view, which hwprune also prunes through), or replace the layer; pruning is not affected, only the "
                f"export needs it")
        return ExportError(f"ONNX export failed: {first}")
    op = first.rsplit(" ", 1)[-1]
    packages = {type(m).__module__.split(".")[0] for m in model.modules()}
    fixes = [fix for pkg, fix in _EXPORT_FIXES.items() if pkg in packages]
    return ExportError(
        f"ONNX export failed: the model runs the Python operator {op} (a custom autograd function, "
        f"which ONNX cannot represent). Use the library's export-friendly layers"
        + (f": {'; '.join(fixes)}" if fixes else " (most libraries have an 'exportable' or 'memory_efficient=False' switch)")
        + ". Pruning is not affected: only the export needs it"
    )


def ort_session(path: str | os.PathLike, providers=("CPUExecutionProvider",), threads: int = 1):
    """An onnxruntime session with the given providers (those not available here are dropped)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    available = set(ort.get_available_providers())
    use = [p for p in providers if p in available] or ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), so, providers=use)


@torch.no_grad()
def onnx_max_abs_diff(path: str | os.PathLike, model: nn.Module, inputs: torch.Tensor) -> float:
    """Largest absolute difference between onnxruntime's and torch's outputs on ``inputs``."""
    sess = ort_session(path)
    ort_out = sess.run(None, {sess.get_inputs()[0].name: inputs.numpy()})[0]
    torch_out = model.eval()(inputs).numpy()
    return float(np.max(np.abs(ort_out - torch_out)))
