"""``hwprune export RUN_DIR --format onnx|npz|tvm``: write a run's pruned model for a runtime, and check it.

* ``onnx``: the pruned model (sliced for channel runs; masked, dense shapes, for block runs);
* ``npz``: each sparse layer's weight as a scipy BSR (CSR for 1x1 blocks) ``.npz`` + ``manifest.json``;
* ``tvm``: the model compiled with TVM for the target, each sparse layer on a hand-written BSR kernel,
  as ``model.so`` (loads with ``tvm.runtime.load_module`` + ``relax.VirtualMachine``).

Every artifact is then loaded in a fresh process with its runtime alone and compared with torch.
``--measure`` (tvm) times the library against onnxruntime on this machine and says where it ran.
"""

from __future__ import annotations

import os
import sys

from ..export import FORMAT_NAMES


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="write a fit run's model as ONNX, scipy BSR/CSR (.npz) or a TVM library with BSR kernels",
        description="Export the pruned model of a finished fit run, then check it in a fresh process. "
        "Example: hwprune export runs/demo --format tvm",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by hwprune fit")
    p.add_argument("--format", required=True, choices=FORMAT_NAMES, help="what to write")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/export/FORMAT)")
    p.add_argument("--target", default=None, help="override the run's target (name or YAML path); tvm compiles for it")
    p.add_argument("--batch-size", type=int, default=1, help="batch size the TVM library is compiled for (default 1)")
    p.add_argument("--no-check", action="store_true", help="skip the fresh-process check against torch")
    p.add_argument("--measure", action="store_true",
                   help="tvm only: time the library against onnxruntime on the same model (a block run's with dense "
                   "shapes, a channel run's sliced) on this machine, in turns")
    p.set_defaults(command="export")


def run(args) -> int:
    from ..export.artifacts import export_run

    try:
        result = export_run(args.run_dir, args.format, args.out, target=args.target, batch_size=args.batch_size,
                            check=not args.no_check, measure=args.measure)
    except KeyboardInterrupt:  # the export is written aside and moved in last: nothing of it is in place yet
        out = args.out or os.path.join(args.run_dir, "export", args.format)
        print(f"hwprune export: stopped before the export was complete; nothing was written to {out} (an earlier "
              "export there is as it was)", file=sys.stderr)
        raise
    print(result)
    return 0
