"""Timing several things fairly on a shared machine: they take turns, and the order alternates.

Every latency hwprune reports goes through :func:`take_turns`: the onnxruntime comparison of dense and
pruned models, the layer profiles, TVM libraries on this machine or on an RPC device, and the
benchmarks. Each contender is a *sampler*, ``sample(n) -> n per-call milliseconds``, so a wall-clock
loop here and TVM's ``time_evaluator`` on a device share one schedule: in round ``r`` every contender
takes ``n`` samples, in the order of the names, reversed every other round, so that drift on a shared
machine (another job, frequency changes) hits all of them alike.

The timed calls are split into rounds and the round whose ratio to the first contender is the median
is kept (:func:`timed_in_rounds`): on a loaded machine one measurement in tens is far off
(docs/benchmarks.md, "The equal-latency rows again"). onnxruntime and TVM, here or on an RPC device,
report the same :class:`LatencyResult`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

Sampler = Callable[[int], list[float]]
ROUNDS = 3  # the timed calls are split into this many rounds (odd: one is the middle), each at least ROUND_CALLS long
ROUND_CALLS = 20


@dataclass
class LatencyStats:
    """Per-call latency in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int


@dataclass
class LatencyResult:
    """Latency of several models measured together, with the provenance of the numbers."""

    stats: dict[str, LatencyStats]
    batch_size: int
    runtime: str  # e.g. "onnxruntime 1.31.1 CPUExecutionProvider, 1 thread"
    measured_on: str  # machine description
    on_target: bool  # True only when measured on the target's own device
    note: str = ""
    warmup: int = 0
    # every round's median ratio of each model to the first (stats are the middle round's): the spread
    # between rounds says how steady the machine was
    round_ratios: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def take_turns(samplers: dict[str, Sampler], repeats: int, per_round: int) -> dict[str, list[float]]:
    """``repeats`` per-call milliseconds of every sampler, ``per_round`` at a time, taking turns.

    Example:
        >>> calls = {"a": lambda n: [1.0] * n, "b": lambda n: [2.0] * n}
        >>> {k: len(v) for k, v in take_turns(calls, repeats=7, per_round=3).items()}
        {'a': 7, 'b': 7}
    """
    times: dict[str, list[float]] = {k: [] for k in samplers}
    names = list(samplers)
    per_round = max(1, min(per_round, repeats))
    done, r = 0, 0
    while done < repeats:
        n = min(per_round, repeats - done)
        for k in names if r % 2 == 0 else names[::-1]:
            times[k].extend(samplers[k](n))
        done += n
        r += 1
    return times


def wall_clock(call: Callable[[], object], *, untimed_first: bool = False) -> Sampler:
    """A sampler that times ``n`` consecutive calls of ``call`` with ``time.perf_counter``.
    ``untimed_first``: one call before the timed ones, so that a block starts with this callable's
    data in cache rather than the previous contender's."""

    def sample(n: int) -> list[float]:
        if untimed_first:
            call()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            call()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    return sample


def warm_up(calls, times: int) -> None:
    """Call every callable ``times`` times (first-call costs: allocation, lazy initialisation, caches)."""
    for f in calls:
        for _ in range(times):
            f()


def _stats(times: dict[str, list[float]]) -> dict[str, LatencyStats]:
    return {k: LatencyStats(float(np.median(v)), float(np.percentile(v, 10)), float(np.percentile(v, 90)), len(v))
            for k, v in times.items()}


def timed_in_rounds(time_round: Callable[[int, int], dict[str, list[float]]], repeats: int,
                    rounds: int = ROUNDS) -> tuple[dict[str, LatencyStats], list[dict[str, float]]]:
    """``repeats`` timed calls in ``rounds`` rounds (one round under ``rounds * ROUND_CALLS`` calls):
    ``time_round(i, n)`` gives ``n`` per-call milliseconds of every model in round ``i``; the stats are
    the middle round's (:func:`middle_round`), with every round's ratios. onnxruntime and TVM time alike.

    Example:
        >>> times = iter([{"d": [2.0] * 30, "p": [1.0] * 30}, {"d": [2.0] * 30, "p": [1.6] * 30},
        ...               {"d": [2.0] * 30, "p": [1.2] * 30}])
        >>> stats, ratios = timed_in_rounds(lambda i, n: next(times), repeats=90)
        >>> stats["p"].median_ms, [r["p"] for r in ratios]
        (1.2, [0.5, 0.8, 0.6])
    """
    n_rounds = rounds if repeats >= rounds * ROUND_CALLS else 1
    timed = [_stats(time_round(i, repeats // n_rounds + (i < repeats % n_rounds))) for i in range(n_rounds)]
    return middle_round(timed)


def middle_round(rounds: list[dict[str, LatencyStats]]) -> tuple[dict[str, LatencyStats], list[dict[str, float]]]:
    """The round whose median ratio of the second model to the first is the median over ``rounds`` (by the
    first model's own time when there is one model), and every round's ratios to the first model.

    One interleaved measurement on a loaded 2-core machine was, once in 30, 37% low (probably a phase of
    load that slowed the larger model more; the cause was not measured). With three rounds one such
    phase is outvoted.

    Example:
        >>> r = lambda d, p: {"dense": LatencyStats(d, d, d, 10), "pruned": LatencyStats(p, p, p, 10)}
        >>> stats, ratios = middle_round([r(2.0, 1.0), r(3.0, 0.9), r(2.0, 1.1)])   # the second round is off
        >>> stats["pruned"].median_ms, [x["pruned"] for x in ratios]
        (1.0, [0.5, 0.3, 0.55])
    """
    names = list(rounds[0])
    ratios = [{k: st[k].median_ms / st[names[0]].median_ms for k in names[1:]} for st in rounds]
    key = ((lambda i: ratios[i][names[1]]) if len(names) > 1 else (lambda i: rounds[i][names[0]].median_ms))
    middle = sorted(range(len(rounds)), key=key)[len(rounds) // 2]
    return rounds[middle], ratios
