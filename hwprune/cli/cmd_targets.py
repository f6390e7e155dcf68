"""``hwprune targets``: list the shipped targets (or show one)."""

from __future__ import annotations

import sys

from ..report.table import text_table


def add_parser(sub) -> None:
    p = sub.add_parser("targets", help="list the shipped hardware targets, or show one")
    p.add_argument("name", nargs="?", help="a target to show in full (name or path)")
    p.set_defaults(command="targets")


def _shapes(t) -> str:
    parts = []
    for kind, shapes in t.groups.items():
        for s in shapes:
            if s.kind == "blocks":
                parts.append(f"{kind} blocks {s.rows}x{s.cols}")
            else:
                parts.append(f"{kind} {s.kind} x{s.multiple}")
    return ", ".join(parts)


def _profile_state(path, target) -> str:
    """Whether the profile exists and on which machine it was measured (a profile copied from another
    machine says "this machine: ..." of that one)."""
    from ..errors import ProfileError
    from ..latency.budget import profile_command, profile_measured_where
    from ..latency.profile import Profile

    if not path or not path.exists():
        return f"not measured yet: {profile_command(target)}"
    try:
        return f"measured on {profile_measured_where(Profile.load(path))}"
    except ProfileError as e:
        return f"present but not readable: {e}"


def run(args) -> int:
    from ..target import list_targets, load_target

    if args.name:
        t = load_target(args.name)
        print(f"{t.name}: {t.description}")
        print(f"  file:     {t.path}")
        where = " - this machine" if t.is_local else (f" - NOT this machine: {t.not_here()}" if t.device.local else "")
        print(f"  device:   {t.device.name} ({t.device.arch}){where}")
        print(f"  shapes:   {_shapes(t)}")
        threads = t.onnxruntime.threads or "default"
        print(f"  runtime:  onnxruntime {list(t.onnxruntime.providers)}, {threads} thread{'' if threads == 1 else 's'}; "
              f"TVM {dict(t.tvm.target)}")
        rpc = t.rpc
        print(f"  remote:   {'RPC ' + rpc.host + ':' + str(rpc.port) if rpc else 'none configured'}")
        p = t.profile_path()
        print(f"  profile:  {p} ({_profile_state(p, t)})")
        return 0
    from ..errors import TargetError

    rows, broken = [("name", "device", "shapes", "profile")], []
    for name in list_targets():
        try:
            t = load_target(name)
        except TargetError as e:  # one broken file in $HWPRUNE_TARGETS does not hide the others
            broken.append(str(e))
            continue
        p = t.profile_path()
        # the name that --target takes is the file's; a file whose 'name:' differs says both
        shown = name if t.name == name else f"{name} (name: {t.name})"
        rows.append((shown, f"{t.device.name}{' (this machine)' if t.is_local else ''}", _shapes(t),
                     "measured" if p and p.exists() else "none"))
    print(text_table(rows, rule=False))
    for problem in broken:
        print(f"hwprune: not listed: {problem}", file=sys.stderr)
    return 1 if broken else 0
