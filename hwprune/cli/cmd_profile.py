"""``hwprune profile``: measure a target's latency profile (every layer shape at a grid of kept widths).

Without ``--model``/``--data`` it profiles the layers of the embedded default that ``fit`` prunes
(``small-resnet`` on ``digits``). The profile is written atomically to the target's
``latency.profile`` (``profiles/<target>.json``) or ``--out``. A target that is not this machine is
profiled only on its own device, over TVM RPC.

``--granularity blocks`` measures the block-sparse side instead (:mod:`hwprune.latency.measure_blocks`): the
BSR kernel of every sparse layer shape at ``--densities``, and the same layer dense, on this machine.
It adds (or replaces) the profile's ``blocks`` section and never changes its width tables.
Example: ``hwprune profile --target host-cpu --granularity blocks --densities 0.1,0.5,1.0``.
"""

from __future__ import annotations

from ..report.table import text_table

from ..runtimes import RUNTIMES

from pathlib import Path

from ..errors import HwpruneError
from ..io import check_writable_folder


def add_parser(sub) -> None:
    p = sub.add_parser(
        "profile", help="measure the latency of each layer shape at a range of widths on the target's runtime",
        description="Measure a latency profile for latency budgets (hwprune fit --latency-ms / --speedup). "
        "Example: hwprune profile --target host-cpu",
    )
    p.add_argument("--target", required=True, help="target YAML: a path or a shipped target's name")
    p.add_argument("--model", default=None, help="built-in model, package.module:function or path/to/file.py:function "
                                                  "(default: small-resnet)")
    p.add_argument("--data", default=None, help="dataset that sets the input shape (default: digits)")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize every image to this side (default: the dataset's own, 32 for imagefolder)")
    p.add_argument("--runtime", choices=sorted(RUNTIMES), default=None,
                   help="onnxruntime (default on this machine) or tvm (the hand-scheduled kernels; required over RPC)")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT", help="profile on the device behind this TVM RPC server")
    p.add_argument("--tracker", default=None, metavar="HOST:PORT", help="TVM RPC tracker to request the device from")
    p.add_argument("--key", default=None, help="device key registered with the tracker")
    p.add_argument("--out", default=None, help="where to write (default: the profile the target names: in profiles/ for a shipped target, "
                        "beside the target file for your own)")
    p.add_argument("--append", action="store_true",
                   help="keep the tables of an existing profile (same machine, runtime and batch) and add this model's")
    p.add_argument("--granularity", choices=list(PROFILE_KINDS), default="widths",
                   help="widths (kept channels; default) or blocks (BSR kernels over block densities, this machine "
                        "only; written to the profile's blocks section, width tables untouched)")
    p.add_argument("--densities", default=None, metavar="D1,D2,...",
                   help="kept fractions of blocks to measure with --granularity blocks (default 0.1,0.3,0.5,0.7,1.0)")
    p.add_argument("--max-points", type=int, default=8, help="grid points per width axis (default 8)")
    p.add_argument("--repeats", type=int, default=40, help="timed calls per grid point (default 40)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the target's latency.batch_size)")
    p.set_defaults(command="profile")


def _default_out(target) -> Path:
    """The profile the target names, or ``<name>.json`` where its profiles go (:meth:`Target.profile_folder`)."""
    return target.profile_path(writing=True) or target.profile_folder() / f"{target.name}.json"


class _Widths:
    """``--granularity widths``: every layer shape at a grid of kept widths, on this machine or over RPC."""

    name = "widths"

    def check(self, args) -> None:
        if args.densities is not None:
            raise HwpruneError("--densities is for --granularity blocks (width profiles use --max-points)")

    def existing(self, args, out: Path):
        from ..latency.profile import Profile

        return Profile.load(out) if args.append and out.is_file() else None

    def measure(self, args, job, target, runtime, remote, settings, existing):
        from ..latency.measure import measure_profile

        model_name, data_name, example = job[2], job[3], job[1]
        print(f"profiling {model_name} ({data_name}, input {tuple(example.shape)}) with {runtime}"
              + (f" on the {remote.describe()}" if remote else " on this machine"), flush=True)
        profile = measure_profile([job], target, runtime=runtime, remote=remote, settings=settings, existing=existing,
                                  progress=lambda m: print(m, flush=True))
        return profile, summary(profile), ""


class _Blocks:
    """``--granularity blocks``: BSR kernels over block densities, on this machine, into the ``blocks`` section."""

    name = "blocks"

    def check(self, args) -> None:
        from ..latency.measure_blocks import parse_densities

        if args.rpc or args.tracker:
            raise HwpruneError("--granularity blocks measures on this machine only: timing a block profile on an RPC "
                               "device (its dense reference and the interleaved rounds over RPC) is not built yet; "
                               "run hwprune profile --granularity blocks on the device itself")
        if args.densities is not None:
            parse_densities(args.densities)  # a bad list fails before any measuring

    def existing(self, args, out: Path):
        from ..latency.profile import Profile

        return Profile.load(out) if out.is_file() else None  # its width tables are kept either way

    def measure(self, args, job, target, runtime, remote, settings, existing):
        from ..latency.measure_blocks import DEFAULT_DENSITIES, measure_block_profile, parse_densities, summary as blocks

        densities = parse_densities(args.densities) if args.densities is not None else list(DEFAULT_DENSITIES)
        print(f"block profile of {job[2]} ({job[3]}, input {tuple(job[1].shape)}) at densities "
              f"{', '.join(f'{d:g}' for d in densities)} on this machine", flush=True)
        profile = measure_block_profile([job], target, densities=densities, runtime=args.runtime, settings=settings,
                                        existing=existing, append=args.append, progress=lambda m: print(m, flush=True))
        return profile, blocks(profile), f" (its {len(existing.layers)} width tables unchanged)" if existing else ""


# ``--granularity``: what a profile measures, by name
PROFILE_KINDS = {k.name: k for k in (_Widths(), _Blocks())}


def run(args) -> int:
    import torch

    from ..data import load_dataset
    from ..models import build_model
    from ..latency.measure import ProfileSettings, check_where
    from ..runtimes.tvm.rpc import resolve_remote
    from ..target import load_target
    from .cmd_fit import DEFAULT_DATA, DEFAULT_MODEL

    for flag, value, lo in (("--max-points", args.max_points, 2), ("--repeats", args.repeats, 1)):
        if value < lo:
            raise HwpruneError(f"{flag} {value}: expected an integer >= {lo}")
    if args.batch_size is not None and args.batch_size < 1:
        raise HwpruneError(f"--batch-size {args.batch_size}: expected a positive integer")
    kind = PROFILE_KINDS[args.granularity]
    kind.check(args)
    target = load_target(args.target)
    remote = resolve_remote(target, rpc=args.rpc, tracker=args.tracker, key=args.key)
    runtime = args.runtime or ("tvm" if remote is not None else "onnxruntime")
    if kind.name == "widths":
        check_where(target, runtime, remote)  # a profile that would not be the device's: refused before any work
    if remote is not None:  # a missing linker or a wrong address fails in seconds, not after compiling
        from ..runtimes.tvm.rpc import check_device

        check_device(target, remote)
    out = Path(args.out) if args.out else _default_out(target)
    if out.is_dir():
        raise HwpruneError(f"--out {out}: that is a folder; give the profile's file name, e.g. {out / (target.name + '.json')}")
    check_writable_folder(out.parent)  # before minutes of measuring, not after
    existing = kind.existing(args, out)
    model_name, data_name = args.model or DEFAULT_MODEL, args.data or DEFAULT_DATA
    bundle = load_dataset(data_name, image_size=args.image_size)
    torch.manual_seed(0)
    model = build_model(model_name, in_channels=bundle.in_channels, num_classes=bundle.num_classes,
                        input_size=bundle.input_size).eval()
    example = torch.zeros(1, bundle.in_channels, bundle.input_size, bundle.input_size)
    settings = ProfileSettings(max_points=args.max_points, repeats=args.repeats, rounds=min(4, args.repeats),
                               batch_size=args.batch_size)
    print(f"target {target.name}: {target.description}")
    profile, table, note = kind.measure(args, (model, example, model_name, data_name), target, runtime, remote,
                                        settings, existing)
    if kind.name == "widths" and not args.append:
        note += _replacing(out, profile, target, runtime, remote)
    profile.save(out)
    print()
    print(table)
    if target.profile_path() is None:  # fit would not find it: say how it is used
        beside = target.path is not None and out.resolve().parent == target.path.resolve().parent
        note += (f"\nthe target names no latency.profile: pass --profile {out} to hwprune fit, or add "
                 f"'latency: {{profile: {out.name if beside else out.resolve()}}}' to the target file")
    print(f"\nwrote {out}{note}")
    return 0


def _replacing(out: Path, profile, target, runtime, remote) -> str:
    """A width profile written over an existing one (no --append) replaces its width tables; its blocks section,
    measured with ``--granularity blocks`` and not re-measured here, is kept when it is this machine's, runtime's
    and batch's (as a blocks run keeps the width tables), and what is dropped is said, not lost silently."""
    from ..latency.measure import incompatibilities
    from ..latency.profile import Profile

    if not out.is_file():
        return ""
    try:
        old = Profile.load(out)
    except HwpruneError:
        return f"\n{out} was not a readable profile; replaced"
    lines = []
    gone = [t for key, t in old.layers.items() if key not in profile.layers]
    if gone:
        lines.append(f"replaced its {len(old.layers)} width tables: {len(gone)} layer shapes this model does not have "
                     f"are gone (measure with --append to keep another model's tables)")
    if old.blocks is not None:
        problems = incompatibilities(old, target, runtime, profile.batch_size, remote)
        if problems:
            lines.append(f"its blocks section is dropped: it was measured differently ({'; '.join(problems)})")
        else:
            profile.blocks = old.blocks
            lines.append("its blocks section (--granularity blocks) is kept")
    return "".join(f"\n{out}: {line}" for line in lines)


def summary(profile) -> str:
    """A table of the profile: each layer shape, its grid and its latency at the largest widths."""
    rows = [("layer shape", "widths measured", "ms at widest", "used by")]
    for t in profile.layers.values():
        grid = " x ".join(f"{a} {g[0]}..{g[-1]} ({len(g)})" for a, g in zip(t.axes, t.grid))
        used = ", ".join(t.used_by[:2]) + (f" (+{len(t.used_by) - 2})" if len(t.used_by) > 2 else "")
        rows.append((t.key, grid, f"{float(t.ms[(-1,) * t.ms.ndim]):.4f}", used))
    return text_table(rows) + (f"\nruntime: {profile.runtime.get('label')}; {profile.measured_on}; batch "
                               f"{profile.batch_size}; call overhead {profile.call_overhead_ms:.4f} ms")
