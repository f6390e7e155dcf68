"""Measure the ``blocks`` section of a latency profile: each sparse layer shape's BSR kernel at a range
of block densities, and the same layer dense, on this machine.

The sparse layers are those :func:`hwprune.graph.blocks.block_groups` makes groups for (identical shapes
measured once). Every grid point is a Relax function built exactly as ``hwprune export --format tvm``
builds the layer (:func:`hwprune.runtimes.tvm.bsr.emit.emit_conv` / ``emit_linear``: im2col for a k x k conv,
then the hand-written BSR kernel) with a random weight and a random block mask that keeps exactly
``max(1, round(density * blocks))`` blocks; all points are compiled in one module for the target's
TVM target. The dense layer runs on the runtime of the width profile (onnxruntime's one-layer model,
or the hand-scheduled TVM kernel of :mod:`hwprune.runtimes.tvm.dense`). All calls take turns in the rounds of
:func:`hwprune.latency.measure.median_ms`; ms = median wall time of a call minus that of a trivial call of the
same runtime.

Only this machine: a remote device would need the dense reference and the rounds over RPC (not built).

Example:
    >>> prof = measure_block_profile([(model, x, "small-resnet", "digits")], load_target("host-cpu"),
    ...                              densities=[0.1, 0.5, 1.0], existing=Profile.load(path))   # doctest: +SKIP
    >>> prof.save(path)                                                                          # doctest: +SKIP
"""

from __future__ import annotations

from ..report.table import text_table

import copy
import datetime as _dt
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import ProfileError
from .profile_blocks import RUNTIME, BlockSection, BlockTable, block_key
from .profile import Profile
from .measure import ProfileSettings, median_ms, say, library_versions, machine_info
from ..target import Target, this_machine

DEFAULT_DENSITIES = (0.1, 0.3, 0.5, 0.7, 1.0)


def parse_densities(text: str) -> list[float]:
    """``"0.1,0.5,1"`` -> ``[0.1, 0.5, 1.0]``; each a kept fraction of blocks in (0, 1].

    Example:
        >>> parse_densities("1.0, 0.3,0.3")
        [0.3, 1.0]
    """
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ProfileError(f"--densities {text!r}: expected comma-separated numbers such as 0.1,0.3,0.5,1.0") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise ProfileError(f"--densities {text!r}: expected kept fractions of blocks in (0, 1], e.g. 0.1,0.3,0.5,1.0")
    return sorted(set(values))


def kept_counts(n_blocks: int, densities) -> list[int]:
    """Blocks kept at each density: ``round(density * n_blocks)``, at least one; duplicates merged.

    Example:
        >>> kept_counts(10, [0.01, 0.1, 0.5, 1.0])
        [1, 5, 10]
    """
    return sorted({min(n_blocks, max(1, int(round(d * n_blocks)))) for d in densities})


