"""``hwprune env``: versions and machine, to paste into a bug report."""

from __future__ import annotations

import importlib
import platform


def add_parser(sub) -> None:
    p = sub.add_parser("env", help="print versions of hwprune, its backends and this machine")
    p.set_defaults(command="env")


def run(args) -> int:
    from .. import __version__
    from ..target import host_description

    print(f"hwprune      {__version__}")
    print(f"python       {platform.python_version()} ({platform.platform()})")
    print(f"machine      {host_description()}")
    for mod in ("torch", "numpy", "scipy", "onnx", "onnxruntime", "tvm", "sklearn", "yaml"):
        try:
            version = getattr(importlib.import_module(mod), "__version__", "?")
        except Exception as e:  # an optional backend may be missing or broken
            version = f"not available ({type(e).__name__})"
        print(f"{mod:12s} {version}")
    try:
        import onnxruntime

        print(f"ort providers {', '.join(onnxruntime.get_available_providers())}")
    except Exception:
        pass
    return 0
