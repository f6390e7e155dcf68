"""Generic TVM plumbing: the target, compiling a Relax module, shared libraries, the default import.

Nothing here knows about pruning; the dense path (:mod:`hwprune.runtimes.tvm.dense`) and the remote-device
path (:mod:`hwprune.runtimes.tvm.rpc`) use it. TVM is imported inside the functions, so ``import hwprune``
works without it; a missing TVM is a :class:`~hwprune.errors.RuntimeUnavailable` that says what to
install.

Example:
    >>> from hwprune.target import load_target
    >>> t = tvm_target(load_target("host-cpu"))
    >>> str(t.kind)
    'llvm'
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

from ...errors import RuntimeUnavailable, TvmUnavailable
from ...io import atomic_path
from ...target import host_arch

TVM_PIN = "apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1"
_ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64", 0x28: "arm", 0xF3: "riscv", 0x03: "x86"}
# LLVM CPU names with AVX-512 (16 fp32 lanes); every other x86 CPU hwprune targets has AVX2 (8 lanes).
_AVX512_CPUS = ("skylake-avx512", "cascadelake", "cooperlake", "icelake", "tigerlake", "sapphirerapids",
                "znver4", "znver5", "x86-64-v4")


def require_tvm():
    """Import TVM (with Relax), or fail with one line saying what to install."""
    try:
        import tvm
        from tvm import relax  # noqa: F401  (the exporters need Relax too)
    except ImportError as e:
        raise TvmUnavailable(
            f"TVM is not installed ({e}); install it with: pip install {TVM_PIN} (or pip install 'hwprune[tvm]')"
        ) from None
    return tvm


def target_dict(target) -> dict[str, Any]:
    """The TVM target of a hwprune :class:`~hwprune.target.Target` (or a dict given directly)."""
    if isinstance(target, Mapping):
        return dict(target)
    return dict(target.tvm.target)


def tvm_target(target):
    """A ``tvm.target.Target`` built from the target's dict (TVM 0.27 rejects flag strings), or a
    one-line error naming the dict."""
    tvm = require_tvm()
    try:
        return tvm.target.Target(target_dict(target))
    except Exception as e:
        raise RuntimeUnavailable(f"TVM target {target_dict(target)}: "
                                 f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def target_arch(target) -> str:
    """'aarch64', 'x86_64', ... : the architecture the TVM target generates code for."""
    triple = str(target_dict(target).get("mtriple", "") or "")
    if triple:
        return triple.split("-")[0]
    return host_arch()


def vector_lanes(target) -> int:
    """fp32 lanes of one vector register on the target: 4 on NEON, 16 with AVX-512, 8 on AVX2."""
    d = target_dict(target)
    arch = target_arch(d)
    if arch.startswith(("aarch64", "arm")):
        return 4
    mcpu = str(d.get("mcpu", "") or "")
    mattr = " ".join(d.get("mattr", []) or [])
    if mcpu in _AVX512_CPUS or "+avx512f" in mattr:
        return 16
    return 8


def runs_here(target) -> bool:
    """True when code built for ``target`` can run on this machine (same architecture)."""
    return target_arch(target) == host_arch()  # in a target's arch terms: arm64 (macOS) is aarch64


def compile_relax(mod, target, *, relax_pipeline="default"):
    """``tvm.compile`` of a Relax module for the target; returns ``(executable, seconds)``."""
    tvm = require_tvm()
    t0 = time.perf_counter()
    with tvm.target.Target(target_dict(target)):
        ex = tvm.compile(mod, target=tvm_target(target), relax_pipeline=relax_pipeline)
    return ex, time.perf_counter() - t0


def cross_compiler(target):
    """The ``fcompile`` for ``export_library``: the target's cross compiler, or the host's C compiler."""
    require_tvm()
    from tvm.support import cc

    tool = getattr(getattr(target, "tvm", None), "cross_compiler", None)
    if tool:
        if shutil.which(tool) is None:
            raise RuntimeUnavailable(
                f"target '{getattr(target, 'name', '?')}': runtime.tvm.cross_compiler '{tool}' is not installed "
                f"here; on Debian/Ubuntu: apt-get install gcc-{tool.rsplit('-gcc', 1)[0]}"
                if tool.endswith("-gcc") else f"cross compiler '{tool}' not found on PATH")
        return cc.cross_compiler(tool)
    if not runs_here(target):
        raise RuntimeUnavailable(
            f"target '{getattr(target, 'name', '?')}' generates {target_arch(target)} code but names no "
            "runtime.tvm.cross_compiler to link it with (e.g. aarch64-linux-gnu-gcc)")
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("gcc") is None:
        raise RuntimeUnavailable("export_library needs a C compiler (gcc) to link the shared library")
    return None  # TVM's default: the host compiler


def export_library(executable, path: str | os.PathLike, target) -> Path:
    """Write the compiled module as a shared library (atomically: a temporary name, then a rename).

    The library holds the kernels, the VM program and the weights; ``load_library`` needs TVM's
    runtime only. Cross targets are linked with their ``cross_compiler``.
    """
    path = Path(path)
    fcompile = cross_compiler(target)
    kwargs = {"fcompile": fcompile} if fcompile is not None else {}
    with atomic_path(path, path.suffix or ".so") as tmp:
        executable.export_library(str(tmp), **kwargs)
    return path


def load_library(path: str | os.PathLike):
    """Load a library written by :func:`export_library` with TVM's runtime."""
    tvm = require_tvm()
    return tvm.runtime.load_module(str(path))


def virtual_machine(module, device=None):
    """A Relax VM over a loaded library (or an Executable) on ``device`` (default: this CPU)."""
    tvm = require_tvm()
    from tvm import relax

    return relax.VirtualMachine(module, device if device is not None else tvm.cpu())


def elf_machine(path: str | os.PathLike) -> str:
    """The architecture in a shared library's ELF header ('x86_64', 'aarch64', ...).

    Example:
        >>> elf_machine("/bin/ls") in ("x86_64", "aarch64")       # doctest: +SKIP
        True
    """
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        raise ValueError(f"{path}: not an ELF file")
    little = head[5] == 1
    machine = int.from_bytes(head[18:20], "little" if little else "big")
    return _ELF_MACHINES.get(machine, f"unknown (e_machine {machine:#x})")


def default_schedule(mod, target):
    """TVM's untuned default: legalize every op to TIR and fuse (no schedule is applied)."""
    tvm = require_tvm()
    from tvm import relax

    with tvm.target.Target(target_dict(target)):
        return relax.get_pipeline("zero")(mod)
