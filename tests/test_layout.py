"""The package's shape, pinned: no import cycle between modules, and no module imports another's
private names (issue 13). Both read every module's module-level imports with ``ast``; imports inside
functions are lazy by design and not counted."""

import ast
from pathlib import Path

import hwprune

ROOT = Path(hwprune.__file__).resolve().parent


def modules():
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def imports(name, path, is_pkg, mods):
    """(imported module, names) for each module-level ``from X import ...`` of a hwprune module."""
    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module or ""
            if base == "hwprune" or base.startswith("hwprune."):
                yield base, [a.name for a in node.names]


def test_no_import_cycle_between_modules():
    mods = modules()
    edges = {m: set() for m in mods}
    for m, (path, is_pkg) in mods.items():
        for base, names in imports(m, path, is_pkg, mods):
            for n in names:
                target = f"{base}.{n}" if f"{base}.{n}" in mods else base
                if target in mods and not m.startswith(target + "."):  # one's own package is not a cycle
                    edges[m].add(target)
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for t in sorted(edges[m]):
            visit(t)
        stack.pop()

    for m in sorted(mods):
        visit(m)
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_no_module_imports_another_modules_private_names():
    mods = modules()
    private = [f"{m} imports {n} from {base}"
               for m, (path, is_pkg) in mods.items()
               for base, names in imports(m, path, is_pkg, mods)
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, "\n".join(private)
