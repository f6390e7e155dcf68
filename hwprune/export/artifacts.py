"""``hwprune export``: a fit run folder → an artifact (ONNX, scipy npz, TVM shared library), checked.

:func:`load_run` rebuilds the pruned model from the run folder alone (``plan.json`` says which model
and how to build it, ``pruned.pt`` holds the weights); :func:`export_run` writes one format into
``RUN_DIR/export/<format>/`` (or ``out``) with a ``reference.npz`` (inputs and the outputs torch computed
for them) and, last, a ``manifest.json`` (a folder without one is an interrupted export), then loads the artifact in a fresh process with its runtime
alone and compares (:mod:`hwprune.export.check`).

Example:
    >>> result = export_run("runs/demo", "tvm")                  # doctest: +SKIP
    >>> result.check["max_abs_diff"] < 1e-4                       # doctest: +SKIP
    True
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from . import FORMAT_NAMES
from ..errors import ExportError, HwpruneError, PlanError, TargetError
from ..io import atomic_write_bytes, atomic_write_json, check_writable_folder, folder_lock, fsync_dir
from ..apply.granularity import granularity
from ..apply.plan import Plan, apply_plan
from ..apply.reload import load_weights, read_weights_file
from ..runtimes.tvm.build import require_tvm
from ..training.checkpoint import Checkpointer

@dataclass(frozen=True)
class Format:
    """One export format: whether it needs TVM installed, whether it takes only block runs (sparse
    weights), its writer ``write(run, out_dir, options) -> ExportResult``, whether ``--measure`` can time
    what it writes, and whether it is compiled for a batch size (``--batch-size``)."""

    name: str
    needs_tvm: bool
    sparse_only: bool
    write: Any
    measures: bool = False
    batched: bool = False


FORMATS: dict[str, Format] = {}
RUN_FILES = ("plan.json", "pruned.pt", "run.json", "report.json", "report.md", "model.onnx", "dense.onnx", "checkpoint.pt")
STAGING = ".hwprune-export-"  # the hidden folder inside out_dir an export is written and checked in
TOLERANCE = 1e-4  # largest |artifact - torch| accepted (float32 sums in another order)


@dataclass
class LoadedRun:
    """A run folder's pruned model (eval mode, trained weights), plan, target and check inputs.

    ``model`` is what gets exported; ``inputs`` are its positional inputs (batch first), named
    ``input_names``. For a sentence encoder, ``model`` wraps the pruned transformer (token ids and mask
    in, pooled embedding out) and ``pruned`` is the transformer itself, the module the plan names
    layers in; ``layer_prefix`` is its name inside ``model``.
    """

    run_dir: Path
    model: nn.Module
    plan: Plan
    target: Any
    inputs: tuple[torch.Tensor, ...]
    inputs_from: str
    input_names: tuple[str, ...] = ("input",)
    output_name: str = "output"
    pruned: nn.Module | None = None
    layer_prefix: str = ""
    dynamic_axes: dict | None = None  # ONNX: None = a dynamic batch axis

    def __post_init__(self):
        if isinstance(self.inputs, torch.Tensor):
            self.inputs = (self.inputs,)
        if self.pruned is None:
            self.pruned = self.model

    def batch(self, size: int) -> tuple[torch.Tensor, ...]:
        """``size`` samples of the check inputs (repeated when there are fewer)."""
        reps = -(-size // len(self.inputs[0]))
        return tuple(x.repeat(reps, *[1] * (x.dim() - 1))[:size] for x in self.inputs)

    def reference_inputs(self, xs: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
        """The inputs as ``reference.npz`` stores them: ``input.<position>.<name>`` (dtype kept)."""
        return {f"input.{i}.{n}": x.numpy() for i, (n, x) in enumerate(zip(self.input_names, xs))}

    def sparse_layers(self):
        """The plan's block-sparse layers, named as in ``model``."""
        from ..runtimes.tvm.bsr.packing import sparse_layers

        layers = sparse_layers(self.pruned, self.plan)
        for layer in layers:
            layer.name = self.layer_prefix + layer.name
        return layers


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise ExportError(f"{path}: cannot read {what}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: {what} is not valid JSON (line {e.lineno}): {e.msg}") from None


