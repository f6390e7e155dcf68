"""The ``blocks`` section of a latency profile: BSR kernel time per sparse layer shape over block densities.

``hwprune profile --granularity blocks`` measures it (:mod:`hwprune.latency.measure_blocks`); it sits next to
the width tables in ``profiles/<target>.json`` and never changes them. One :class:`BlockTable` per
sparse layer shape: the layer's weight as a matrix ``[out, in·kh·kw]``, the block, the kept fractions
of blocks measured (``densities``), the BSR kernel's ms at each (im2col included for a k x k conv, as
``hwprune export --format tvm`` runs it) and the dense layer's ms on the width profile's runtime.

:func:`predict_block_latency` sums, over layers, the piecewise-linear interpolation of each layer's
table at its density.

Example:
    >>> t = BlockTable("linear 32x64 block 16x1", "linear", {}, (32, 64), (16, 1), 32, [0.25, 1.0], [1.0, 4.0], 3.0)
    >>> t.predict(0.5)
    2.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..errors import ProfileError
from .shapes import layer_key

RUNTIME = "tvm (hwprune BSR kernels)"
OPS = ("conv2d", "linear")


def block_key(op: str, shape: dict, matrix, block) -> str:
    """The blocks-table key of a sparse layer shape: its width-profile key, matrix and block.

    Example:
        >>> block_key("linear", {}, (30, 640), (8, 1))
        'linear 30x640 block 8x1'
        >>> block_key("conv2d", {"kernel": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
        ...                      "input_hw": [8, 8]}, (24, 27), (8, 1))
        'conv2d k3x3 s1x1 p1x1 d1x1 in8x8 24x27 block 8x1'
    """
    return f"{layer_key(op, shape)} {int(matrix[0])}x{int(matrix[1])} block {int(block[0])}x{int(block[1])}"


@dataclass
class BlockTable:
    """BSR time (ms) of one sparse layer shape at increasing block densities, and its dense time."""

    key: str
    op: str
    shape: dict[str, Any]
    matrix: tuple[int, int]
    block: tuple[int, int]
    columns: int  # batch columns of the product: batch, or batch x output positions for a conv
    densities: list[float]
    ms: list[float]
    dense_ms: float
    kept_blocks: list[int] = field(default_factory=list)
    kernel: str = ""
    used_by: list[str] = field(default_factory=list)

    @property
    def n_blocks(self) -> int:
        (o, k), (r, c) = self.matrix, self.block
        return -(-o // r) * -(-k // c)

    def covers(self, density: float) -> bool:
        return self.densities[0] - 1e-9 <= density <= self.densities[-1] + 1e-9

    def predict(self, density: float) -> float:
        """ms at ``density`` (kept fraction of blocks): linear between the two measured neighbours."""
        d = np.asarray(self.densities, dtype=float)
        if len(d) == 1:
            return float(self.ms[0])
        return float(np.interp(float(density), d, np.asarray(self.ms, dtype=float)))

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "op": self.op, "shape": self.shape, "matrix": list(self.matrix),
                "block": list(self.block), "columns": self.columns, "kernel": self.kernel,
                "densities": [round(float(v), 6) for v in self.densities], "kept_blocks": list(self.kept_blocks),
                "ms": [round(float(v), 6) for v in self.ms], "dense_ms": round(float(self.dense_ms), 6),
                "used_by": list(self.used_by)}


@dataclass
class BlockSection:
    """Every block table of a profile and how they were measured (``runtime`` is the BSR side,
    ``dense_runtime`` what ``dense_ms`` ran on)."""

    tables: dict[str, BlockTable]
    runtime: str = RUNTIME
    dense_runtime: str = ""
    info: dict[str, Any] = field(default_factory=dict)  # created, tvm, target, batch_size, statistic, ...

    @property
    def batch_size(self) -> int:
        return int(self.info.get("batch_size", 1))

    def to_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "dense_runtime": self.dense_runtime, **self.info,
                "tables": [t.to_dict() for t in self.tables.values()]}


def _number_list(r, raw: dict, key: str, p: str, lo: float, hi: float, expected: str) -> list[float]:
    values = r.get(raw, key, list, expected, prefix=p)
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                              and lo <= v <= hi for v in values):
        r.fail(p + key, expected, values)
    return [float(v) for v in values]


def _pair(r, raw: dict, key: str, p: str) -> tuple[int, int]:
    v = r.get(raw, key, list, "two positive integers", prefix=p)
    if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
        r.fail(p + key, "two positive integers", v)
    return int(v[0]), int(v[1])


def section_from_dict(r, raw: Any, where: str = "blocks") -> BlockSection:
    """Validate the ``blocks`` section (``r`` is the profile loader's checker: one-line errors naming the key)."""
    r.mapping(raw, where)
    p = where + "."
    runtime = r.get(raw, "runtime", str, f"'{RUNTIME}'", prefix=p)
    dense_runtime = r.get(raw, "dense_runtime", str, "the dense layers' runtime (a label)", prefix=p)
    batch = r.get(raw, "batch_size", int, "a positive integer", prefix=p)
    if batch < 1:
        r.fail(p + "batch_size", "a positive integer", batch)
    tables: dict[str, BlockTable] = {}
    for i, t in enumerate(r.get(raw, "tables", list, "a list of block tables", prefix=p)):
        q = f"{p}tables[{i}]."
        r.mapping(t, f"{p}tables[{i}]")
        op = r.get(t, "op", str, f"one of {', '.join(OPS)}", prefix=q)
        if op not in OPS:
            r.fail(q + "op", f"one of {', '.join(OPS)}", op)
        matrix, block = _pair(r, t, "matrix", q), _pair(r, t, "block", q)
        dens = _number_list(r, t, "densities", q, 1e-12, 1.0, "a non-empty list of kept fractions in (0, 1]")
        if any(b <= a for a, b in zip(dens, dens[1:])):
            r.fail(q + "densities", "strictly increasing densities", dens)
        ms = _number_list(r, t, "ms", q, 0.0, math.inf, "a list of finite latencies >= 0 (ms)")
        if len(ms) != len(dens):
            r.fail(q + "ms", f"{len(dens)} values (one per density)", ms)
        dense = r.get(t, "dense_ms", (int, float), "a finite latency >= 0 (ms)", prefix=q)
        if not math.isfinite(dense) or dense < 0:
            r.fail(q + "dense_ms", "a finite latency >= 0 (ms)", dense)
        columns = r.get(t, "columns", int, "a positive integer", prefix=q)
        if columns < 1:
            r.fail(q + "columns", "a positive integer", columns)
        key = r.get(t, "key", str, "a string", prefix=q)
        if key in tables:
            r.fail(q + "key", "unique keys", key)
        tables[key] = BlockTable(key, op, r.get(t, "shape", dict, "a mapping", prefix=q), matrix, block, columns,
                                 dens, ms, float(dense), r.get(t, "kept_blocks", list, "a list", prefix=q, default=[]),
                                 r.get(t, "kernel", str, "a string", prefix=q, default=""),
                                 r.get(t, "used_by", list, "a list", prefix=q, default=[]))
    info = {k: v for k, v in raw.items() if k not in ("runtime", "dense_runtime", "tables")}
    return BlockSection(tables, runtime, dense_runtime, info)


def _measure_hint(profile) -> str:
    return f"hwprune profile --target {profile.target} --granularity blocks --model MODEL --append"


def find_block_table(profile, layer: str, *, model: str | None = None) -> BlockTable:
    """The block table of ``layer``: a table key, ``model:layer`` as in ``used_by``, or a bare layer name
    (with ``model`` to tell models apart). A layer the profile does not cover is an error saying how to measure it."""
    where = f"{profile.path}: " if profile.path else ""
    section = getattr(profile, "blocks", None)
    if section is None:
        raise ProfileError(f"{where}the profile of '{profile.target}' has no blocks section; measure it with: "
                           f"{_measure_hint(profile)}")
    if layer in section.tables:
        return section.tables[layer]
    found = {t.key: t for t in section.tables.values()
             for u in t.used_by if u == layer or (":" not in layer and u.rsplit(":", 1)[-1] == layer
                                                   and (model is None or u.rsplit(":", 1)[0] == model))}
    if len(found) == 1:
        return next(iter(found.values()))
    if len(found) > 1:
        raise ProfileError(f"{where}layer '{layer}' is in {len(found)} block tables ({', '.join(sorted(found))}); "
                           "name it as MODEL:LAYER or pass model=")
    raise ProfileError(f"{where}layer '{layer}' is not covered by the blocks section ({len(section.tables)} tables); "
                       f"measure it with: {_measure_hint(profile)}")


def block_layer_latency(profile, per_layer_density: Mapping[str, float], *, model: str | None = None) -> dict[str, float]:
    """Predicted BSR ms of each layer in ``{layer: density}`` (see :func:`find_block_table` for names)."""
    out = {}
    for layer, density in per_layer_density.items():
        t = find_block_table(profile, layer, model=model)
        if not (isinstance(density, (int, float)) and math.isfinite(density) and 0 < density <= 1):
            raise ProfileError(f"layer '{layer}': density {density!r}: expected a kept fraction of blocks in (0, 1]")
        if not t.covers(density):
            raise ProfileError(f"layer '{layer}': density {density:.4g} is outside the measured "
                               f"{t.densities[0]:.4g}..{t.densities[-1]:.4g} of '{t.key}'; measure it with: "
                               f"{_measure_hint(profile)} --densities including {density:.2f}")
        out[layer] = t.predict(density)
    return out


def predict_block_latency(profile, per_layer_density: Mapping[str, float], *, model: str | None = None) -> float:
    """Predicted time (ms) of the sparse layers at the given block densities: the sum over layers of
    each layer's table interpolated (piecewise-linearly) at its density.

    Example:
        >>> predict_block_latency(Profile.load("profiles/host-cpu.json"), {"layers.0.0.conv1": 0.3})  # doctest: +SKIP
        0.0123
    """
    return float(sum(block_layer_latency(profile, per_layer_density, model=model).values()))
