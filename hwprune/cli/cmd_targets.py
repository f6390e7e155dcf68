"""``hwprune targets``: list the shipped targets (or show one)."""

from __future__ import annotations

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


def run(args) -> int:
    from ..target import list_targets, load_target

    if args.name:
        t = load_target(args.name)
        print(f"{t.name}: {t.description}")
        print(f"  file:     {t.path}")
        print(f"  device:   {t.device.name} ({t.device.arch}){' - this machine' if t.is_local else ''}")
        print(f"  shapes:   {_shapes(t)}")
        print(f"  runtime:  onnxruntime {list(t.onnxruntime.providers)}, {t.onnxruntime.threads or 'default'} threads; "
              f"TVM {dict(t.tvm.target)}")
        rpc = t.rpc
        print(f"  remote:   {'RPC ' + rpc.host + ':' + str(rpc.port) if rpc else 'none configured'}")
        p = t.profile_path()
        print(f"  profile:  {p} ({'measured' if p and p.exists() else 'not measured yet: hwprune profile --target ' + t.name})")
        return 0
    rows = [("name", "device", "shapes", "profile")]
    for name in list_targets():
        t = load_target(name)
        p = t.profile_path()
        rows.append((t.name, f"{t.device.name}{' (this machine)' if t.is_local else ''}", _shapes(t),
                     "measured" if p and p.exists() else "none"))
    print(text_table(rows, rule=False))
    return 0