def load_run(run_dir: str | os.PathLike, target: str | None = None, n_inputs: int = 16, *,
             need_blocks: str | None = None) -> LoadedRun:
    """Rebuild the pruned model of a finished ``hwprune fit`` run.

    ``target`` overrides the run's target (a name or a YAML path); ``n_inputs`` real test inputs of
    the run's dataset are kept for the checks (random inputs if the dataset cannot be loaded here).
    ``need_blocks``: the format asking for a block plan (refused on a channel plan, before any work).
    """
    from ..data import load_dataset
    from ..models import build_model
    from ..target import load_target

    run = Path(run_dir)
    if run.is_file():
        hint = f", here {run.parent}" if run.name in RUN_FILES else ""
        raise ExportError(f"{run}: a file, not a run folder; give the folder hwprune fit wrote{hint}")
    if not run.is_dir():
        raise ExportError(f"{run}: no such run folder (expected a folder written by hwprune fit)")
    try:
        plan = Plan.load(run / "plan.json") if (run / "plan.json").is_file() else None
    except PlanError as e:
        raise ExportError(f"{e}; plan.json was changed or cut short after hwprune fit wrote it (pruned.pt keeps a copy "
                          f"of the plan: hwprune.Plan.from_dict(torch.load('{run / 'pruned.pt'}', weights_only=True)"
                          f"['plan']).save('{run / 'plan.json'}') restores it), or run the fit again (another --out)") from None
    if plan is None:
        if not Checkpointer(run).exists():
            # stopped before its first checkpoint (a budget found unreachable once the model was measured, or
            # killed early): --resume would only repeat that; the folder takes a corrected command
            raise ExportError(f"{run}: no plan.json and no checkpoint; its run stopped before training anything. Run "
                              f"hwprune fit again with corrected flags (--out {run} takes the new run)")
        raise ExportError(f"{run}: no plan.json; the run has not reached its projection yet "
                          f"(finish it with hwprune fit --resume {run})")
    if need_blocks and not granularity(plan.granularity).sparse:
        raise PlanError(f"{run}: --format {need_blocks} writes block-sparse layers, but this run pruned channels (its "
                        "model is already a smaller dense model: use --format onnx), or run hwprune fit --granularity blocks")
    weights = run / "pruned.pt"
    if not weights.is_file() and (run / "report.json").is_file():  # finished: --resume would change nothing
        raise ExportError(f"{run}: no pruned.pt, though its run finished (report.json is there): the file was moved or "
                          "removed; put it back, or run the fit again (another --out)")
    if not weights.is_file():
        raise ExportError(f"{run}: no pruned.pt; the run has not finished fine-tuning (hwprune fit --resume {run})")
    args = _read_json(run / "run.json", "run.json") if (run / "run.json").is_file() else {}
    if not isinstance(args, dict) or not isinstance(args.get("args", {}), dict):
        raise ExportError(f"{run / 'run.json'}: expected an object with an 'args' object (the fit's settings), found "
                          f"{type(args.get('args') if isinstance(args, dict) else args).__name__}; it was changed after "
                          "hwprune fit wrote it: remove it (export then uses the target named in plan.json) or run the "
                          "fit again (another --out)")
    args = args.get("args", {})
    name, model_args = plan.meta.get("model"), plan.meta.get("model_args")
    if not name or not isinstance(model_args, dict):
        raise ExportError(f"{run / 'plan.json'}: meta has no 'model'/'model_args', so the model cannot be rebuilt "
                          "from the folder (a run started from Python): export from Python with "
                          "hwprune.runtimes.onnxruntime.export_onnx(result.model, example_input, 'model.onnx')")
    from ..text.job import TEXT_MODELS

    if name in TEXT_MODELS:
        from ..text.minilm import load_minilm

        model, tokenizer = load_minilm()
    else:
        try:
            model = build_model(name, **model_args)
        except TypeError as e:  # model_args that the builder does not take (or lacks)
            raise ExportError(f"{run / 'plan.json'}: meta.model_args {model_args} do not build model '{name}' ({e}); "
                              "plan.json was changed after hwprune fit wrote it: run the fit again (another --out)") from None
    try:
        apply_plan(model, plan)
    except HwpruneError as e:
        raise ExportError(f"{run / 'plan.json'}: the plan does not replay onto a fresh '{name}': {e}. plan.json was "
                          "changed after hwprune fit wrote it, or comes from another run: run the fit again (another --out)") from None
    saved = read_weights_file(weights, ExportError)
    load_weights(model, saved["state_dict"], f"{weights} (with {run / 'plan.json'})")
    model.eval()
    refs = [target] if target else [args.get("target"), plan.meta.get("target")]
    tgt, errors = None, []
    for ref in [r for r in refs if r]:
        try:
            tgt = load_target(ref)
            break
        except TargetError as e:
            errors.append(str(e))
    if tgt is None and target:
        raise ExportError(f"--target {target}: {'; '.join(errors)}")
    if tgt is None:
        raise ExportError(f"{run}: cannot load the run's target ({'; '.join(errors) or 'none recorded'}); give --target")
    if name in TEXT_MODELS:
        return _text_run(run, model, plan, tgt, tokenizer, seed=int(args.get("seed") or 0), n_inputs=n_inputs)
    shape = list(plan.input_shape)
    try:
        bundle = load_dataset(plan.meta["data"], seed=int(args.get("seed") or 0), image_size=args.get("image_size"))
        n = min(n_inputs, len(bundle.test))
        inputs = torch.stack([torch.as_tensor(bundle.test[i][0]) for i in range(n)])
        source = f"{n} real test inputs of '{plan.meta['data']}'"
    except Exception as e:  # no data here: the check still runs, on random inputs, and says so
        inputs = torch.randn([n_inputs] + shape[1:], generator=torch.Generator().manual_seed(0))
        source = f"{n_inputs} random normal inputs (the dataset '{plan.meta.get('data')}' did not load: {e})"
    return LoadedRun(run, model, plan, tgt, inputs.float(), source)


