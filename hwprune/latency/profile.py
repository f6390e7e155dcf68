"""The latency profile file (``profiles/<target>.json``): measured layer latencies and their provenance.

A profile says where and how it was measured (machine, runtime and library versions, batch size,
date, warm-up and repeats) and holds one table per *layer shape*: the latency of a conv / depthwise
conv / linear layer of that shape at a grid of kept widths. Tables are keyed by everything but the
widths (``conv2d k3x3 s1x1 p1x1 d1x1 in8x8``), so layers of the same shape share one table.

``ms`` is the layer's own kernel time, without what a one-layer model adds around it: with
onnxruntime, the mean (middle 80%) of the layer node's time in onnxruntime's own profiler (its
NCHWc graph puts a layout reorder before and after a lone conv, which cost up to 70% of the conv
itself and do not exist inside a model); with TVM, the median ``time_evaluator`` time of a function
holding the layer's one kernel, minus ``call_overhead_ms`` (the same for a function with one trivial
kernel). ``statistic`` in the file says which.

Loading checks every key; a malformed file is a :class:`~hwprune.errors.ProfileError` that names the
file and the key.

Example:
    >>> p = Profile.load("profiles/host-cpu.json")                      # doctest: +SKIP
    >>> p.layers["linear"].predict(160, 10)                              # doctest: +SKIP
    0.0021
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ProfileError
from ..io import atomic_write_json

FORMAT = "hwprune-latency-profile"
VERSION = 1
OPS = {"conv2d": ("cin", "cout"), "depthwise": ("channels",), "linear": ("cin", "cout")}


@dataclass
class LayerTable:
    """Latency (ms) of one layer shape over a grid of kept widths; ``axes`` name the grid's dimensions."""

    key: str
    op: str
    shape: dict[str, Any]
    grid: list[list[int]]
    ms: np.ndarray
    used_by: list[str] = field(default_factory=list)

    @property
    def axes(self) -> tuple[str, ...]:
        return OPS[self.op]

    def covers(self, *counts: float) -> bool:
        return all(g[0] - 1e-9 <= c <= g[-1] + 1e-9 for g, c in zip(self.grid, counts))

    def predict(self, *counts: float, table: np.ndarray | None = None) -> float:
        """Latency at the given widths: multilinear interpolation between measured grid points.

        Example:
            >>> t = LayerTable("k", "linear", {}, [[8, 16], [10]], np.array([[1.0], [2.0]]))
            >>> t.predict(12, 10)
            1.5
        """
        values = self.ms if table is None else table
        for axis, c in enumerate(counts):
            values = _interp_axis(values, np.asarray(self.grid[axis], dtype=float), float(c))
        return float(values)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "op": self.op, "shape": self.shape, "axes": list(self.axes),
                "grid": [list(map(int, g)) for g in self.grid], "ms": np.round(self.ms, 6).tolist(),
                "used_by": list(self.used_by)}


def _interp_axis(values: np.ndarray, grid: np.ndarray, c: float) -> np.ndarray:
    """Interpolate the first axis of ``values`` at ``c`` (linear; a one-point axis is constant)."""
    if len(grid) == 1:
        return values[0]
    i = int(np.clip(np.searchsorted(grid, c) - 1, 0, len(grid) - 2))
    t = (c - grid[i]) / (grid[i + 1] - grid[i])
    return values[i] * (1 - t) + values[i + 1] * t


