"""Timing several things fairly on a shared machine: they take turns, and the order alternates.

Every latency hwprune reports goes through :func:`take_turns`: the onnxruntime comparison of dense and
pruned models, the layer profiles, TVM libraries on this machine or on an RPC device, and the
benchmarks. Each contender is a *sampler*, ``sample(n) -> n per-call milliseconds``, so a wall-clock
loop here and TVM's ``time_evaluator`` on a device share one schedule: in round ``r`` every contender
takes ``n`` samples, in the order of the names, reversed every other round, so that drift on a shared
machine (another job, frequency changes) hits all of them alike.
"""

from __future__ import annotations

import time
from typing import Callable

Sampler = Callable[[int], list[float]]


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