def _text_run(run: Path, model: nn.Module, plan: Plan, target, tokenizer, *, seed: int, n_inputs: int) -> LoadedRun:
    """A sentence-encoder run: the pruned transformer inside its pooling wrapper, checked on held-out
    sentences (the same ones the run's report measured) padded to the latency length, 128 tokens."""
    from ..tasks.distill import LATENCY_SEQ_LEN
    from ..text.job import pydoc_split
    from ..text.minilm import DYNAMIC_AXES, INPUT_NAMES, OUTPUT_NAME, SentenceEncoder

    _, held_out = pydoc_split(seed)
    batch = tokenizer(held_out[:n_inputs], padding="max_length", truncation=True, max_length=LATENCY_SEQ_LEN,
                      return_tensors="pt")
    inputs = (batch["input_ids"].long(), batch["attention_mask"].long())
    source = f"{len(inputs[0])} held-out sentences padded to {LATENCY_SEQ_LEN} tokens"
    return LoadedRun(run, SentenceEncoder(model).eval(), plan, target, inputs, source, INPUT_NAMES, OUTPUT_NAME,
                     pruned=model, layer_prefix="encoder.", dynamic_axes=DYNAMIC_AXES)


@dataclass
class ExportResult:
    """What an export wrote and how its fresh-process check went."""

    format: str
    out_dir: Path
    files: list[Path]
    manifest: dict[str, Any]
    check: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.format}: wrote {', '.join(str(f) for f in self.files)}"]
        if self.check is not None:
            if self.check.get("ok"):
                lines.append(f"checked in a fresh process ({self.check['runtime']}): max |artifact - torch| = "
                             f"{self.check['max_abs_diff']:.2e} on {self.check['inputs']} "
                             f"({'within' if self.check['max_abs_diff'] <= TOLERANCE else 'ABOVE'} {TOLERANCE:g})")
            else:
                lines.append(f"fresh-process check FAILED: {self.check.get('error')}")
        lines += self.notes
        return "\n".join(lines)


