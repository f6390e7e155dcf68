"""Latency budgets for ``fit``: the target's profile, a calibrated latency model, and where it is measured.

``hwprune fit --latency-ms X`` (or ``--speedup S``: X = the dense model's measured latency / S) needs
a latency model of *this* model on *this* target: the target's measured profile (``hwprune profile``)
gives every layer's latency against its widths, and two whole-model measurements on the target's
runtime (dense, and every group at its minimum width) calibrate it (:meth:`LatencyModel.calibrated`).
The calibration is written to the run folder, so a resumed run predicts exactly what it predicted.

Runtimes: onnxruntime on this machine, or TVM (the hand-scheduled dense path) here or on an RPC
device. The profile must come from the same runtime as the measurement.

Example:
    >>> lm = latency_model_for(net, x, groups, target, runtime="onnxruntime", cache=run_dir / "latency_model.json")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import ProfileError
from ..io import atomic_write_json
from ..runtimes.clock import LatencyResult
from .model import LatencyModel
from .profile import Profile
from ..runtimes import RUNTIMES, runtime
from ..runtimes.tvm.rpc import RemoteSpec
from ..target import Target, host_description

def measurement_runtime(requested: str | None, remote: RemoteSpec | None) -> str:
    """The runtime that times a run: on an RPC device the one that runs there (TVM), else what was asked
    (onnxruntime by default)."""
    if requested is not None:
        chosen = runtime(requested, "--latency-runtime")
        if remote is not None and not chosen.remote:
            raise ProfileError(f"an RPC device runs TVM libraries: --latency-runtime {requested} cannot be used with "
                               "--rpc/--tracker")
        return chosen.name
    if remote is not None:
        return next(r.name for r in RUNTIMES.values() if r.remote)
    return "onnxruntime"


def profile_command(target: Target, *extra: str) -> str:
    """The command that measures ``target``'s profile, runnable as printed: ``--target`` names the target's
    file unless it is a shipped one, and a device that is not this machine is profiled over RPC."""
    remote = () if target.is_local else ("--rpc HOST:PORT",) + (() if "--runtime" in extra else ("--runtime tvm",))
    return " ".join(("hwprune profile --target", target.ref) + remote + extra)


def load_profile(target: Target, path: str | os.PathLike | None, runtime: str) -> Profile:
    """The profile for a latency budget: ``path``, or the target's ``latency.profile``; checked against the
    target and the runtime that will measure the run."""
    p = Path(path) if path else target.profile_path()
    if p is None:
        raise ProfileError(f"target '{target.name}' names no latency profile (latency.profile) and no --profile was "
                           f"given; measure one: {profile_command(target, '--out', target.name + '.json')}, then "
                           f"pass --profile {target.name}.json (or name it in the target's latency.profile)")
    if path and not p.is_file():
        out = p / f"{target.name}.json" if p.is_dir() else p
        raise ProfileError(f"--profile {path}: " + ("a folder, not a profile file" if p.is_dir() else "no such file")
                           + f"; give a profile measured for target '{target.name}', or measure one: "
                           + profile_command(target, "--out", str(out)))
    if not p.is_file():
        raise ProfileError(f"{p}: target '{target.name}' has no measured profile yet; measure one: "
                           + profile_command(target))
    prof = Profile.load(p)
    if prof.target != target.name:
        raise ProfileError(f"{p}: measured for target '{prof.target}', not '{target.name}'; a profile of one device "
                           f"does not predict another. Measure this target's: {profile_command(target, '--out my-profile.json')}"
                           ", then --profile my-profile.json")
    if prof.runtime.get("name") != runtime:
        raise ProfileError(f"{p}: measured with {prof.runtime.get('name')}, but this run measures latency with {runtime}; "
                           f"profile with the same runtime ({profile_command(target, '--runtime', runtime)})")
    return prof


def min_width_keep(groups) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every prunable group at its minimum width (its first units): per group, and as a 0/1 vector."""
    keep, parts = {}, []
    for g in groups:
        if g.prunable:
            keep[g.name] = np.arange(g.min_keep)
            parts.append(np.r_[np.ones(g.min_keep), np.zeros(g.size - g.min_keep)])
    return keep, (np.concatenate(parts) if parts else np.zeros(0))


def measure(models: dict[str, torch.nn.Module], example: torch.Tensor, target: Target, *, runtime: str,
            remote: RemoteSpec | None = None, batch_size: int | None = None, repeats: int | None = None) -> LatencyResult:
    """Time models together (interleaved) on the run's runtime: onnxruntime here, or TVM here / on the device."""
    return RUNTIMES[runtime].time_models(models, example, target, remote=remote, batch_size=batch_size,
                                         repeats=repeats)