@dataclass
class _Shape:
    """One sparse layer shape to measure (first layer seen with it gives the geometry)."""

    key: str
    op: str
    shape: dict
    kind: str
    weight_shape: tuple[int, ...]
    block: tuple[int, int]
    x_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    conv: dict | None
    widths: tuple[int, int]
    counts: set[int] = field(default_factory=set)
    used_by: set[str] = field(default_factory=set)

    @property
    def matrix(self) -> tuple[int, int]:
        return int(self.weight_shape[0]), int(np.prod(self.weight_shape[1:]))

    @property
    def n_blocks(self) -> int:
        (o, k), (r, c) = self.matrix, self.block
        return -(-o // r) * -(-k // c)


def plan_block_shapes(models, target: Target, densities, batch: int, existing: BlockSection | None = None):
    """The sparse layer shapes of ``models`` (``[(model, example, model_name, data_name)]``), deduplicated:
    ``{key: _Shape}``. With ``existing``, a shape it already has is re-measured at the union of densities."""
    from ..graph.blocks import block_groups
    from ..budget.cost import layer_calls
    from ..runtimes.tvm.bsr.packing import conv_geometry

    shapes: dict[str, _Shape] = {}
    for model, example, model_name, _ in models:
        groups, _ = block_groups(model, example, target)
        calls = {name: (m, ins, outs) for name, m, ins, outs in layer_calls(model, (example,))}
        for g in groups:
            if g.name not in calls:
                raise ProfileError(f"layer '{g.name}' of {model_name}: not called in a forward pass on the example "
                                   "input, so its shape is unknown")
            m, ins, outs = calls[g.name]
            if g.layer_kind == "conv":
                op = "conv2d"
                shape = {"kernel": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
                         "dilation": list(m.dilation), "input_hw": [int(ins[2]), int(ins[3])]}
                conv, widths = conv_geometry(m), (m.in_channels, m.out_channels)
            else:
                op, shape, conv, widths = "linear", {}, None, (m.in_features, m.out_features)
            key = block_key(op, shape, g.matrix, g.block)
            s = shapes.get(key) or _Shape(key, op, shape, g.layer_kind, tuple(g.weight_shape), tuple(g.block),
                                          (batch,) + tuple(ins[1:]), (batch,) + tuple(outs[1:]), conv, widths)
            s.counts.update(kept_counts(s.n_blocks, densities))
            s.used_by.add(f"{model_name}:{g.name}")
            shapes[key] = s
    if existing is not None:
        for key, s in shapes.items():
            old = existing.tables.get(key)
            if old is not None:
                s.counts.update(old.kept_blocks or kept_counts(s.n_blocks, old.densities))
                s.used_by.update(old.used_by)
    return shapes


def _bsr_module(shapes: dict[str, _Shape], rng):
    """One Relax module: a function per (shape, kept count) built as the export builds the layer, plus
    ``overhead`` (one trivial kernel). Returns ``(mod, {name: (key, count, x_shape, schedule)})``."""
    from tvm import relax

    from ..runtimes.tvm.bsr.emit import emit_conv, emit_linear
    from ..runtimes.tvm.bsr.packing import SparseLayer

    bb = relax.BlockBuilder()
    points = {}
    for i, s in enumerate(shapes.values()):
        grid = (-(-s.matrix[0] // s.block[0]), -(-s.matrix[1] // s.block[1]))
        for j, count in enumerate(sorted(s.counts)):
            mask = np.zeros(s.n_blocks, dtype=bool)
            mask[rng.choice(s.n_blocks, size=count, replace=False)] = True
            weight = (rng.standard_normal(s.weight_shape) * 0.1).astype(np.float32)
            layer = SparseLayer.from_dense(s.key, s.kind, weight, s.block, mask.reshape(grid), conv=s.conv)
            name = f"b{i}_{j}"
            x = relax.Var("x", relax.TensorType(s.x_shape, "float32"))
            with bb.function(name, [x]):
                with bb.dataflow():
                    if s.kind == "conv":
                        pad = list(s.conv["padding"])
                        out, done = emit_conv(bb, x, list(s.x_shape), list(s.out_shape), layer, s.conv["stride"],
                                              pad, s.conv["dilation"], "bsr_" + name)
                    else:
                        out, done = emit_linear(bb, x, list(s.x_shape), layer, "bsr_" + name)
                    out = bb.emit_output(out)
                bb.emit_func_output(out)
            points[name] = (s.key, count, s.x_shape, done.schedule)
    x = relax.Var("x", relax.TensorType((1, 8), "float32"))
    with bb.function("overhead", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.add(x, x))
        bb.emit_func_output(out)
    return bb.get(), points


def _onnxruntime_dense_calls(shapes, target: Target, batch: int, rng, progress):
    """Callables running each shape's dense layer (and ``overhead``) on onnxruntime, and its label."""
    import onnxruntime as ort
    from onnx import helper

    from ..runtimes.onnxruntime import provider_note
    from .measure import onnx_layer, onnx_model

    providers, _ = provider_note(target)
    so = ort.SessionOptions()
    if target.onnxruntime.threads:
        so.intra_op_num_threads, so.inter_op_num_threads = target.onnxruntime.threads, 1
    blobs = {key: onnx_layer(s.op, s.shape, s.widths, batch, rng) for key, s in shapes.items()}
    blobs["overhead"] = (onnx_model([helper.make_node("Relu", ["x"], ["y"])], [], (batch, 8)),
                         {"x": np.ones((batch, 8), np.float32)})
    calls, used = {}, None
    for key, (blob, feed) in blobs.items():
        sess = ort.InferenceSession(blob, so, providers=providers)
        used = sess.get_providers()[0]
        calls[key] = (lambda sess=sess, feed=feed: sess.run(None, feed))
    threads = target.onnxruntime.threads or "default"
    return calls, (f"onnxruntime {ort.__version__} {used}, {threads} thread{'s' if threads != 1 else ''} "
                   "(one-layer model: Conv + ReLU, or Gemm)")


def _tvm_dense_calls(shapes, target: Target, batch: int, rng, progress):
    """Callables running each shape's dense layer (and ``overhead``) with hwprune's TVM build, and its label."""
    import tvm

    from ..runtimes.tvm import build as tvm_build
    from ..runtimes.tvm.dense import schedule_label
    from ..runtimes.tvm.dense.layers import layer_module

    lanes, calls = tvm_build.vector_lanes(target), {}
    keys = list(shapes)
    mod, in_shapes = layer_module([(shapes[k].op, shapes[k].shape, shapes[k].widths) for k in keys], batch=batch,
                                  lanes=lanes, parallel=target.onnxruntime.threads != 1)
    say(progress, f"[profile] compiling {len(keys)} dense TVM layers")
    ex, _ = tvm_build.compile_relax(mod, target)
    vm = tvm_build.virtual_machine(ex)
    for name, shp in in_shapes.items():
        f, arg = vm[name], tvm.runtime.tensor(rng.standard_normal(shp).astype(np.float32))
        calls["overhead" if name == "overhead" else keys[int(name[1:])]] = (lambda f=f, arg=arg: f(arg))
    return calls, f"TVM {tvm.__version__}, {schedule_label('hand', lanes)} (hwprune.runtimes.tvm.dense)"


# the dense reference of a block profile, by the width profile's runtime name (hwprune.runtimes.RUNTIMES)
DENSE_CALLS = {"onnxruntime": _onnxruntime_dense_calls, "tvm": _tvm_dense_calls}


def _check_same_machine(old: Profile, target: Target) -> None:
    here = machine_info(None, target)
    problems = [f"machine {k} {old.machine.get(k)!r} vs {here.get(k)!r}" for k in ("hostname", "cpu", "remote")
                if old.machine.get(k) != here.get(k)]
    if old.target != target.name:
        problems.insert(0, f"target '{old.target}' vs '{target.name}'")
    if problems:
        where = f"{old.path}: " if old.path else ""
        raise ProfileError(f"{where}cannot add a blocks section: the profile was measured elsewhere "
                           f"({'; '.join(problems)}); write a new profile with --out")


def measure_block_profile(models, target: Target, *, densities=DEFAULT_DENSITIES, runtime: str | None = None,
                          settings: ProfileSettings | None = None, existing: Profile | None = None,
                          append: bool = False, progress=print) -> Profile:
    """Measure the blocks section for ``models`` on this machine and return the profile to write.

    ``existing`` (the profile already at the output path) keeps its width tables unchanged, and their
    runtime is the dense one (``runtime``, default onnxruntime, only without width tables); ``append``
    also keeps its block tables (shapes measured again here are replaced).
    """
    from ..runtimes.tvm import build as tvm_build

    settings = settings or ProfileSettings()
    if not target.is_local:
        raise ProfileError(f"target '{target.name}': {target.not_here()}: block "
                           "profiles are measured here only (no RPC path yet), so one measured here would be mislabelled")
    if not tvm_build.runs_here(target):
        raise ProfileError(f"target '{target.name}' builds {tvm_build.target_arch(target)} code, which cannot run here")
    if existing is not None:
        _check_same_machine(existing, target)
        if existing.layers:
            theirs = existing.runtime.get("name")
            if runtime is not None and runtime != theirs:
                raise ProfileError(f"{existing.path}: its width tables were measured with {theirs}, and the dense "
                                   f"layers of a blocks section are timed on the same runtime: drop --runtime {runtime} "
                                   "or write another profile with --out")
            runtime = theirs
    runtime = runtime or "onnxruntime"
    if runtime not in ("onnxruntime", "tvm"):
        raise ProfileError(f"dense runtime {runtime!r}: expected onnxruntime or tvm")
    tvm = tvm_build.require_tvm()
    batch = settings.batch_size or target.latency.batch_size
    old = existing.blocks if existing is not None and append else None
    if old is not None and old.batch_size != batch:
        raise ProfileError(f"{existing.path}: cannot append: its blocks section was measured at batch {old.batch_size}, "
                           f"not {batch}; measure without --append (replaces the blocks section) or use --out")
    shapes = plan_block_shapes(models, target, densities, batch, old)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    mod, points = _bsr_module(shapes, rng)
    say(progress, f"[profile] compiling {len(points)} BSR functions ({len(shapes)} sparse layer shapes) for "
         f"{tvm_build.target_dict(target)}")
    ex, seconds = tvm_build.compile_relax(mod, target)
    vm = tvm_build.virtual_machine(ex)
    calls = {}
    for name, (_, _, x_shape, _) in points.items():
        f, arg = vm[name], tvm.runtime.tensor(rng.standard_normal(x_shape).astype(np.float32))
        calls[("bsr", name)] = (lambda f=f, arg=arg: f(arg))
    f_over, a_over = vm["overhead"], tvm.runtime.tensor(np.ones((1, 8), np.float32))
    calls[("bsr", "overhead")] = lambda: f_over(a_over)
    dense, dense_label = DENSE_CALLS[runtime](shapes, target, batch, rng, progress)
    calls.update({("dense", k): f for k, f in dense.items()})
    say(progress, f"[profile] timing {len(calls)} functions in {settings.rounds} rounds")
    ms = median_ms(calls, settings)
    bsr_over, dense_over = ms[("bsr", "overhead")], ms[("dense", "overhead")]
    tables = dict(old.tables) if old is not None else {}
    for key, s in shapes.items():
        mine = sorted((count, name) for name, (k, count, _, _) in points.items() if k == key)
        sched = points[mine[0][1]][3]
        tables[key] = BlockTable(
            key, s.op, s.shape, s.matrix, s.block,
            int(s.out_shape[0] * np.prod(s.out_shape[2:])) if s.kind == "conv" else int(np.prod(s.x_shape[:-1])),
            [c / s.n_blocks for c, _ in mine], [max(ms[("bsr", n)] - bsr_over, 0.0) for _, n in mine],
            max(ms[("dense", key)] - dense_over, 0.0), [c for c, _ in mine],
            f"{sched.strategy} (tile {sched.tile}, chains {sched.chains}) at the lowest density",
            sorted(s.used_by))
    blocks_by_kind = {}
    for kind in ("conv", "linear"):
        b = target.shape_for(kind, "blocks")
        if b is not None:
            blocks_by_kind[kind] = [b.rows, b.cols]
    models_info = [{"model": mn, "data": dn, "input_shape": list(ex_.shape)} for _, ex_, mn, dn in models]
    if old is not None:
        models_info = list(old.info.get("models", [])) + [m for m in models_info if m not in old.info.get("models", [])]
    info = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "block": blocks_by_kind, "batch_size": batch, "tvm": tvm.__version__, "target": tvm_build.target_dict(target),
        "schedule": "hand-written BSR kernels (hwprune.runtimes.tvm.bsr.kernels), im2col for k x k convs, one thread: "
                    "built as hwprune export --format tvm builds each sparse layer (bias and activation not included)",
        "statistic": "ms = median wall time of one call of a function holding the layer minus that of a trivial call "
                     "on the same runtime (bsr_overhead_ms / dense_overhead_ms); random weights and a random block "
                     "mask keeping exactly kept_blocks blocks (densities = kept_blocks / blocks)",
        "bsr_overhead_ms": round(bsr_over, 6), "dense_overhead_ms": round(dense_over, 6),
        "warmup": settings.warmup, "repeats": settings.repeats, "rounds": settings.rounds,
        "build_seconds": round(seconds, 2), "models": models_info,
    }
    section = BlockSection(tables, RUNTIME, dense_label, info)
    say(progress, f"[profile] measured {len(points)} BSR points and {len(shapes)} dense layers in "
         f"{time.perf_counter() - t0:.1f} s")
    if existing is not None:
        prof = copy.copy(existing)
        prof.blocks = section
        return prof
    return Profile(
        target=target.name, created=info["created"], machine=machine_info(None, target),
        measured_on=this_machine(), on_target_device=True,
        runtime={"name": runtime, "label": dense_label}, libraries=library_versions(), batch_size=batch,
        warmup=settings.warmup, repeats=settings.repeats, call_overhead_ms=dense_over, layers={},
        statistic="no width tables yet (hwprune profile --target TARGET --append adds them); see blocks.statistic",
        models=[], blocks=section,
    )


def summary(profile: Profile) -> str:
    """A table of the blocks section: each sparse layer shape, its densities and ms."""
    s = profile.blocks
    rows = [("sparse layer shape", "densities", "ms lowest..1.0", "dense ms", "used by")]
    for t in s.tables.values():
        used = ", ".join(t.used_by[:2]) + (f" (+{len(t.used_by) - 2})" if len(t.used_by) > 2 else "")
        rows.append((t.key, " ".join(f"{d:.2f}" for d in t.densities), f"{t.ms[0]:.4f}..{t.ms[-1]:.4f}",
                     f"{t.dense_ms:.4f}", used))
    return text_table(rows) + (f"\nsparse: {s.runtime}, TVM {s.info.get('tvm')}; dense: {s.dense_runtime}; "
                               f"{profile.measured_on}; batch {s.batch_size}")
