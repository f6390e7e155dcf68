"""Hardware targets: which group shapes a device runs fast, its runtime, and its latency profile.

A target is a YAML file (see ``targets/``) loaded into frozen dataclasses. Every key is checked: an
unknown key, a wrong type or an impossible shape is a :class:`TargetError` that names the file, the
key and what was expected.

Example:
    >>> t = load_target("host-cpu")
    >>> t.multiple_for("conv") >= 1
    True
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import TargetError
from .files import profile_dirs, target_dirs

# ---------------------------------------------------------------------------------------------------
# Group shapes (what one hardware unit of pruning is), in the spirit of torchao's granularity types.


@dataclass(frozen=True)
class ChannelShape:
    """Whole channels (conv filters with their input slices) or linear neurons, kept in multiples.

    ``multiple`` is the channel-count multiple the hardware wants (8 for fp16 tensor cores, 4 for
    NEON fp32 lanes); kept counts are multiples of it, or the full width.
    """

    multiple: int = 1
    kind: str = field(default="channels", init=False)


@dataclass(frozen=True)
class BlockShape:
    """A rows x cols block of a weight matrix (for BSR/CSR sparse kernels; 1x1 is unstructured)."""

    rows: int
    cols: int
    kind: str = field(default="blocks", init=False)


@dataclass(frozen=True)
class HeadShape:
    """Whole attention heads (their Q, K, V rows and output-projection columns), kept in multiples."""

    multiple: int = 1
    kind: str = field(default="heads", init=False)


GroupShape = ChannelShape | BlockShape | HeadShape

# Which shapes each layer kind may declare, and the YAML key that names them.
_SHAPES_BY_KIND: dict[str, dict[str, type]] = {
    "conv": {"channels": ChannelShape, "blocks": BlockShape},
    "linear": {"neurons": ChannelShape, "blocks": BlockShape},
    "attention": {"heads": HeadShape},
}
_MAX_MULTIPLE = 4096
_MAX_BLOCK = 4096

# ---------------------------------------------------------------------------------------------------
# Runtime and device.


@dataclass(frozen=True)
class OrtRuntime:
    """onnxruntime settings: execution providers in preference order, and threads (0 = ORT default)."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = 1


@dataclass(frozen=True)
class TvmRuntime:
    """A TVM target as a dict (TVM 0.27 rejects flag strings), and the cross compiler for export."""

    target: Mapping[str, Any] = field(default_factory=lambda: {"kind": "llvm"})
    cross_compiler: str | None = None


@dataclass(frozen=True)
class RpcEndpoint:
    """A TVM RPC server (``host:port``) or a tracker (``tracker: true`` plus ``key``)."""

    host: str
    port: int
    key: str | None = None
    tracker: bool = False

    def describe(self) -> str:
        """How latency labels name the device."""
        if self.tracker:
            return f"RPC device '{self.key}' (from the tracker at {self.host}:{self.port})"
        return f"RPC device at {self.host}:{self.port}" + (f" (key '{self.key}')" if self.key else "")


@dataclass(frozen=True)
class Device:
    """The physical device. ``local: true`` means it is the machine hwprune runs on."""

    name: str
    arch: str
    local: bool = False


@dataclass(frozen=True)
class LatencySettings:
    """How latency is measured and where the measured profile lives."""

    profile: str | None = None
    batch_size: int = 1
    warmup: int = 20
    repeats: int = 200