def _profile_cpu(profile: Profile) -> tuple[str | None, str]:
    """The CPU the profile was measured on (None for an RPC device's, which does not report it) and this one's."""
    return (profile.machine or {}).get("cpu"), host_description().split(" (")[0]


def profile_measured_where(profile: Profile) -> str:
    """Where ``profile`` was measured, and whether that is this machine, for a latency label.

    The stored ``measured_on`` ("this machine: ...") was true on the machine that wrote the profile; read
    anywhere else it would pass that machine off as this one.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> p = NS(machine={"cpu": "Some Other CPU 9000"}, measured_on="this machine: Some Other CPU 9000 (x86_64, 2 cores), vm")
        >>> profile_measured_where(p).startswith("Some Other CPU 9000 (x86_64, 2 cores), vm, not this machine (this one: ")
        True
    """
    where = profile.measured_on.removeprefix("this machine: ")
    theirs, ours = _profile_cpu(profile)
    if (profile.machine or {}).get("remote"):
        return f"{where}, not this machine"
    if not theirs:
        return f"{where} (the profile does not record its CPU: maybe not this machine)"
    if theirs == ours:
        return f"{where} (this machine's CPU)"
    return f"{where}, not this machine (this one: {ours})"


def profile_from_elsewhere(profile: Profile, remote: RemoteSpec | None, target: Target | None = None) -> str | None:
    """A sentence when ``profile`` was measured on another CPU than this one (a run timed here), else None.

    The latency model is re-anchored on two models timed here (dense and narrowest), but the shape of
    its layer tables, which decides how the widths are allocated, is the other CPU's. The run says so
    instead of passing one machine's profile off as this one's.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> p = NS(machine={"cpu": "Some Other CPU 9000"}, measured_on="this machine: Some Other CPU 9000 (x86_64, 2 cores), vm",
        ...        target="host-cpu")
        >>> profile_from_elsewhere(p, None).startswith("the latency profile was measured on Some Other CPU 9000")
        True
    """
    if remote is not None:
        return None  # an RPC device's profile is measured there; its CPU is not known here
    theirs, ours = _profile_cpu(profile)
    if not theirs or theirs == ours:
        return None
    return (f"the latency profile was measured on {theirs}, not on this machine ({ours}): its two anchors (dense and "
            "narrowest model) are re-measured here, but the per-layer shape that guides the allocation is the other "
            f"CPU's; measure this machine's: hwprune profile --target {target.ref if target else profile.target} "
            "--out my-profile.json, then --profile my-profile.json")


def latency_model_for(template: torch.nn.Module, example: torch.Tensor, groups, target: Target, *, runtime: str,
                      profile_path=None, remote: RemoteSpec | None = None, cache: Path | None = None,
                      batch_size: int | None = None, repeats: int | None = None, progress=None) -> LatencyModel:
    """The calibrated latency model of ``template`` (an untrained copy is fine: latency does not depend on
    the weights). With ``cache`` (the run folder's ``latency_model.json``) an earlier calibration is reused."""
    from ..apply.slicing import slice_model

    profile = load_profile(target, profile_path, runtime)
    elsewhere = profile_from_elsewhere(profile, remote, target)
    if elsewhere and progress:
        progress(f"[latency model] note: {elsewhere}")
    lm = LatencyModel.build(profile, template, example, groups)
    keep_min, vec_min = min_width_keep(groups)
    if cache is not None and Path(cache).is_file():
        cal = json.loads(Path(cache).read_text())
        return lm.calibrated(cal["dense_ms"], cal["min_ms"], vec_min, **{k: v for k, v in cal.items() if k not in (
            "dense_ms", "min_ms", "layers_dense_ms", "layers_min_ms", "scale", "overhead_ms")})
    if progress:
        progress(f"[latency model] profile {profile.path}; calibrating on the dense and the narrowest model ({runtime})")
    narrow = slice_model(copy.deepcopy(template).eval(), groups, keep_min).eval()
    res = measure({"dense": copy.deepcopy(template).eval(), "narrowest": narrow}, example, target, runtime=runtime,
                  remote=remote, batch_size=batch_size, repeats=repeats)
    lm = lm.calibrated(res.stats["dense"].median_ms, res.stats["narrowest"].median_ms, vec_min,
                       runtime=res.runtime, measured_on=res.measured_on, profile=str(profile.path),
                       profile_created=profile.created, profile_measured_on=profile.measured_on,
                       **({"profile_note": elsewhere} if elsewhere else {}))
    if cache is not None:
        atomic_write_json(cache, lm.calibration)
    return lm