def _save_reference(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    buf = io.BytesIO()  # floats as float32; integer inputs (token ids) keep their type
    np.savez(buf, **{k: np.ascontiguousarray(v, dtype=None if np.issubdtype(np.asarray(v).dtype, np.integer) else np.float32)
                     for k, v in arrays.items()})
    return atomic_write_bytes(path, buf.getvalue())


def _fresh_check(kind: str, artifact: Path, reference: Path, runtime: str, inputs: str, emulated=None) -> dict:
    """The artifact loaded in a fresh process (an emulated one for another CPU), compared with torch; an
    ExportError when it fails to load or differs by more than :data:`TOLERANCE`."""
    from .check import check_in_fresh_process

    check = check_in_fresh_process(kind, artifact, reference, emulated=emulated)
    check.update(runtime=runtime if emulated is None else f"{runtime} ({emulated.arch} wheel), in {emulated.describe()}",
                 inputs=inputs)
    if not check.get("ok"):
        raise ExportError(f"{artifact}: the fresh-process check ({check['runtime']}) failed: {check.get('error')}")
    if check["max_abs_diff"] > TOLERANCE:
        raise ExportError(f"{artifact}: differs from torch by {check['max_abs_diff']:.3g} (more than {TOLERANCE:g}) on "
                          f"{inputs} ({check['runtime']})")
    return check


def _checked(result: ExportResult, kind: str, artifact: Path, reference: Path, runtime: str, inputs: str,
             emulated=None) -> ExportResult:
    result.check = _fresh_check(kind, artifact, reference, runtime, inputs, emulated)
    return result


def safe_name(layer: str) -> str:
    """A file-name-safe layer name (``layers.0.conv1`` → ``layers.0.conv1``; other characters → ``_``)."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in layer) or "model"


@torch.no_grad()
def export_onnx_format(run: LoadedRun, out_dir: Path, check: bool = True) -> ExportResult:
    """The pruned model as ONNX (dynamic batch): sliced for a channel plan, masked for a block plan."""
    from ..runtimes.onnxruntime import export_onnx

    path = export_onnx(run.model, tuple(x[:1] for x in run.inputs), out_dir / "model.onnx",
                       input_names=run.input_names, output_name=run.output_name, dynamic_axes=run.dynamic_axes)
    ref = _save_reference(out_dir / "reference.npz", {**run.reference_inputs(run.inputs), "output": run.model(*run.inputs).numpy()})
    manifest = {"format": "onnx", "file": "model.onnx", "opset": 17,
                "inputs": {n: [(run.dynamic_axes or {}).get(n, {0: "batch"}).get(d, size) for d, size in enumerate(x.shape)]
                           for n, x in zip(run.input_names, run.inputs)},
                "granularity": run.plan.granularity, "reference": "reference.npz", "hwprune": __version__,
                "how_to_load": "sess = onnxruntime.InferenceSession('model.onnx'); y = sess.run(None, {"
                               + ", ".join(f"'{n}': x{i}" for i, n in enumerate(run.input_names))
                               + "})[0]  # inputs as 'inputs' says (any batch), prepared as reference.npz's"}
    atomic_write_json(out_dir / "manifest.json", manifest)
    result = ExportResult("onnx", out_dir, [path, out_dir / "manifest.json", ref], manifest)
    if granularity(run.plan.granularity).sparse:
        result.notes.append("note: a block plan's ONNX model keeps dense shapes (zero blocks); onnxruntime gains no speed from them")
    if not check:
        return result
    _checked(result, "onnx", path, ref, "onnxruntime", run.inputs_from)
    return _checked_on_device_arch(result, run, path, ref)


def _checked_on_device_arch(result: ExportResult, run: LoadedRun, path: Path, ref: Path) -> ExportResult:
    """For a target of another CPU architecture, the ONNX model once more under that architecture's
    onnxruntime in emulation (when set up): the same file its device will load, never timed."""
    from ..runtimes.emulation import emulated_python

    emulated = emulated_python(run.target.device.arch)
    if emulated is None:
        return result
    check = _fresh_check("onnx", path, ref, "onnxruntime", run.inputs_from, emulated)
    result.notes.append(f"also checked with {emulated.arch} onnxruntime in {emulated.describe()}: max |artifact - torch| "
                        f"= {check['max_abs_diff']:.2e}")
    return result


@torch.no_grad()
def export_npz_format(run: LoadedRun, out_dir: Path, check: bool = True) -> ExportResult:
    """Every sparse layer's weight as a scipy BSR (CSR for 1x1 blocks) ``.npz``, biases in ``biases.npz``,
    and ``manifest.json`` (layer, kind, shape, padded shape, format, block, density, conv geometry)."""
    import scipy.sparse as sp

    layers = run.sparse_layers()
    files, entries, biases = [], [], {}
    for layer in layers:
        buf = io.BytesIO()
        sp.save_npz(buf, layer.to_scipy(), compressed=False)
        fname = f"{safe_name(layer.name)}.npz"
        files.append(atomic_write_bytes(out_dir / fname, buf.getvalue()))
        entries.append({**layer.manifest(), "file": fname})
        if layer.bias is not None:
            biases[layer.name] = layer.bias
    if biases:
        buf = io.BytesIO()
        np.savez(buf, **biases)
        files.append(atomic_write_bytes(out_dir / "biases.npz", buf.getvalue()))
    manifest = {
        "format": "hwprune-sparse-npz", "version": 1, "hwprune": __version__, "target": run.target.name,
        "layers": entries, "biases": "biases.npz" if biases else None, "reference": "reference.npz",
        "how_to_load": "scipy.sparse.load_npz(file) gives the weight as a (padded_shape) BSR/CSR matrix; crop to shape "
                       "[:O, :K]. A conv's matrix multiplies im2col columns ordered as weight.reshape(C_out, -1).",
    }
    # Each layer's input and output on real data, for the scipy-only check.
    captured: dict[str, np.ndarray] = {}
    hooks = []
    for layer in layers:
        def hook(module, args, out, name=layer.name):
            captured["in:" + name] = args[0].numpy()
            captured["out:" + name] = out.numpy()
        hooks.append(run.model.get_submodule(layer.name).register_forward_hook(hook))
    try:
        run.model(*(x[:4] for x in run.inputs))
    finally:
        for h in hooks:
            h.remove()
    ref = _save_reference(out_dir / "reference.npz", captured)
    files.append(ref)
    files.append(atomic_write_json(out_dir / "manifest.json", manifest))  # last: its presence marks a complete export
    result = ExportResult("npz", out_dir, files, manifest)
    return _checked(result, "npz", out_dir, ref, "scipy", f"each sparse layer's input on {run.inputs_from[:60]}") if check else result


@torch.no_grad()
def measure_tvm_export(run: LoadedRun, build, xs: tuple[torch.Tensor, ...], *, repeats: int | None = None,
                       warmup: int | None = None, tvm_name: str = "TVM model.so (BSR kernels)",
                       tvm_runtime: str = "sparse layers on hwprune's BSR kernels, attention matmuls, softmax and GELU "
                                          "on its hand kernels, every other op TVM's untuned default",
                       tvm_threads: int | str = 1, ort_name: str = "onnxruntime, dense shapes") -> dict[str, Any]:
    """Time the compiled model against onnxruntime running ``run.model`` (for a block plan: the dense
    shapes, as its ``model.onnx``, where onnxruntime computes the zero blocks like any others; for a
    channel plan: the same sliced model), on the same inputs, taking turns, on this machine. The
    defaults name the BSR library (no BSR kernel has parallel loops: 1 thread); the dense path passes its
    own names. Returns the manifest's ``measured`` entry.
    """
    import tempfile

    import onnxruntime as ort
    import tvm

    from ..runtimes.clock import timed_in_rounds
    from ..runtimes.onnxruntime import export_onnx, interleaved_times, ort_session, provider_note
    from ..target import this_machine

    tgt = run.target
    repeats = repeats or tgt.latency.repeats
    warmup = tgt.latency.warmup if warmup is None else warmup
    providers, _ = provider_note(tgt)
    with tempfile.TemporaryDirectory(prefix="hwprune-measure-") as tmp:
        path = export_onnx(run.model, xs, Path(tmp) / "dense-shapes.onnx", input_names=run.input_names,
                           output_name=run.output_name, dynamic_batch=False)
        sess = ort_session(path, providers, tgt.onnxruntime.threads)
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)}
    vm = tvm.runtime.vm.VirtualMachine(build.executable, tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(x.numpy())) for x in xs]
    main = vm["main"]
    calls = {tvm_name: lambda: main(*args), ort_name: lambda: sess.run(None, feeds)}
    for call in calls.values():
        for _ in range(warmup):
            call()
    # three rounds, the middle one by ratio kept, as every latency hwprune reports (timed_in_rounds)
    stats, round_ratios = timed_in_rounds(lambda i, n: interleaved_times(calls, n), repeats)
    med = {k: v.median_ms for k, v in stats.items()}
    threads = tgt.onnxruntime.threads or "default"
    return {
        "what": "wall time of one call of the whole model, median of the timed calls, both runtimes taking turns on "
                "the same inputs, in rounds: the round with the median ratio is kept",
        "batch_size": int(xs[0].shape[0]), "input_shapes": [list(x.shape) for x in xs], "repeats": repeats, "warmup": warmup,
        "median_ms": {k: round(v, 4) for k, v in med.items()},
        "p10_p90_ms": {k: [round(v.p10_ms, 4), round(v.p90_ms, 4)] for k, v in stats.items()},
        "ratio": round(med[tvm_name] / med[ort_name], 4),
        "rounds": len(round_ratios), "round_ratios": [round(1.0 / r[ort_name], 4) for r in round_ratios],  # TVM / ORT
        "runtimes": {tvm_name: f"TVM {tvm.__version__}, {dict(tgt.tvm.target)}, {tvm_runtime}",
                     ort_name: f"onnxruntime {ort.__version__} {sess.get_providers()[0]}, {threads} thread"
                               f"{'s' if threads != 1 else ''}"},
        "threads": {tvm_name: tvm_threads, ort_name: threads},
        "measured_on": this_machine(),
        "on_target": bool(tgt.is_local),
        **({} if tgt.is_local else {"note": f"measured on this machine, NOT on the target device '{tgt.device.name}'"}),
    }


@torch.no_grad()
def export_tvm_format(run: LoadedRun, out_dir: Path, batch_size: int = 1, check: bool = True,
                      measure: bool = False) -> ExportResult:
    """The model compiled with TVM for the target as ``model.so``: a block run's sparse layers on BSR
    kernels, a channel run's smaller dense model on hwprune's dense TVM path. ``measure``: also time it
    against onnxruntime here (not for a cross-compiled library)."""
    if batch_size < 1:
        raise ExportError(f"--batch-size {batch_size}: expected a positive batch size")
    if not granularity(run.plan.granularity).sparse:
        return export_tvm_dense(run, out_dir, batch_size, check, measure)
    return export_tvm_bsr(run, out_dir, batch_size, check, measure)


def _tvm_manifest_head(fmt: str, run: LoadedRun, xs, compile_seconds: float) -> dict:
    """What every TVM library's manifest.json starts with: format, versions, target, inputs, reference."""
    tvm = require_tvm()
    return {
        "format": fmt, "version": 1, "file": "model.so", "hwprune": __version__, "tvm": tvm.__version__,
        "target": {"name": run.target.name, "tvm": dict(run.target.tvm.target)},
        "inputs": [{"name": n, "shape": list(x.shape), "dtype": str(x.numpy().dtype)} for n, x in zip(run.input_names, xs)],
        "reference": "reference.npz",
        "compile_seconds": round(compile_seconds, 2),
    }


@torch.no_grad()
def export_tvm_dense(run: LoadedRun, out_dir: Path, batch_size: int = 1, check: bool = True,
                     measure: bool = False) -> ExportResult:
    """A channel run's sliced model compiled with the dense TVM path (:func:`~hwprune.runtimes.tvm.dense.build_dense`:
    hwprune's hand schedule where every layer is supported, else TVM's default pipeline) for the run's
    target, as ``model.so``, checked in a fresh process when it runs here. ``measure``: also time it
    against onnxruntime on the same sliced model, here (only when the library runs on this machine)."""
    from ..errors import ModelError
    from ..runtimes.tvm.build import runs_here, target_arch
    from ..runtimes.tvm.dense import build_dense

    tvm = require_tvm()
    xs = run.batch(batch_size)
    if len(xs) != 1:
        raise ExportError(f"{run.run_dir}: --format tvm compiles one-input models on the dense path; this model takes "
                          f"{len(xs)} inputs ({', '.join(run.input_names)}): use --format onnx")
    try:
        build = build_dense(run.model, xs[0], run.target, schedule="hand")
        why_default = None
    except ModelError as e:  # a layer the hand schedule does not cover: TVM's own lowering instead
        build, why_default = build_dense(run.model, xs[0], run.target, schedule="default"), str(e)
    so = build.export(out_dir / "model.so")
    ref = _save_reference(out_dir / "reference.npz", {**run.reference_inputs(xs), "output": run.model(*xs).numpy()})
    manifest = {
        **_tvm_manifest_head("hwprune-tvm-dense", run, xs, build.build_seconds),
        "scheduling": build.label + (f" (the hand schedule does not cover this model: {why_default})" if why_default else ""),
        "how_to_load": "lib = tvm.runtime.load_module('model.so'); vm = tvm.runtime.vm.VirtualMachine(lib, tvm.cpu()); "
                       "y = vm['main'](tvm.runtime.tensor(x))  # a tensor, or a one-element tuple: y[0]",
    }
    measured = None
    if measure and runs_here(run.target):
        # build_dense gives the hand schedule parallel loops unless the target asks for 1 thread
        threads = 1 if build.schedule == "hand" and run.target.onnxruntime.threads == 1 else "TVM runtime default"
        measured = manifest["measured"] = measure_tvm_export(
            run, build, xs, tvm_name="TVM model.so (dense path)", tvm_runtime=build.label, tvm_threads=threads,
            ort_name="onnxruntime, same sliced model")
    atomic_write_json(out_dir / "manifest.json", manifest)
    result = ExportResult("tvm", out_dir, [so, out_dir / "manifest.json", ref], manifest)
    result.notes.append(f"the sliced dense model (channel run) compiled in {build.build_seconds:.1f} s for "
                        f"{dict(run.target.tvm.target)} with the {build.label}; batch size {batch_size} (the library is "
                        "specialised to it)")
    if measured is not None:
        result.notes.append(_measured_note(measured, batch_size))
    elif measure:
        result.notes.append(f"not measured: the library is built for {target_arch(run.target)} "
                            f"('{run.target.device.name}') and cannot run on this machine")
    return _checked_for_target(result, run, so, ref, f"TVM {tvm.__version__} runtime",
                               f"a batch of {batch_size} from {run.inputs_from}", check)


def _checked_for_target(result: ExportResult, run: LoadedRun, artifact: Path, ref: Path, runtime: str, inputs: str,
                        check: bool) -> ExportResult:
    """The fresh-process check of a TVM library: here when it is built for this machine's CPU, else in an
    emulated Python of its architecture when one is set up (:mod:`hwprune.runtimes.emulation`), else none."""
    from ..runtimes.emulation import BUILD_HINT, emulated_python
    from ..runtimes.tvm.build import runs_here, target_arch

    if not check:
        return result
    if runs_here(run.target.tvm.target):
        return _checked(result, "tvm", artifact, ref, runtime, inputs)
    arch = target_arch(run.target.tvm.target)
    emulated = emulated_python(arch)
    if emulated is None:
        result.notes.append(f"built for {arch} ({run.target.device.name}): not loadable on this machine and no {arch} "
                            f"emulation is set up, so not checked here ({BUILD_HINT} sets it up)")
        return result
    result.notes.append(f"checked under {arch} emulation, not timed: emulated time says nothing about the device")
    return _checked(result, "tvm", artifact, ref, runtime, inputs, emulated=emulated)


@torch.no_grad()
def export_tvm_bsr(run: LoadedRun, out_dir: Path, batch_size: int = 1, check: bool = True,
                   measure: bool = False) -> ExportResult:
    """A block run compiled with TVM for the target, every sparse layer on its BSR kernel, as ``model.so``."""
    from .tvm_bsr import build_sparse_module

    tvm = require_tvm()
    layers = run.sparse_layers()
    xs = run.batch(batch_size)
    build = build_sparse_module(run.model, xs, layers, run.target.tvm.target)
    so = build.export(out_dir / "model.so", cross_compiler=run.target.tvm.cross_compiler)
    ref = _save_reference(out_dir / "reference.npz", {**run.reference_inputs(xs), "output": run.model(*xs).numpy()})
    manifest = {
        **_tvm_manifest_head("hwprune-tvm-bsr", run, xs, build.compile_s),
        "layers": [{"layer": l.name, "kernel": l.schedule.strategy, "tile": l.schedule.tile, "chains": l.schedule.chains,
                    "im2col": l.im2col, "matrix": [l.spec.out_features, l.spec.in_features], "block": list(l.spec.block),
                    "stored_blocks": l.spec.nnz, "batch_columns": l.spec.columns} for l in build.layers],
        "scheduling": "sparse layers: hand-written BSR kernels (hwprune.runtimes.tvm.bsr.kernels); batched matmuls of two "
                      "activations, softmax and GELU: hand kernels (hwprune.runtimes.tvm.dense.kernels); every other op: TVM's "
                      "default lowering, not tuned. No kernel has parallel loops: one thread",
        "how_to_load": "lib = tvm.runtime.load_module('model.so'); vm = tvm.runtime.vm.VirtualMachine(lib, tvm.cpu()); "
                       "y = vm['main'](*[tvm.runtime.tensor(x) for x in inputs]).numpy()  # in the order and shapes of 'inputs'",
    }
    prediction, why_not = predicted_sparse_time(run.target, layers, build.layers, batch_size,
                                                cnn=run.pruned is run.model)
    if prediction is not None:
        manifest["predicted_sparse_layers"] = prediction
    measured = None
    if measure and not run.target.tvm.cross_compiler:
        measured = manifest["measured"] = measure_tvm_export(run, build, xs)
    atomic_write_json(out_dir / "manifest.json", manifest)
    result = ExportResult("tvm", out_dir, [so, out_dir / "manifest.json", ref], manifest)
    result.notes.append(f"{len(build.layers)} sparse layers on BSR kernels; compiled in {build.compile_s:.1f} s for "
                        f"{dict(run.target.tvm.target)}; batch size {batch_size} (the library is specialised to it)")
    if prediction is not None:
        result.notes.append(f"predicted sparse-layer time {prediction['total_ms']:.4f} ms (dense "
                            f"{prediction['dense_total_ms']:.4f} ms) from {prediction['profile']}: a prediction from "
                            f"the profile measured on {prediction['measured_on']}, not a measurement of model.so")
    elif why_not:
        result.notes.append(f"no predicted sparse-layer time: {why_not}")
    if measured is not None:
        result.notes.append(_measured_note(measured, batch_size))
    elif measure:
        result.notes.append(f"not measured: the library is cross-compiled with {run.target.tvm.cross_compiler} for "
                            f"'{run.target.device.name}', which cannot be reached from here")
    declared = (run.target.shape_for(kind, "blocks") for kind in ("conv", "linear"))
    wanted = {(b.rows, b.cols) for b in declared if b is not None}
    planned = {tuple(l.block) for l in layers}
    if wanted and not planned <= wanted:
        result.notes.append(f"note: the plan's blocks {sorted(planned)} are not the blocks target '{run.target.name}' "
                            f"declares {sorted(wanted)}; the kernels follow the plan")
    return _checked_for_target(result, run, so, ref, f"TVM {tvm.__version__} runtime",
                               f"a batch of {batch_size} from {run.inputs_from}", check)


def _measured_note(measured: dict, batch_size: int) -> str:
    """The printed line of a ``measured`` manifest entry: where, both medians and their ratio."""
    (t_name, t_ms), (o_name, o_ms) = measured["median_ms"].items()
    return (f"measured (batch {batch_size}, {measured['measured_on']}): {t_name} {t_ms:.3f} ms, {o_name} "
            f"{o_ms:.3f} ms: {measured['ratio']:.3f}x" + (f"; {measured['note']}" if "note" in measured else ""))


def predicted_sparse_time(target, layers, rewritten, batch_size: int, *, cnn: bool = True) -> tuple[dict | None, str]:
    """The sparse layers' time predicted from the target's latency profile (its ``blocks`` section), for
    ``manifest.json``; or ``(None, why not)``. Nothing here is measured: the export does not time the library.
    ``cnn``: False for a sentence encoder, whose layers ``hwprune profile`` does not measure (the hint says so).

    ``layers``: the :class:`~hwprune.runtimes.tvm.bsr.packing.SparseLayer` list; ``rewritten``: what the build put on
    kernels (:class:`~hwprune.runtimes.tvm.bsr.emit.RewrittenLayer`, with each kernel's stored blocks).
    """
    from ..errors import ProfileError
    from ..latency.budget import profile_measured_where
    from ..latency.profile_blocks import block_key
    from ..latency.profile import Profile

    path = target.profile_path()
    hint = (f"hwprune profile --target {target.ref} --granularity blocks --model MODEL --append" if cnn else
            "hwprune profile measures the layers of CNN models only; time this library with hwprune export --measure")
    if path is None or not path.is_file():
        return None, f"target '{target.name}' has no latency profile{f' at {path}' if path else ''} (measure: {hint})"
    try:
        prof = Profile.load(path)
    except ProfileError as e:
        return None, str(e)
    if prof.blocks is None:
        return None, f"{path} has no blocks section (measure: {hint})"
    if prof.blocks.batch_size != batch_size:
        return None, (f"{path}'s blocks section was measured at batch {prof.blocks.batch_size}, the library is built "
                      f"for batch {batch_size}")
    by_name = {l.name: l for l in layers}
    rows, missing = [], []
    for done in rewritten:
        layer = by_name[done.name]
        if layer.kind == "conv":
            c = layer.conv
            shape = {"kernel": list(c["kernel"]), "stride": list(c["stride"]), "padding": list(c["padding"]),
                     "dilation": list(c["dilation"]), "input_hw": list(done.input_hw or ())}
            op = "conv2d"
        else:
            op, shape = "linear", {}
        key = block_key(op, shape, layer.shape, done.spec.block)
        table = prof.blocks.tables.get(key)
        density = done.spec.nnz / (layer.grid[0] * layer.grid[1])  # the blocks the kernel runs over
        if table is None or not table.covers(density):
            missing.append(f"{done.name} ({key}, density {density:.3f})")
            continue
        rows.append({"layer": done.name, "table": key, "density": round(density, 6),
                     "predicted_ms": round(table.predict(density), 6), "dense_ms": round(table.dense_ms, 6)})
    if missing:
        return None, f"{path} does not cover {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} (measure: {hint})"
    return {
        "what": "a prediction from the latency profile (BSR kernel time interpolated over block density, per sparse "
                "layer; bias, activations and the other layers not included), not a measurement of model.so",
        "profile": str(path), "profile_created": prof.blocks.info.get("created"),
        "measured_on": profile_measured_where(prof),  # not the stored "this machine: ...", true only where it was written
        "machine": prof.machine, "runtime": prof.blocks.runtime, "dense_runtime": prof.blocks.dense_runtime,
        "batch_size": prof.blocks.batch_size, "layers": rows,
        "total_ms": round(sum(r["predicted_ms"] for r in rows), 6),
        "dense_total_ms": round(sum(r["dense_ms"] for r in rows), 6),
    }, ""


def export_run(run_dir: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None, *, target: str | None = None,
               batch_size: int = 1, check: bool = True, measure: bool = False) -> ExportResult:
    """Export a finished fit run folder as ``fmt`` (onnx | npz | tvm) into ``out`` (default
    ``RUN_DIR/export/<fmt>``), then check the artifact in a fresh process. ``measure`` (tvm): time the
    library against onnxruntime on this machine and put the numbers in ``manifest.json``.

    Example:
        >>> print(export_run("runs/demo", "npz"))                   # doctest: +SKIP
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    if measure and not spec.measures:
        # refused rather than ignored: a user who asked for a timing must not read "no timing" as "fine"
        raise ExportError(f"--measure works with --format {', '.join(n for n, f in FORMATS.items() if f.measures)} "
                          f"only (it times the compiled library against onnxruntime here); --format {fmt} writes a "
                          "file that is not timed: drop --measure")
    if batch_size != 1 and not spec.batched:  # likewise: a batch size that changes nothing must not pass unnoticed
        raise ExportError(f"--batch-size {batch_size}: only --format "
                          f"{', '.join(n for n, f in FORMATS.items() if f.batched)} compiles for a batch size; --format {fmt} "
                          f"{'has a dynamic batch axis' if fmt == 'onnx' else 'stores weights, with no batch'}: drop --batch-size")
    if spec.needs_tvm:
        require_tvm()  # before the model is rebuilt: a one-line error if the extra is missing
    run = load_run(run_dir, target=target, need_blocks=fmt if spec.sparse_only else None)
    out_dir = check_writable_folder(Path(out) if out else run.run_dir / "export" / fmt)
    # Written and checked in a hidden folder inside out_dir, then moved into place: an export that fails, is
    # stopped or is killed leaves an earlier export in out_dir as it was.
    with folder_lock(out_dir, "hwprune export"):
        for stale in out_dir.glob(STAGING + "*"):  # left by an export killed with SIGKILL
            shutil.rmtree(stale, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(prefix=STAGING, dir=out_dir))
        try:
            try:
                result = spec.write(run, stage, {"check": check, "batch_size": batch_size, "measure": measure})
            except HwpruneError as e:  # named where it would have been written; the staging folder goes
                e.args = (f"{str(e).replace(str(stage), str(out_dir))} (nothing was written to {out_dir}: an earlier "
                          "export there is as it was)",)
                raise
            return _publish(result, stage, out_dir)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _publish(result: ExportResult, stage: Path, out_dir: Path) -> ExportResult:
    """Move a finished, checked export from ``stage`` into ``out_dir``. Every format writes manifest.json: a
    folder with one is a complete export. An earlier export's goes first and the new one comes last, so the
    folder never looks complete while it holds files of two exports."""
    files = sorted((f for f in stage.iterdir() if f.is_file()), key=lambda f: f.name == "manifest.json")
    for f in files:
        if (out_dir / f.name).is_dir():
            raise ExportError(f"{out_dir / f.name}: a folder is in the way of the exported file of that name; move it, "
                              f"or choose another --out (nothing was written to {out_dir})")
    (out_dir / "manifest.json").unlink(missing_ok=True)
    for f in files:
        os.replace(f, out_dir / f.name)
    fsync_dir(out_dir)
    result.files = [out_dir / f.relative_to(stage) if f.is_relative_to(stage) else f for f in result.files]
    result.out_dir = out_dir
    return result


for _format in (
    Format("onnx", False, False, lambda run, out, o: export_onnx_format(run, out, o["check"])),
    Format("npz", False, True, lambda run, out, o: export_npz_format(run, out, o["check"])),
    Format("tvm", True, False, lambda run, out, o: export_tvm_format(run, out, o["batch_size"], o["check"], o["measure"]),
           measures=True, batched=True),
):
    FORMATS[_format.name] = _format
assert tuple(FORMATS) == FORMAT_NAMES, "hwprune.export.FORMAT_NAMES lists the registered formats"
