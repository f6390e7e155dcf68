"""Load an exported artifact in a fresh process, with its runtime alone, and compare with torch.

This file imports nothing from hwprune (and not torch): :func:`check_in_fresh_process` runs it by
path in a new interpreter, so the check proves that the artifact loads with onnxruntime, scipy or
TVM's runtime by themselves. It prints one JSON line: the largest absolute difference from the
reference outputs torch produced, and which of ``torch``/``hwprune`` ended up imported (TVM's Python
package imports torch itself).

Usage (what :func:`check_in_fresh_process` runs)::

    python -c "import runpy, sys; sys.argv = [...]; runpy.run_path('check.py', run_name='__main__')" \\
        tvm model.so reference.npz

``reference.npz`` holds the model's inputs (``input.<position>.<name>``) and ``output`` (whole model), or ``in:<layer>`` / ``out:<layer>``
pairs (npz export: each sparse layer on its own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def model_inputs(ref) -> list:
    """The model's inputs in order: ``input.<position>.<name>`` entries (or one ``input``)."""
    keyed = sorted((int(k.split(".")[1]), k) for k in ref if k.startswith("input."))
    return [ref[k] for _, k in keyed] if keyed else [ref["input"]]


def _check_onnx(path: str, ref) -> float:
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feeds = {i.name: x for i, x in zip(sess.get_inputs(), model_inputs(ref))}
    out = sess.run(None, feeds)[0]
    return float(np.abs(out - ref["output"]).max())


def _check_tvm(path: str, ref) -> float:
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    vm = VirtualMachine(tvm.runtime.load_module(path), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x) for x in model_inputs(ref)])
    if not hasattr(out, "numpy"):  # a model imported through torch.export returns a one-element tuple
        out = out[0]
    out = out.numpy()
    return float(np.abs(out - ref["output"]).max())


def _im2col(x, conv):
    """(N, C, H, W) -> (N, C*kh*kw, Ho*Wo) in the order of weight.reshape(C_out, -1)."""
    import numpy as np

    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv["kernel"], conv["stride"], conv["padding"], conv["dilation"]
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, ho, wo), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
    return cols.reshape(n, c * kh * kw, ho * wo), (ho, wo)


def _check_npz(folder: str, ref) -> float:
    import numpy as np
    import scipy.sparse as sp

    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    biases = np.load(os.path.join(folder, manifest["biases"])) if manifest.get("biases") else {}
    worst = 0.0
    for layer in manifest["layers"]:
        a = sp.load_npz(os.path.join(folder, layer["file"]))  # padded to whole blocks
        o, k = layer["shape"]
        kp = layer["padded_shape"][1]
        x = ref["in:" + layer["layer"]]
        if layer["kind"] == "linear":
            x2 = x.reshape(-1, k)
            y = np.asarray(a @ np.pad(x2, ((0, 0), (0, kp - k))).T).T[:, :o].reshape(*x.shape[:-1], o)
        else:
            cols, (ho, wo) = _im2col(x, layer["conv"])
            y = np.stack([np.asarray(a @ np.pad(c, ((0, kp - k), (0, 0))))[:o] for c in cols]).reshape(len(x), o, ho, wo)
        if layer["bias"]:
            b = biases[layer["layer"]]
            y = y + (b if layer["kind"] == "linear" else b[:, None, None])
        worst = max(worst, float(np.abs(y - ref["out:" + layer["layer"]]).max()))
    return worst


CHECKS = {"onnx": _check_onnx, "tvm": _check_tvm, "npz": _check_npz}


def main(argv: list[str]) -> int:
    import numpy as np

    kind, artifact, reference = argv
    ref = dict(np.load(reference))
    diff = CHECKS[kind](artifact, ref)
    print(json.dumps({"kind": kind, "max_abs_diff": diff, "torch_imported": "torch" in sys.modules,
                      "hwprune_imported": "hwprune" in sys.modules}))
    return 0


def check_in_fresh_process(kind: str, artifact, reference, timeout: float = 300, emulated=None) -> dict:
    """Run this file in a new interpreter on ``artifact``; returns its JSON result. ``emulated``: an
    :class:`~hwprune.runtimes.emulation.EmulatedPython` to run it in (an artifact for another CPU).

    Example:
        >>> check_in_fresh_process("onnx", "model.onnx", "reference.npz")["max_abs_diff"] < 1e-4   # doctest: +SKIP
        True
    """
    if kind not in CHECKS:
        raise ValueError(f"unknown artifact kind {kind!r}; expected one of {', '.join(CHECKS)}")
    here = os.path.abspath(__file__)
    code = ("import runpy, sys; sys.argv = [sys.argv[0]] + sys.argv[1:]; "
            f"runpy.run_path({here!r}, run_name='__main__')")
    import tempfile

    env = dict(os.environ, OMP_NUM_THREADS="1", TVM_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # nothing of this checkout on the path: an installed runtime only
    python = [sys.executable]
    if emulated is not None:  # its own runtimes only (the aarch64 wheels), never this machine's
        python, env["PYTHONPATH"] = list(emulated.command), str(emulated.site)
    with tempfile.TemporaryDirectory() as cwd:  # `python -c` puts the working directory on sys.path
        proc = subprocess.run([*python, "-c", code, kind, os.path.abspath(str(artifact)),
                               os.path.abspath(str(reference))], capture_output=True, text=True, timeout=timeout,
                              env=env, cwd=cwd)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"kind": kind, "ok": False, "error": tail}
    result = json.loads(lines[-1])
    result["ok"] = True
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
