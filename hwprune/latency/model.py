"""A latency cost model built from a measured profile: predicted milliseconds as a function of what is kept.

``predicted(keep) = overhead + scale * sum over conv/linear calls of table[layer](c_in, c_out)``
where the widths ``c = fixed + A @ keep`` are the cost variables of :mod:`hwprune.budget.cost` and each table
is interpolated between its measured grid points.

``overhead`` and ``scale`` are measured, not guessed (:meth:`LatencyModel.calibrated`): the model is
timed on the target's runtime at two widths, dense and every group at its minimum, and the line
through those two points is what the layer tables are scaled to. ``overhead`` holds what the tables
do not see (the per-call cost, pooling, the reorders at the model's ends, the profiler's own per-node
cost, about 6 us a node here); ``scale`` the difference between the machine's speed when the profile
was measured and now (a shared machine), and a layer's speed inside a model, with warm caches, against
alone. Measured on the default model here: with the overhead alone (scale 1) pruned models came out
up to 60% off; with both, within 8% at every width tried.

It has the two methods :func:`hwprune.budget.project` uses, ``__call__(keep)`` and
``unit_savings(keep)``, so a latency budget is met the way a FLOPs budget is: the chunk of units with
the smallest importance per millisecond saved goes first.

Tables are made monotone before use (running maximum along each width axis): timing noise must never
make a narrower layer look slower than a wider one, which would stop the projection from removing it.
The raw measurements stay in the profile file.

Example:
    >>> lm = LatencyModel.build(profile, net, x, groups)                          # doctest: +SKIP
    >>> lm = lm.calibrated(dense_ms=0.41, min_ms=0.05, min_keep=mins)              # doctest: +SKIP
    >>> lm(np.ones(lm.n_units))                                                    # doctest: +SKIP
    0.41
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ProfileError
from .shapes import LayerUse, layer_uses
from .profile import LayerTable, Profile


def monotone(ms: np.ndarray) -> np.ndarray:
    """Running maximum along every axis: latency never decreases as a width grows.

    Example:
        >>> monotone(np.array([[1.0, 0.5], [0.8, 2.0]])).tolist()
        [[1.0, 1.0], [1.0, 2.0]]
    """
    out = np.array(ms, dtype=np.float64)
    for axis in range(out.ndim):
        out = np.maximum.accumulate(out, axis=axis)
    return out


@dataclass
class LatencyModel:
    """Predicted latency (ms) of a model as a function of its kept units."""

    uses: list[LayerUse]
    tables: list[LayerTable]
    smooth: list[np.ndarray]
    A: object  # scipy csr (n_vars, n_units)
    fixed: np.ndarray
    overhead_ms: float
    profile_path: str | None = None
    scale: float = 1.0
    calibration: dict | None = None
    name: str = field(default="latency", init=False)
    in_ms = True  # the interface of hwprune.budget.cost.CostModel
    stepwise = True
    saves_compute = True

    @classmethod
    def build(cls, profile: Profile, model, example, groups, *, overhead_ms: float = 0.0) -> "LatencyModel":
        """Map every conv / linear call of ``model`` to its profile table; a missing or too small table is
        an error that says which layer needs what and how to measure it."""
        uses, A, fixed = layer_uses(model, example, groups)
        tables, missing = [], []
        for u in uses:
            t = profile.layers.get(u.key)
            if t is None:
                missing.append(f"'{u.name}' ({u.key}): no table")
                continue
            lo = tuple(g[0] for g in u.grids)
            hi = tuple(g[-1] for g in u.grids)
            if not (t.covers(*lo) and t.covers(*hi)):
                have = " x ".join(f"{a} {g[0]}..{g[-1]}" for a, g in zip(t.axes, t.grid))
                need = " x ".join(f"{a} {l}..{h}" for a, l, h in zip(t.axes, lo, hi))
                missing.append(f"'{u.name}' ({u.key}): needs {need}, the profile has {have}")
            tables.append(t)
        if missing:
            where = profile.path or f"the profile of '{profile.target}'"
            raise ProfileError(
                f"{where} does not cover this model: {'; '.join(missing[:4])}"
                + (f" (and {len(missing) - 4} more)" if len(missing) > 4 else "")
                + f". Measure it: hwprune profile --target {profile.target} --model MODEL --data DATA --append")
        return cls(uses, tables, [monotone(t.ms) for t in tables], A, fixed, float(overhead_ms),
                   str(profile.path) if profile.path else None)

    def calibrated(self, dense_ms: float, min_ms: float, min_keep: np.ndarray, **info) -> "LatencyModel":
        """A copy whose predictions pass through two measured points: the dense model (``dense_ms``) and
        the model with ``min_keep`` kept (``min_ms``)."""
        layers_dense = float(sum(self.layer_ms(np.ones(self.n_units))))
        layers_min = float(sum(self.layer_ms(min_keep)))
        if not dense_ms > min_ms or not layers_dense > layers_min:
            raise ProfileError(
                f"latency calibration failed: the narrowest model measured {min_ms:.4f} ms, the dense one "
                f"{dense_ms:.4f} ms (profile tables {layers_min:.4f} / {layers_dense:.4f} ms); the measurement is "
                "too noisy or pruning does not speed this model up on this runtime")
        scale = (dense_ms - min_ms) / (layers_dense - layers_min)
        overhead = dense_ms - scale * layers_dense
        cal = {"dense_ms": dense_ms, "min_ms": min_ms, "layers_dense_ms": layers_dense, "layers_min_ms": layers_min,
               "scale": scale, "overhead_ms": overhead, **info}
        return LatencyModel(self.uses, self.tables, self.smooth, self.A, self.fixed, overhead, self.profile_path,
                            scale, cal)

    @property
    def n_units(self) -> int:
        return self.A.shape[1]

    def counts(self, keep: np.ndarray) -> np.ndarray:
        return self.fixed + self.A @ np.asarray(keep, dtype=np.float64)

    def _widths(self, u: LayerUse, c: np.ndarray) -> tuple[float, ...]:
        return tuple(float(c[v]) if v >= 0 else float(w) for v, w in zip(u.vars, u.full))

    def cost_of_counts(self, c: np.ndarray) -> np.ndarray:
        """The predicted latency of every column of ``c`` (per-variable kept counts x candidates)."""
        return self.overhead_ms + self.partial_cost(c, None)

    def partial_cost(self, c: np.ndarray, rows) -> np.ndarray:
        """The scaled latency of the layers that read any variable in ``rows`` (every layer for None), per
        column of ``c``: the allocation solver varies one group and re-predicts only its layers."""
        touched = set(int(r) for r in rows) if rows is not None else None
        out = np.zeros(c.shape[1])
        for u, t, sm in zip(self.uses, self.tables, self.smooth):
            if touched is not None and not touched.intersection(u.vars):
                continue
            for j in range(c.shape[1]):
                out[j] += t.predict(*self._widths(u, c[:, j]), table=sm)
        return self.scale * out

    def layer_ms(self, keep: np.ndarray) -> list[float]:
        """Predicted ms of every conv / linear call, in model order."""
        c = self.counts(keep)
        return [t.predict(*self._widths(u, c), table=s) for u, t, s in zip(self.uses, self.tables, self.smooth)]

    def __call__(self, keep: np.ndarray) -> float:
        """Predicted latency in ms with units kept where ``keep`` is 1."""
        return self.overhead_ms + self.scale * float(sum(self.layer_ms(keep)))

    def unit_savings(self, keep: np.ndarray) -> np.ndarray:
        """Milliseconds saved by removing each unit alone, to first order, at the current ``keep``.

        Per width variable: the slope of each layer's table just below the current width (removing a
        channel walks down the table), summed over the layers that width feeds; ``A.T`` spreads it
        over the units, exactly as :meth:`hwprune.budget.cost.CostModel.unit_savings` does for FLOPs.
        """
        c = self.counts(keep)
        grad = np.zeros(len(self.fixed))
        for u, t, s in zip(self.uses, self.tables, self.smooth):
            widths = self._widths(u, c)
            here = t.predict(*widths, table=s)
            for axis, v in enumerate(u.vars):
                if v < 0:
                    continue
                lower = list(widths)
                lower[axis] -= 1.0
                grad[v] += here - t.predict(*lower, table=s)
        return self.scale * (self.A.T @ grad)

    def describe(self) -> dict:
        """What the model is made of (for the report)."""
        ones = np.ones(self.n_units)
        return {"profile": self.profile_path, "overhead_ms": self.overhead_ms, "scale": self.scale,
                "calibration": self.calibration,
                "layers_ms_dense": float(sum(self.layer_ms(ones))), "predicted_dense_ms": self(ones),
                "tables": sorted({t.key for t in self.tables}),
                "smoothing": "running maximum along each width axis (noise never makes a wider layer cheaper)"}
