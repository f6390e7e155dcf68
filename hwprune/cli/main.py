"""``hwprune``: the command-line entry point.

Errors in the user's input print one line (``hwprune: error: ...``) and exit with status 2; no
traceback. ``HWPRUNE_DEBUG=1`` shows the traceback for bug reports.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import HwpruneError
from . import cmd_env, cmd_export, cmd_fit, cmd_profile, cmd_targets

COMMANDS = {"fit": cmd_fit, "export": cmd_export, "profile": cmd_profile, "targets": cmd_targets, "env": cmd_env}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hwprune",
        description="Make a PyTorch model smaller and faster on a given piece of hardware.",
        epilog="Example: hwprune fit --target host-cpu.yaml --sparsity 0.7",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(COMMANDS[args.command].run(args) or 0)
    except HwpruneError as e:
        if os.environ.get("HWPRUNE_DEBUG"):
            raise
        print(f"hwprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C; SIGTERM in hwprune fit (cmd_fit.Terminated) carries its own status
        print("\nhwprune: interrupted", file=sys.stderr)
        return getattr(e, "exit_status", 130)
    except BrokenPipeError:
        # the reader of our output went away (hwprune env | head -1): not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except OSError as e:
        if os.environ.get("HWPRUNE_DEBUG") or e.strerror is None:
            raise
        where = f" {e.filename}:" if e.filename else ""
        print(f"hwprune: error:{where} {e.strerror}; free space, fix the permissions or choose another folder "
              "(files already written were left as they were)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