def close_the_loop(plan_at: Callable[[float], dict], time_plan: Callable[[dict], float], budget_ms: float, *,
                   rounds: int = 4, tolerance: float = 0.03, progress=None) -> dict:
    """Plan, time the planned widths, re-plan against the measured miss: the factor on the budget that
    makes the *measured* latency of the plan meet ``budget_ms``.

    The latency model passes through two measured points (dense, narrowest); between them it follows
    the profile's one-layer tables, which can miss a model's in-model times (VGG-16-BN at 0.62 of the
    dense latency: +18%, docs/benchmarks.md). Widths, not weights, set latency, so the plan can be timed
    before any training. ``plan_at(ms) -> keep`` plans at a budget of ``ms`` (it may raise BudgetError
    below the reachable floor); ``time_plan(keep) -> ms`` measures it, on the calibration's scale. The
    loop stops at a measurement 1-3% under the budget (``tolerance`` 3%); otherwise the planning budget moves
    toward the middle of that band (scaled by aim / measured until one plan ran slow and one fast, then
    interpolated between the closest two: down when the plan ran slow, up when it ran needlessly fast). The
    factor kept is that of the widest plan measured at least 1% under the budget, else the one measured
    fastest: a budget is a ceiling.

    Example:
        >>> # a machine 20% slower than the model predicts: the loop plans at 0.98/1.2 of the budget
        >>> loop = close_the_loop(lambda ms: {"ms": ms}, lambda keep: 1.2 * keep["ms"], 10.0)
        >>> round(loop["factor"], 4), [round(r["measured_ms"], 2) for r in loop["rounds"]]
        (0.8167, [12.0, 9.8])
        >>> # as predicted: right at the budget, then 2% under it (the margin for the clock's noise)
        >>> [round(r["measured_ms"], 2) for r in close_the_loop(lambda ms: {"ms": ms}, lambda keep: keep["ms"], 10.0)["rounds"]]
        [10.0, 9.8]
    """
    from ..errors import BudgetError

    # the band accepted: within ``tolerance`` under the budget, with a third of it kept as a margin for
    # the clock's noise (a plan measured right at the budget misses it half the time when timed again)
    ceiling = budget_ms * (1 - tolerance / 3)
    factor, tried, plans = 1.0, [], []
    for _ in range(rounds):
        try:
            keep = plan_at(budget_ms * factor)
        except BudgetError:
            break  # below the reachable floor: keep what was measured
        same = next((r for r, k in zip(tried, plans) if _same_plan(k, keep)), None)
        if same is not None and factor > same["factor"] and same["measured_ms"] < budget_ms * (1 - tolerance):
            # planning wider gave the same widths, already timed under the budget: nothing wider is left to keep
            # (a budget above the dense model's latency); scaling the budget on would only grow it without end
            break
        measured = float(time_plan(keep))
        plans.append(keep)
        tried.append({"factor": factor, "planned_ms": budget_ms * factor, "measured_ms": measured})
        if progress:
            progress(f"[latency loop] planned at {budget_ms * factor:.4f} ms, measured {measured:.4f} ms "
                     f"against the budget {budget_ms:.4f} ms")
        if budget_ms * (1 - tolerance) <= measured <= ceiling:
            break
        aim = budget_ms * (1 - 2 * tolerance / 3)  # the middle of the accepted band
        slow = [r for r in tried if r["measured_ms"] > ceiling]
        fast = [r for r in tried if r["measured_ms"] < budget_ms * (1 - tolerance)]
        if slow and fast:
            # bracketed: interpolate between the closest plans on either side (regula falsi); it stays inside
            # the bracket where widths come in steps and the measured latency is flat between them
            hi = min(slow, key=lambda r: r["planned_ms"])
            lo = max(fast, key=lambda r: r["planned_ms"])
            t = (aim - lo["measured_ms"]) / (hi["measured_ms"] - lo["measured_ms"])
            factor = (lo["planned_ms"] + t * (hi["planned_ms"] - lo["planned_ms"])) / budget_ms
        else:
            factor *= aim / measured
    within = [r for r in tried if r["measured_ms"] <= ceiling]
    best = (max(within, key=lambda r: r["planned_ms"]) if within else
            min(tried, key=lambda r: r["measured_ms"]) if tried else {"factor": 1.0})
    return {"factor": best["factor"], "budget_ms": budget_ms, "tolerance": tolerance, "rounds": tried}


def _same_plan(a, b) -> bool:
    """Whether two plans (``{group: kept unit indices}``) keep the same units."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_plan(a[k], b[k]) for k in a)
    return bool(np.array_equal(np.asarray(a), np.asarray(b)))
