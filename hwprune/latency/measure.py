"""Measure a latency profile: every layer shape of a model at a grid of kept widths, on the target's runtime.

* ``onnxruntime`` (the default for a local target): each grid point is a one-layer ONNX model (Conv +
  ReLU, which onnxruntime fuses, or Gemm) run with the target's providers and threads.
* ``tvm``: each grid point is the hand-scheduled kernel of :mod:`hwprune.runtimes.tvm.dense`, all in one
  library; timed here, or on an RPC device (compiled here, uploaded, timed there with TVM's
  ``time_evaluator``). This is the only way to profile a device that is not this machine.

All sessions / functions take turns in rounds, so that drift on a shared machine spreads over all
points; the statistic is the median of all timed calls.

Example:
    >>> prof = measure_profile([(model, x, "small-resnet", "digits")], load_target("host-cpu"))   # doctest: +SKIP
    >>> prof.save("profiles/host-cpu.json")                                                      # doctest: +SKIP
"""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..runtimes import runtime as runtime_named
from ..runtimes.clock import take_turns, wall_clock, warm_up
from ..errors import ProfileError
from ..graph import discover_groups
from .shapes import layer_uses
from .profile import LayerTable, Profile
from ..runtimes.tvm.rpc import RemoteSpec
from ..target import Target, host_description, this_machine



@dataclass
class ProfileSettings:
    """How densely and how long to measure."""

    max_points: int = 8  # grid points per axis (both ends always included)
    warmup: int = 5
    repeats: int = 40  # timed calls per point, over all rounds
    rounds: int = 4
    batch_size: int | None = None  # default: the target's latency.batch_size


def subsample(values, most: int) -> list[int]:
    """At most ``most`` values, evenly spread, always keeping the first and the last.

    Example:
        >>> subsample(range(8, 81, 8), 4)
        [8, 32, 56, 80]
    """
    values = sorted(set(int(v) for v in values))
    if len(values) <= most:
        return values
    idx = np.unique(np.round(np.linspace(0, len(values) - 1, most)).astype(int))
    return [values[i] for i in idx]


def plan_tables(models, target: Target, settings: ProfileSettings, existing: Profile | None = None):
    """Layer shapes to measure and their grids: ``{key: (op, shape, grid, used_by)}``."""
    plan: dict[str, list] = {}
    for model, example, model_name, _ in models:
        groups = discover_groups(model, example, target=target)
        uses, _, _ = layer_uses(model, example, groups)
        for u in uses:
            entry = plan.setdefault(u.key, [u.op, u.shape, [set() for _ in u.grids], []])
            for axis, g in enumerate(u.grids):
                entry[2][axis].update(subsample(g, settings.max_points))
            entry[3].append(f"{model_name}:{u.name}")
    out = {}
    for key, (op, shape, grid_sets, used_by) in plan.items():
        if existing is not None and key in existing.layers:  # never shrink what an earlier run covered
            old = existing.layers[key]
            for axis, g in enumerate(old.grid):
                grid_sets[axis].update(g)
            used_by = sorted(set(used_by) | set(old.used_by))
        grid = [sorted(s) for s in grid_sets]
        out[key] = (op, shape, grid, sorted(set(used_by)))
    return out


def _points(tables):
    """Every (key, index tuple, op, shape, counts) to measure."""
    for key, (op, shape, grid, _) in tables.items():
        for idx in np.ndindex(*[len(g) for g in grid]):
            yield key, idx, op, shape, tuple(g[i] for g, i in zip(grid, idx))


# --- onnxruntime ------------------------------------------------------------------------------------

