"""MiniLM in 16x1 weight blocks: the TVM build against onnxruntime, at several sparsities, batch 1 and 8.

For each sparsity the pretrained all-MiniLM-L6-v2 is cut as ``hwprune fit --model minilm --granularity
blocks`` cuts it (``fluctuation`` on 512 training sentences, the exact number of 16x1 blocks of its 36
linears, ranked across layers), without the distillation: the time of a call depends on which blocks
are kept, not on their values. Each model is then built as ``hwprune export --format tvm`` builds it
(every sparse linear on a BSR kernel; attention products, softmax and GELU on hand kernels; the rest
TVM's untuned default) and timed with the export's ``--measure``: ``model.so`` against onnxruntime on
the same model with dense shapes (the zero blocks cost onnxruntime as much as any others), taking turns
on the same inputs (held-out sentences padded to 128 tokens), in one process, on this machine.
Sparsity 0 keeps every block: the BSR kernels at density 1, against onnxruntime's dense GEMMs.

Reproduce (about 10 minutes on 2 cores with the defaults):
    python benchmarks/bench_minilm_blocks.py
    python benchmarks/bench_minilm_blocks.py --sparsities 0.5 --batches 1 --repeats 20    # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hwprune.graph.blocks import BlockIndex, block_groups, mask_blocks  # noqa: E402
from hwprune.budget import Budget  # noqa: E402
from hwprune.export.artifacts import LoadedRun, measure_tvm_export  # noqa: E402
from hwprune.export.tvm_bsr import build_sparse_module  # noqa: E402
from hwprune.apply.plan import Plan  # noqa: E402
from hwprune.regularizers import RegContext, build_regularizer  # noqa: E402
from hwprune.target import load_target  # noqa: E402
from hwprune.text.job import pydoc_split  # noqa: E402
from hwprune.text.minilm import INPUT_NAMES, OUTPUT_NAME, SentenceEncoder, load_minilm  # noqa: E402


def cut(sparsity: float, target, train: list[str], tokenizer):
    """A fresh MiniLM with ``sparsity`` of its blocks removed as the fit removes them (no distillation),
    and its block plan."""
    model, _ = load_minilm()
    groups, _ = block_groups(model, None, target)
    if sparsity == 0:
        return model, Plan.from_groups(groups, {g.name: np.arange(g.size) for g in groups}, [1, 128])
    ids = [tokenizer(s, truncation=True, max_length=128)["input_ids"] for s in train[:512]]
    index = BlockIndex(model, groups)
    reg = build_regularizer("fluctuation", RegContext(model, index, keep_units=index.n_units), {})

    def forward(n):  # one sentence at a time: no padding in the statistics
        with torch.no_grad():
            for s in ids[:n]:
                x = torch.as_tensor([s])
                model(input_ids=x, attention_mask=torch.ones_like(x))

    reg.calibrate(forward)
    keep = reg.project(groups, Budget("sparsity", sparsity)).keep
    reg.finalize(groups, keep)
    mask_blocks(model, groups, keep)
    return model, Plan.from_groups(groups, keep, [1, 128])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsities", default="0,0.3,0.5,0.7,0.9", help="fractions of the blocks removed")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=50, help="timed calls of each runtime (in blocks of 10, taking turns)")
    ap.add_argument("--target", default="host-cpu")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    target = load_target(args.target)
    _, tokenizer = load_minilm()
    train, held_out = pydoc_split(seed=0)
    rows = []
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        model, plan = cut(sparsity, target, train, tokenizer)
        enc = SentenceEncoder(model).eval()
        kept = sum(len(g.keep) for g in plan.groups) / sum(g.size for g in plan.groups)
        for batch in [int(b) for b in args.batches.split(",")]:
            tok = tokenizer(held_out[:batch], padding="max_length", truncation=True, max_length=128, return_tensors="pt")
            xs = (tok["input_ids"].long(), tok["attention_mask"].long())
            # the export's view of the model: the wrapper, the plan on the transformer inside it
            run = LoadedRun(Path("."), enc, plan, target, xs, "held-out sentences", INPUT_NAMES, OUTPUT_NAME,
                            pruned=model, layer_prefix="encoder.")
            t0 = time.perf_counter()
            build = build_sparse_module(enc, xs, run.sparse_layers(), target.tvm.target)
            compile_s = time.perf_counter() - t0
            with torch.no_grad():
                diff = float(np.abs(build.run(*(x.numpy() for x in xs)) - enc(*xs).numpy()).max())
            m = measure_tvm_export(run, build, xs, repeats=args.repeats, warmup=3)
            (tvm_name, tvm_ms), (ort_name, ort_ms) = m["median_ms"].items()
            rows.append({"sparsity": sparsity, "kept": kept, "batch": batch, "tvm_ms": tvm_ms, "ort_ms": ort_ms,
                         "ratio": m["ratio"], "compile_s": round(compile_s, 1), "max_abs_diff": diff,
                         "measured_on": m["measured_on"], "runtimes": m["runtimes"]})
            print(f"sparsity {sparsity:.1f} batch {batch}: TVM {tvm_ms:.2f} ms, onnxruntime {ort_ms:.2f} ms, "
                  f"{m['ratio']:.3f}x (|diff| {diff:.1e})", file=sys.stderr, flush=True)
    print(f"\nMiniLM, 16x1 blocks of its 36 linears, sequence length 128; {rows[0]['measured_on']}")
    print(f"TVM: {rows[0]['runtimes'][tvm_name]}\nonnxruntime: {rows[0]['runtimes'][ort_name]}, same model, dense shapes\n")
    print("| blocks removed | batch | TVM model.so (ms) | onnxruntime (ms) | TVM / onnxruntime | compile (s) | max |TVM - torch| |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sparsity']:.1f} | {r['batch']} | {r['tvm_ms']:.2f} | {r['ort_ms']:.2f} | {r['ratio']:.3f} | "
              f"{r['compile_s']:.1f} | {r['max_abs_diff']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