@dataclass(frozen=True)
class Target:
    """A hardware target, as loaded from YAML. Use :func:`load_target`."""

    name: str
    description: str
    device: Device
    groups: Mapping[str, tuple[GroupShape, ...]]
    onnxruntime: OrtRuntime
    tvm: TvmRuntime
    rpc: RpcEndpoint | None
    latency: LatencySettings
    path: Path | None = None

    def shape_for(self, kind: str, shape_kind: str) -> GroupShape | None:
        """The declared shape of ``shape_kind`` ('channels', 'blocks', 'heads') for a layer kind."""
        for shape in self.groups.get(kind, ()):
            if shape.kind == shape_kind:
                return shape
        return None

    def multiple_for(self, kind: str) -> int:
        """Channel multiple for a layer kind ('conv', 'linear', 'attention'); 1 if not declared."""
        for shape in self.groups.get(kind, ()):
            if isinstance(shape, (ChannelShape, HeadShape)):
                return shape.multiple
        return 1

    def group_multiple(self, kinds) -> int:
        """Least common multiple of the channel multiples of the given layer kinds."""
        result = 1
        for kind in kinds:
            result = math.lcm(result, self.multiple_for(kind))
        return result

    @property
    def is_local(self) -> bool:
        """True when the target's device is this machine (latency measured here is the device's): it says
        ``local: true`` and its ``arch`` is this machine's (an aarch64 board is never this x86-64 one)."""
        return self.device.local and self.device.arch == host_arch()

    def not_here(self) -> str:
        """Why a measurement here is not the device's ('' when the device is this machine)."""
        if self.is_local:
            return ""
        if self.device.local:
            return (f"the target declares 'device.local: true', but its arch is {self.device.arch} and this machine "
                    f"is {host_arch()}")
        return f"the device '{self.device.name}' is not this machine"

    @property
    def ref(self) -> str:
        """How to name this target on a command line (``--target REF``): a shipped target's name, else its file.

        Example:
            >>> load_target("jetson").ref
            'jetson'
        """
        if self.path is None:
            return self.name
        try:
            if find_target(self.path.stem).resolve() == self.path.resolve():
                return self.path.stem
        except TargetError:
            pass
        try:
            return str(self.path.resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(self.path)

    @property
    def is_shipped(self) -> bool:
        """True for a target file in one of :func:`target_dirs` (shipped with hwprune or in
        ``$HWPRUNE_TARGETS``); False for a user's own file elsewhere, or a target parsed from text."""
        if self.path is None:
            return False
        folder = self.path.resolve().parent
        return any(folder == d.resolve() for d in target_dirs())

    def profile_folder(self) -> Path:
        """Where this target's profiles are written: beside a user's own target file (measuring it must never
        replace a shipped profile that happens to have the same name: a copied ``host-cpu.yaml`` keeps
        ``profile: host-cpu``), else the first of :func:`profile_dirs`."""
        if self.path is not None and not self.is_shipped:
            return self.path.resolve().parent
        dirs = profile_dirs()
        return dirs[0] if dirs else Path.cwd()

    def profile_path(self, *, writing: bool = False) -> Path | None:
        """Where this target's latency profile is read from (``writing=True``: where ``hwprune profile``
        writes it); None if the target names none.

        A path with a folder (``./boards/pi.json``) is taken relative to the target file. A bare name
        (``host-cpu``) is written in :meth:`profile_folder` and read from there, or, until it exists there,
        from the first of :func:`profile_dirs` that has it.

        Example:
            >>> load_target("host-cpu").profile_path().name
            'host-cpu.json'
        """
        ref = self.latency.profile
        if ref is None:
            return None
        p = Path(ref)
        if p.suffix == ".json" and (p.is_absolute() or len(p.parts) > 1):
            return p if p.is_absolute() else ((self.path.parent if self.path else Path.cwd()) / p).resolve()
        name = ref if ref.endswith(".json") else ref + ".json"
        own = self.profile_folder() / name
        if writing or own.is_file():
            return own
        return next((d / name for d in profile_dirs() if (d / name).is_file()), own)


# ---------------------------------------------------------------------------------------------------
# Loading and validation.


def _short_repr(value: Any) -> str:
    """A bounded repr: YAML aliases can build structures of 10**9 elements out of a few lines
    ("billion laughs"); a full repr of one would hang."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 4, 4, 40, 40
    text = r.repr(value).replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


MAX_TARGET_BYTES = 64 * 1024  # a target is a few hundred bytes; refuse megabytes before PyYAML parses them


class _Reader:
    """Reads one mapping of a YAML file and reports every problem with the file and the key path."""

    def __init__(self, source: str, data: Any, where: str):
        self.source = source
        self.where = where
        if not isinstance(data, Mapping):
            self.fail(where or "(top level)", "a mapping", data)
        self.data = data

    def fail(self, key: str, expected: str, got: Any = None, *, message: str | None = None):
        text = message or f"expected {expected}, got {_short_repr(got)} ({type(got).__name__})"
        raise TargetError(f"{self.source}: key '{key}': {text}")

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def check_keys(self, allowed: set[str], required: set[str] = frozenset()):
        for k in self.data:
            if not isinstance(k, str):
                self.fail(self.where or "(top level)", "string keys", k)
        unknown = sorted(set(self.data) - allowed)
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], sorted(allowed), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            self.fail(self.key(unknown[0]), "", message=f"unknown key; {hint}valid keys here: {', '.join(sorted(allowed))}")
        for k in sorted(required):
            if k not in self.data:
                self.fail(self.key(k), "", message="missing required key")

    def str(self, name: str, default: Any = ...) -> Any:
        value = self.data.get(name, default)
        if value is ...:
            self.fail(self.key(name), "", message="missing required key")
        if value is not None and not isinstance(value, str):
            self.fail(self.key(name), "a string", value)
        return value

    def bool(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if not isinstance(value, bool):
            self.fail(self.key(name), "true or false", value)
        return value

    def int(self, name: str, default: Any, lo: int, hi: int) -> int:
        value = self.data.get(name, default)
        return check_int(self, self.key(name), value, lo, hi)

    def sub(self, name: str, default: Any = None) -> "_Reader | None":
        value = self.data.get(name, default)
        if value is None:
            return None
        return _Reader(self.source, value, self.key(name))


def check_int(reader: _Reader, key: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        reader.fail(key, f"an integer in [{lo}, {hi}]", value)
    if not lo <= value <= hi:
        reader.fail(key, f"an integer in [{lo}, {hi}]", value)
    return value


def _read_groups(r: _Reader) -> dict[str, tuple[GroupShape, ...]]:
    r.check_keys(set(_SHAPES_BY_KIND))
    groups: dict[str, tuple[GroupShape, ...]] = {}
    for kind, raw in r.data.items():
        kr = _Reader(r.source, raw, r.key(kind))
        valid = _SHAPES_BY_KIND[kind]
        kr.check_keys(set(valid))
        if not kr.data:
            kr.fail(kr.where, "", message=f"declares no shape; give one of: {', '.join(valid)}")
        shapes: list[GroupShape] = []
        for shape_name, value in kr.data.items():
            cls = valid[shape_name]
            key = kr.key(shape_name)
            if cls is BlockShape:
                if (
                    not isinstance(value, (list, tuple))
                    or len(value) != 2
                    or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
                ):
                    kr.fail(key, "[rows, cols], two positive integers (e.g. [16, 1])", value)
                rows, cols = value
                for v in (rows, cols):
                    check_int(kr, key, v, 1, _MAX_BLOCK)
                shapes.append(BlockShape(rows, cols))
            else:
                multiple = check_int(kr, key, value, 1, _MAX_MULTIPLE)
                shapes.append(cls(multiple=multiple))
        groups[kind] = tuple(shapes)
    return groups


def _check_provider_names(r: _Reader, providers: list[str]) -> None:
    """A provider name one typo away from one onnxruntime knows is a mistake (it would be skipped as "not
    available here"); a name unlike all of them may be a newer onnxruntime's and is left to the runtime."""
    try:
        import onnxruntime
    except ImportError:
        return
    known = list(onnxruntime.get_all_providers())
    import difflib

    for i, name in enumerate(providers):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
        if name not in known and close:
            r.fail(f"{r.key('providers')}[{i}]", "", message=f"unknown onnxruntime provider '{name}'; did you mean "
                   f"'{close[0]}'?")


def _read_target(data: Any, source: str, path: Path | None) -> Target:
    r = _Reader(source, data, "")
    r.check_keys({"name", "description", "device", "groups", "runtime", "latency"}, {"name", "device", "groups", "runtime"})
    name = r.str("name")
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        r.fail("name", "a non-empty name of letters, digits, '-', '_' or '.'", name)
    description = r.str("description", "") or ""

    d = r.sub("device")
    d.check_keys({"name", "arch", "local"}, {"name", "arch"})
    arch = d.str("arch")
    valid_arch = {"x86_64", "aarch64", "armv7", "riscv64"}
    if arch not in valid_arch:
        d.fail(d.key("arch"), f"one of {sorted(valid_arch)}", arch)
    device = Device(name=d.str("name"), arch=arch, local=d.bool("local", False))

    groups = _read_groups(r.sub("groups"))

    rt = r.sub("runtime")
    rt.check_keys({"onnxruntime", "tvm", "rpc"})
    ort = OrtRuntime()
    if (o := rt.sub("onnxruntime")) is not None:
        o.check_keys({"providers", "threads"})
        providers = o.data.get("providers", list(ort.providers))
        if not isinstance(providers, list) or not providers or not all(isinstance(p, str) and p for p in providers):
            o.fail(o.key("providers"), "a non-empty list of provider names such as [CPUExecutionProvider]", providers)
        _check_provider_names(o, providers)
        ort = OrtRuntime(providers=tuple(providers), threads=o.int("threads", 1, 0, 1024))
    tvm = TvmRuntime()
    if (t := rt.sub("tvm")) is not None:
        t.check_keys({"target", "cross_compiler"})
        tgt = t.data.get("target", {"kind": "llvm"})
        if not isinstance(tgt, Mapping) or not isinstance(tgt.get("kind"), str):
            t.fail(t.key("target"), "a mapping with at least 'kind' (e.g. {kind: llvm, mcpu: znver3})", tgt)
        if not all(isinstance(k, str) for k in tgt):
            t.fail(t.key("target"), "string keys", tgt)
        # The mapping is TVM's own (mcpu, mtriple, mattr, num-cores, ...): TVM checks the keys when it
        # builds; here only the value types are checked.
        for k, v in tgt.items():
            ok = isinstance(v, (str, int, bool)) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
            if not ok or isinstance(v, float):
                t.fail(f"{t.key('target')}.{k}", "a string, an integer, a boolean or a list of strings", v)
        tvm = TvmRuntime(target=dict(tgt), cross_compiler=t.str("cross_compiler", None))
    rpc = None
    if (p := rt.sub("rpc")) is not None:
        p.check_keys({"host", "port", "key", "tracker"}, {"host", "port"})
        rpc = RpcEndpoint(
            host=p.str("host"), port=p.int("port", None, 1, 65535), key=p.str("key", None), tracker=p.bool("tracker", False)
        )
        if rpc.tracker and not rpc.key:
            p.fail(p.key("key"), "", message="a tracker needs a device key ('key: <name>')")

    lat = LatencySettings()
    if (lr := r.sub("latency")) is not None:
        lr.check_keys({"profile", "batch_size", "warmup", "repeats"})
        lat = LatencySettings(
            profile=lr.str("profile", None),
            batch_size=lr.int("batch_size", 1, 1, 65536),
            warmup=lr.int("warmup", 20, 0, 100000),
            repeats=lr.int("repeats", 200, 1, 1000000),
        )
    return Target(
        name=name, description=description, device=device, groups=groups,
        onnxruntime=ort, tvm=tvm, rpc=rpc, latency=lat, path=path,
    )


class DuplicateKey(Exception):
    """A mapping in a target file names the same key twice (YAML would silently keep the last)."""


def _unique_key_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise DuplicateKey(f"key '{key}' appears twice in one mapping (lines {seen[key] + 1} and "
                                       f"{key_node.start_mark.line + 1}); keep one")
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep)

    return Loader


_UniqueKeyLoader = _unique_key_loader()


def parse_target(text: str | bytes, source: str = "<string>", path: Path | None = None) -> Target:
    """Parse a target from YAML text (safe loader; no code runs).

    Example:
        >>> parse_target("name: t\\ndevice: {name: cpu, arch: x86_64, local: true}\\n"
        ...              "groups: {conv: {channels: 8}}\\nruntime: {}\\n").multiple_for("conv")
        8
    """
    import yaml

    if len(text) > MAX_TARGET_BYTES:
        raise TargetError(f"{source}: {len(text)} bytes; a target file is expected to be small (under 64 KiB)")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TargetError(f"{source}: not UTF-8 text (byte {e.start}); save the target as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except DuplicateKey as e:
        raise TargetError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TargetError(f"{source}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise TargetError(f"{source}: YAML nests too deeply (recursive anchors?)") from None
    except ValueError as e:  # e.g. PyYAML's int/timestamp constructors on absurd values
        raise TargetError(f"{source}: invalid YAML value: {str(e)[:80]}") from None
    if data is None:
        raise TargetError(f"{source}: the file is empty; a target needs name, device, groups and runtime")
    try:
        return _read_target(data, source, path)
    except RecursionError:
        raise TargetError(f"{source}: YAML nests too deeply (recursive anchors?)") from None


def find_target(ref: str | os.PathLike) -> Path:
    """Resolve a target reference: a path, or a bare name / file name of a shipped target.

    Example:
        >>> find_target("jetson.yaml").name
        'jetson.yaml'
    """
    p = Path(ref).expanduser()
    if p.is_file():
        return p.resolve()
    if p.is_dir():
        raise TargetError(f"target '{ref}' is a folder; give a target YAML file in it, or a shipped target's name "
                          f"({', '.join(list_targets())})")
    shipped_names = list_targets()
    shipped = ", ".join(shipped_names) or "(none found)"
    # Only a bare name ("jetson", "jetson.yaml") or the literal "targets/jetson.yaml" that the README and
    # Makefile write may fall back to the shipped targets. Any other path names a file the user meant;
    # answering a missing "./boards/jetson.yaml" with the shipped one would fit for the wrong hardware.
    folder = os.path.dirname(os.fspath(ref))
    if folder not in ("", "targets"):
        hint = (f"for the shipped {p.stem} target give its bare name ({p.stem})" if p.stem in shipped_names
                else "a bare name finds a shipped target")
        raise TargetError(f"target '{ref}' not found: no such file; {hint}. Shipped targets: {shipped}")
    names = [p.name] if p.suffix in (".yaml", ".yml") else [p.name + ".yaml", p.name + ".yml"]
    for d in target_dirs():
        for n in names:
            if (d / n).is_file():
                return d / n
    raise TargetError(f"target '{ref}' not found: no such file, and no shipped target of that name. Shipped targets: {shipped}")


def load_target(ref: str | os.PathLike) -> Target:
    """Load and validate a target from a path or a shipped target's name ('host-cpu', 'jetson.yaml').

    Example:
        >>> load_target("host-cpu").device.local
        True
    """
    path = find_target(ref)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TargetError(f"{path}: cannot read: {e.strerror}") from None
    return parse_target(raw, source=str(path), path=path)


def list_targets() -> list[str]:
    """Names of the shipped targets (file stems), first occurrence wins."""
    seen: dict[str, Path] = {}
    for d in target_dirs():
        for f in sorted(d.glob("*.y*ml")):
            if f.is_file():  # a folder named x.yaml is not a target
                seen.setdefault(f.stem, f)
    return sorted(seen)


def host_arch() -> str:
    """This machine's architecture in a target's ``device.arch`` terms ('x86_64', 'aarch64', 'armv7', ...)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv7l": "armv7"}.get(machine, machine)


def host_description() -> str:
    """One line naming this machine: CPU model, architecture, core count (for latency labels)."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu or 'unknown CPU'} ({platform.machine()}, {os.cpu_count()} cores)"


def this_machine() -> str:
    """The label of a measurement taken here: ``this machine: <CPU> (<arch>, <cores> cores), <hostname>``.
    Every latency hwprune reports says where it was measured with this (or the RPC device's name)."""
    return f"this machine: {host_description()}, {platform.node()}"