def onnx_layer(op: str, shape: dict, counts, batch: int, rng) -> tuple[bytes, dict]:
    from onnx import helper, numpy_helper

    def init(name, shp):
        return numpy_helper.from_array((rng.standard_normal(shp) * 0.1).astype(np.float32), name)

    if op == "linear":
        k, j = counts
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)]
        inits = [init("w", (j, k)), init("b", (j,))]
        x_shape = (batch, k)
    else:
        cin, cout = (counts[0], counts[0]) if op == "depthwise" else counts
        kh, kw = shape["kernel"]
        groups = cin if op == "depthwise" else 1
        h, w = shape["input_hw"]
        attrs = dict(kernel_shape=[kh, kw], strides=list(shape["stride"]), dilations=list(shape["dilation"]),
                     pads=[shape["padding"][0], shape["padding"][1]] * 2, group=groups)
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], **attrs), helper.make_node("Relu", ["c"], ["y"])]
        inits = [init("w", (cout, cin // groups, kh, kw)), init("b", (cout,))]
        x_shape = (batch, cin, h, w)
    return onnx_model(nodes, inits, x_shape), {"x": rng.standard_normal(x_shape).astype(np.float32)}


def onnx_model(nodes, inits, x_shape) -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    # IR version 8 / opset 17: what onnxruntime 1.31 and hwprune's own export use
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


_LAYER_OPS = {"Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul"}


def _measure_ort(tables, target: Target, settings: ProfileSettings, batch: int, remote, progress):
    """Kernel ms per point from onnxruntime's profiler (the layer node alone), and the per-call overhead."""
    from onnx import helper

    from ..runtimes.onnxruntime import provider_note

    import onnxruntime as ort

    providers, missing = provider_note(target)
    rng = np.random.default_rng(0)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="hwprune-ortprof-") as tmp:
        def session(blob, profile: bool):
            so = ort.SessionOptions()
            if target.onnxruntime.threads:
                so.intra_op_num_threads = target.onnxruntime.threads
                so.inter_op_num_threads = 1
            if profile:
                so.enable_profiling = True
                so.profile_file_prefix = os.path.join(tmp, f"p{len(runs)}")
            return ort.InferenceSession(blob, so, providers=providers)

        for key, idx, op, shape, counts in _points(tables):
            blob, feed = onnx_layer(op, shape, counts, batch, rng)
            runs[(key, idx)] = (session(blob, True), feed)
        overhead_blob = onnx_model([helper.make_node("Relu", ["x"], ["y"])], [], (batch, 8))
        runs[("overhead", ())] = (session(overhead_blob, False), {"x": np.ones((batch, 8), np.float32)})
        say(progress, f"[profile] {len(runs) - 1} one-layer onnxruntime sessions, {settings.rounds} rounds")

        def call(k):
            sess, feed = runs[k]
            return lambda: sess.run(None, feed)

        wall = median_ms({k: call(k) for k in runs}, settings)
        samples = {("overhead", ()): wall[("overhead", ())]}
        for k, (sess, _) in runs.items():
            if k != ("overhead", ()):
                samples[k] = _node_ms(sess.end_profiling(), settings.warmup)
    used = next(iter(runs.values()))[0].get_providers()[0]
    threads = target.onnxruntime.threads or "default"
    runtime = {"name": "onnxruntime", "version": ort.__version__, "providers": [used], "threads": threads,
               "label": f"onnxruntime {ort.__version__} {used}, {threads} thread{'s' if threads != 1 else ''}"}
    if missing:
        runtime["note"] = f"target providers {missing}"
    statistic = ("ms = mean of the middle 80% of the layer node's time in onnxruntime's profiler (reorders and "
                 "per-call overhead excluded); call_overhead_ms = median wall time of a one-Relu session.run")
    return samples, runtime, statistic


def _node_ms(trace_file: str, warmup: int) -> float:
    """The layer node's time per run from an onnxruntime profile trace (warm-up runs dropped)."""
    import json

    with open(trace_file) as f:
        events = json.load(f)
    os.unlink(trace_file)
    durs = [e["dur"] for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
            and e.get("args", {}).get("op_name") in _LAYER_OPS]
    durs = np.asarray(durs[warmup:] or durs, dtype=np.float64)
    if durs.size == 0:
        raise ProfileError(f"onnxruntime's profiler recorded no layer node in {trace_file}")
    # durations are whole microseconds: a trimmed mean resolves below 1 us where a median cannot
    lo, hi = np.percentile(durs, [10, 90])
    mid = durs[(durs >= lo) & (durs <= hi)]
    return float((mid if mid.size else durs).mean()) / 1e3


def median_ms(calls: dict, settings: ProfileSettings) -> dict:
    """Median ms per key: warm-up, then ``settings.rounds`` turns over all keys (:func:`hwprune.runtimes.clock.take_turns`)."""
    warm_up(calls.values(), settings.warmup)
    per_round = max(1, -(-settings.repeats // settings.rounds))
    times = take_turns({k: wall_clock(f) for k, f in calls.items()}, per_round * settings.rounds, per_round)
    return {k: float(np.median(v)) for k, v in times.items()}


# --- TVM --------------------------------------------------------------------------------------------

def _measure_tvm(tables, target: Target, settings: ProfileSettings, batch: int, remote: RemoteSpec | None, progress):
    """Function ms per point of one TVM library holding every point (``p0``, ``p1``, ... in the order of
    :func:`_points`), here or on the RPC device, and the per-call overhead."""
    samples, rt, statistic = _tvm_samples(tables, target, settings, batch, remote, progress)
    by_point = {(key, idx): samples[f"p{i}"] for i, (key, idx, *_) in enumerate(_points(tables))}
    by_point[("overhead", ())] = samples[("overhead", ())]
    return by_point, rt, statistic


def _tvm_samples(tables, target: Target, settings: ProfileSettings, batch: int, remote: RemoteSpec | None, progress):
    import tvm

    from ..runtimes.tvm import build as tvm_build
    from ..runtimes.tvm.rpc import RemoteSession
    from ..runtimes.tvm.dense import schedule_label
    from ..runtimes.tvm.dense.layers import layer_module

    points = list(_points(tables))
    lanes = tvm_build.vector_lanes(target)
    mod, shapes = layer_module([(op, shape, counts) for _, _, op, shape, counts in points], batch=batch, lanes=lanes,
                               parallel=target.onnxruntime.threads != 1)
    say(progress, f"[profile] compiling {len(points)} one-layer TVM functions for {tvm_build.target_dict(target)}")
    ex, seconds = tvm_build.compile_relax(mod, target)
    names = list(shapes)
    rng = np.random.default_rng(0)
    data = {n: rng.standard_normal(shapes[n]).astype(np.float32) for n in names}
    label = schedule_label("hand", lanes)
    runtime = {"name": "tvm", "version": tvm.__version__, "schedule": label, "target": tvm_build.target_dict(target),
               "threads": 1 if target.onnxruntime.threads == 1 else (target.onnxruntime.threads or "default"),
               "build_seconds": round(seconds, 2), "label": f"TVM {tvm.__version__}, {label}"}
    statistic = ("ms = median time_evaluator time of a function holding the layer's one kernel, minus "
                 "call_overhead_ms (the same for a function with one trivial kernel)")
    if remote is None:
        if not tvm_build.runs_here(target):
            raise ProfileError(f"target '{target.name}' builds {tvm_build.target_arch(target)} code; profile it on the "
                               "device with --rpc HOST:PORT or --tracker HOST:PORT --key KEY")
        vm = tvm_build.virtual_machine(ex)
        dev = tvm.cpu()
        inputs = {n: tvm.runtime.tensor(data[n]) for n in names}
        return _time_functions(vm, dev, names, inputs, settings), runtime, statistic
    with tempfile.TemporaryDirectory(prefix="hwprune-profile-") as tmp:
        lib = tvm_build.export_library(ex, Path(tmp) / "profile_layers.so", target)
        with RemoteSession(remote) as sess:
            say(progress, f"[profile] uploading {lib.stat().st_size / 1e6:.1f} MB to the {remote.describe()}")
            vm = sess.load_vm(lib)
            inputs = {n: sess.tensor(data[n]) for n in names}
            return _time_functions(vm, sess.device, names, inputs, settings), runtime, statistic


def _time_functions(vm, dev, names, inputs, settings: ProfileSettings) -> dict:
    """Median ms per function with ``time_evaluator`` (on the device that holds ``vm``), in rounds."""
    per_round = max(1, -(-settings.repeats // settings.rounds))
    samplers = {}
    for n in names:
        warm_up([lambda n=n: vm[n](inputs[n])], settings.warmup)
        ev = vm.time_evaluator(n, dev, number=1, repeat=per_round)
        samplers[n] = lambda k, ev=ev, n=n: [float(t) * 1e3 for t in ev(inputs[n]).results][:k]
    times = take_turns(samplers, per_round * settings.rounds, per_round)
    return {(("overhead", ()) if n == "overhead" else n): float(np.median(v)) for n, v in times.items()}


# How each runtime times the layer points of a profile: (ms per point with the per-call overhead, the
# runtime's label, the statistic), keyed like hwprune.runtimes.RUNTIMES.
LAYER_TIMERS = {"onnxruntime": _measure_ort, "tvm": _measure_tvm}


# --- the profile ------------------------------------------------------------------------------------

def say(progress, msg):
    if progress:
        progress(msg)


def library_versions() -> dict[str, str]:
    out = {"hwprune": __version__, "python": platform.python_version()}
    for mod in ("torch", "numpy", "onnx", "onnxruntime", "tvm"):
        try:
            out[mod] = str(importlib.import_module(mod).__version__)
        except Exception:  # an optional backend may be missing
            pass
    return out


def machine_info(remote: RemoteSpec | None, target: Target) -> dict:
    """The machine a profile was measured on (for a remote device: what can be known of it)."""
    if remote is not None:
        return {"remote": remote.describe(), "host": remote.host, "key": remote.key,
                "arch": target.device.arch, "device": target.device.name,
                "note": "arch and device are the target's declaration; the RPC server does not report its CPU"}
    cpu = host_description()
    return {"cpu": cpu.split(" (")[0], "arch": platform.machine(), "cores": os.cpu_count(),
            "hostname": platform.node(), "os": platform.platform()}


def check_where(target: Target, runtime: str, remote: RemoteSpec | None):
    """Refuse a profile that would not be the target device's (before anything is loaded or measured);
    returns the runtime's spec."""
    rt_spec = runtime_named(runtime)
    if not target.is_local and remote is None:
        raise ProfileError(
            f"target '{target.name}' ({target.path or 'no file'}): {target.not_here()}, and no RPC device is given: a "
            f"profile measured here would be this machine's, not the target's. Profile on the device with "
            f"--rpc HOST:PORT (or --tracker HOST:PORT --key KEY) and --runtime tvm"
            + (", or, if this machine is the device, correct device.arch" if target.device.local else ""))
    if remote is not None and not rt_spec.remote:
        raise ProfileError(f"an RPC device runs TVM libraries only: --runtime {runtime} cannot be used with --rpc / "
                           "--tracker (use --runtime tvm)")
    return rt_spec


def measure_profile(models, target: Target, *, runtime: str = "onnxruntime", remote: RemoteSpec | None = None,
                    settings: ProfileSettings | None = None, existing: Profile | None = None, progress=print) -> Profile:
    """Measure the layer tables of ``models`` (``[(model, example, model_name, data_name)]``) on the target.

    A target that is not this machine is only profiled on its own device (``remote``); hwprune never
    writes a profile of one machine under another's name.
    """
    settings = settings or ProfileSettings()
    rt_spec = check_where(target, runtime, remote)
    batch = settings.batch_size or target.latency.batch_size
    if existing is not None:
        _check_compatible(existing, target, runtime, batch, remote)
    tables = plan_tables(models, target, settings, existing)
    t0 = time.perf_counter()
    by_point, rt, statistic = LAYER_TIMERS[runtime](tables, target, settings, batch, remote, progress)
    overhead = by_point.pop(("overhead", ()))
    # onnxruntime's node times are already net of the call; TVM's function times are not
    subtract = 0.0 if rt_spec.net_of_call else overhead
    layers = dict(existing.layers) if existing is not None else {}
    for key, (op, shape, grid, used_by) in tables.items():
        ms = np.zeros([len(g) for g in grid])
        for idx in np.ndindex(*ms.shape):
            ms[idx] = max(by_point[(key, idx)] - subtract, 0.0)
        layers[key] = LayerTable(key, op, shape, grid, ms, used_by)
    models_info = [{"model": mn, "data": dn, "input_shape": list(ex.shape)} for _, ex, mn, dn in models]
    if existing is not None:
        models_info = existing.models + [m for m in models_info if m not in existing.models]
    say(progress, f"[profile] measured {len(by_point)} points of {len(tables)} layer shapes in "
         f"{time.perf_counter() - t0:.1f} s; per-call overhead {overhead:.4f} ms")
    return Profile(
        target=target.name, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        machine=machine_info(remote, target),
        measured_on=remote.describe() if remote is not None else this_machine(),
        on_target_device=remote is not None or target.is_local, runtime=rt, libraries=library_versions(), batch_size=batch,
        warmup=settings.warmup, repeats=settings.repeats, call_overhead_ms=overhead, layers=layers,
        models=models_info, statistic=statistic,
        blocks=existing.blocks if existing is not None else None,  # --append of width tables keeps the blocks
    )


def _check_compatible(old: Profile, target: Target, runtime: str, batch: int, remote) -> None:
    """Appending to a profile is allowed only for the same target, runtime, batch and machine."""
    problems = incompatibilities(old, target, runtime, batch, remote)
    if problems:
        where = f"{old.path}: " if old.path else ""
        raise ProfileError(f"{where}cannot append: the profile was measured differently ({'; '.join(problems)}). "
                           "Write a new profile (without --append) or use --out")


def incompatibilities(old: Profile, target: Target, runtime: str, batch: int, remote) -> list[str]:
    """How ``old`` was measured differently from a measurement of ``target`` here (or on ``remote``) with
    ``runtime`` at ``batch``: its tables and these would not describe the same thing ([] when they would)."""
    here = machine_info(remote, target)
    problems = []
    if old.target != target.name:
        problems.append(f"target '{old.target}' vs '{target.name}'")
    if old.runtime.get("name") != runtime:
        problems.append(f"runtime {old.runtime.get('name')} vs {runtime}")
    if old.batch_size != batch:
        problems.append(f"batch size {old.batch_size} vs {batch}")
    for k in ("hostname", "cpu", "remote"):
        if old.machine.get(k) != here.get(k):
            problems.append(f"machine {k} {old.machine.get(k)!r} vs {here.get(k)!r}")
    return problems
