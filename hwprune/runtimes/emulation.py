"""Run an artifact built for another CPU architecture on this machine through qemu-user: for checks only.

hwprune cross-compiles TVM libraries for the aarch64 targets (jetson, rpi5). To check one against torch
here, :func:`check_in_fresh_process` runs the artifact checker in an aarch64 Python 3.11 (Debian's,
unpacked into a folder) with TVM's runtime and onnxruntime from PyPI's aarch64 wheels, under
``qemu-aarch64-static``. ``tests/emulation/make_arm64_root.sh`` builds that folder (about 30 s and
150 MB). Emulated time means nothing about the device, so nothing here times anything.

Example:
    >>> emulated_python("x86_64" if os.uname().machine == "x86_64" else "aarch64") is None   # this machine's own
    True
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

ROOT_ENV = "HWPRUNE_ARM64_ROOT"
QEMU = {"aarch64": "qemu-aarch64-static"}
BUILD_HINT = "bash tests/emulation/make_arm64_root.sh (Debian's apt and PyPI; about 30 s)"


def arm64_root() -> Path:
    """Where the aarch64 Python lives: ``$HWPRUNE_ARM64_ROOT``, else ``~/.cache/hwprune/arm64-root``."""
    return Path(os.environ.get(ROOT_ENV) or Path.home() / ".cache" / "hwprune" / "arm64-root")


@dataclass(frozen=True)
class EmulatedPython:
    """An interpreter for another architecture: the command that starts it and what it puts on its path."""

    arch: str
    command: tuple[str, ...]
    site: Path

    def describe(self) -> str:
        return f"an {self.arch} Python under {Path(self.command[0]).name} emulation on this machine (checks only, never timed)"


def emulated_python(arch: str) -> EmulatedPython | None:
    """The emulated interpreter for ``arch``, or None: this machine's own architecture, no emulator for it,
    or its Python folder not built (see :data:`BUILD_HINT`)."""
    if arch == os.uname().machine or arch not in QEMU:
        return None
    qemu = shutil.which(QEMU[arch])
    root = arm64_root()
    python, site = root / "usr" / "bin" / "python3.11", root / "opt" / "site"
    if qemu is None or not python.is_file() or not site.is_dir():
        return None
    return EmulatedPython(arch, (qemu, "-L", str(root), str(python)), site)