@dataclass
class Profile:
    """A measured latency profile of one target. Build with :mod:`hwprune.latency.measure`, read with :meth:`load`."""

    target: str
    created: str
    machine: dict[str, Any]
    measured_on: str
    on_target_device: bool
    runtime: dict[str, Any]
    libraries: dict[str, str]
    batch_size: int
    warmup: int
    repeats: int
    call_overhead_ms: float
    layers: dict[str, LayerTable]
    statistic: str = ""
    models: list[dict[str, Any]] = field(default_factory=list)
    blocks: Any = None  # a hwprune.latency.profile_blocks.BlockSection: BSR kernel time over block densities
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "version": VERSION, "target": self.target, "created": self.created,
            "machine": self.machine, "measured_on": self.measured_on, "on_target_device": self.on_target_device,
            "runtime": self.runtime, "libraries": self.libraries, "batch_size": self.batch_size,
            "statistic": self.statistic,
            "warmup": self.warmup, "repeats": self.repeats, "call_overhead_ms": round(self.call_overhead_ms, 6),
            "models": self.models, "layers": [t.to_dict() for t in self.layers.values()],
            **({"blocks": self.blocks.to_dict()} if self.blocks is not None else {}),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile atomically (a crash never leaves half a file)."""
        self.path = atomic_write_json(path, self.to_dict())
        return self.path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ProfileError(f"{path}: no such profile; measure one with: hwprune profile --target TARGET") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ProfileError(f"{path}: cannot read the profile: {e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        profile = cls.from_dict(data, source=str(path))
        profile.path = path
        return profile

    @classmethod
    def from_dict(cls, data: Any, source: str = "<profile>") -> "Profile":
        from .profile_blocks import section_from_dict

        r = _Check(source)
        r.mapping(data, "(top level)")
        if data.get("format") != FORMAT:
            r.fail("format", f"'{FORMAT}'", data.get("format"))
        if data.get("version") != VERSION:
            r.fail("version", f"{VERSION} (this hwprune reads version {VERSION} only)", data.get("version"))
        layers = {}
        raw_layers = r.get(data, "layers", list, "a list of layer tables")
        for i, raw in enumerate(raw_layers):
            t = _layer_from_dict(r, raw, f"layers[{i}]")
            if t.key in layers:
                r.fail(f"layers[{i}].key", "unique keys", t.key)
            layers[t.key] = t
        overhead = r.get(data, "call_overhead_ms", (int, float), "a number of ms >= 0")
        if not math.isfinite(overhead) or overhead < 0:
            r.fail("call_overhead_ms", "a number of ms >= 0", overhead)
        batch = r.get(data, "batch_size", int, "a positive integer")
        if batch < 1:
            r.fail("batch_size", "a positive integer", batch)
        runtime = r.get(data, "runtime", dict, "a mapping with 'name'")
        if not isinstance(runtime.get("name"), str):
            r.fail("runtime.name", "a string such as 'onnxruntime' or 'tvm'", runtime.get("name"))
        return cls(
            target=r.get(data, "target", str, "the target's name"),
            created=r.get(data, "created", str, "an ISO date"),
            machine=r.get(data, "machine", dict, "a mapping (cpu, arch, hostname)"),
            measured_on=r.get(data, "measured_on", str, "a description of the machine"),
            on_target_device=r.get(data, "on_target_device", bool, "true or false"),
            runtime=runtime, libraries=r.get(data, "libraries", dict, "a mapping of versions"),
            batch_size=batch, warmup=r.get(data, "warmup", int, "an integer"),
            repeats=r.get(data, "repeats", int, "an integer"), call_overhead_ms=float(overhead), layers=layers,
            statistic=r.get(data, "statistic", str, "a description of the statistic", default=""),
            models=r.get(data, "models", list, "a list", default=[]),
            blocks=section_from_dict(r, data["blocks"]) if "blocks" in data else None,
        )


class _Check:
    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, expected: str, got: Any = None, *, message: str | None = None):
        shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."
        raise ProfileError(f"{self.source}: key '{key}': " + (message or f"expected {expected}, got {shown}"))

    def mapping(self, value, key):
        if not isinstance(value, dict):
            self.fail(key, "a JSON object", value)

    def get(self, data: dict, key: str, types, expected: str, *, prefix: str = "", default: Any = ...):
        name = f"{prefix}{key}"
        if key not in data:
            if default is not ...:
                return default
            self.fail(name, "", message="missing required key")
        value = data[key]
        ok = isinstance(value, types) and not (isinstance(value, bool) and types in (int, (int, float)))
        if not ok:
            self.fail(name, expected, value)
        return value


def _layer_from_dict(r: _Check, raw: Any, where: str) -> LayerTable:
    r.mapping(raw, where)
    p = where + "."
    op = r.get(raw, "op", str, f"one of {', '.join(OPS)}", prefix=p)
    if op not in OPS:
        r.fail(p + "op", f"one of {', '.join(OPS)}", op)
    axes = r.get(raw, "axes", list, f"{list(OPS[op])}", prefix=p)
    if tuple(axes) != OPS[op]:
        r.fail(p + "axes", f"{list(OPS[op])} for op '{op}'", axes)
    grid = r.get(raw, "grid", list, "one list of widths per axis", prefix=p)
    if len(grid) != len(axes):
        r.fail(p + "grid", f"{len(axes)} lists (one per axis)", grid)
    for k, g in enumerate(grid):
        if not isinstance(g, list) or not g or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in g):
            r.fail(f"{p}grid[{k}]", "a non-empty list of positive integer widths", g)
        if any(b <= a for a, b in zip(g, g[1:])):
            r.fail(f"{p}grid[{k}]", "strictly increasing widths", g)
    ms_raw = r.get(raw, "ms", list, "nested lists of milliseconds", prefix=p)
    try:
        ms = np.asarray(ms_raw, dtype=np.float64)
    except (TypeError, ValueError):
        r.fail(p + "ms", "nested lists of numbers", ms_raw)
    want = tuple(len(g) for g in grid)
    if ms.shape != want:
        r.fail(p + "ms", f"shape {list(want)} (the grid's sizes)", list(ms.shape))
    if not np.all(np.isfinite(ms)) or np.any(ms < 0):
        r.fail(p + "ms", "finite latencies >= 0", ms_raw)
    return LayerTable(
        key=r.get(raw, "key", str, "a string", prefix=p), op=op, shape=r.get(raw, "shape", dict, "a mapping", prefix=p),
        grid=[list(g) for g in grid], ms=ms, used_by=r.get(raw, "used_by", list, "a list", prefix=p, default=[]),
    )

