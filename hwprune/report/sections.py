"""The parts of report.json that come from measurements: latency, the latency model's check, throughput.

Each function turns what the run measured into one plain dict section; the fit pipeline assembles them
(``hwprune.training.pipeline``), and nothing here trains, times or exports.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def latency_section(latency) -> dict[str, Any]:
    """``report["latency"]``: how one :class:`~hwprune.runtimes.clock.LatencyResult` was measured,
    with its spread (p10, p90) per model.

    Example:
        >>> from types import SimpleNamespace as NS
        >>> s = lambda ms: NS(median_ms=ms, p10_ms=ms - 0.1, p90_ms=ms + 0.1, runs=200)
        >>> lat = NS(batch_size=1, runtime="onnxruntime", measured_on="this machine: x", on_target=True,
        ...          note="", warmup=20, stats={"dense": s(2.0), "pruned": s(1.0)})
        >>> latency_section(lat)["p90_ms"], latency_section(lat)["rounds"]
        ({'dense': 2.1, 'pruned': 1.1}, 1)
    """
    round_ratios = getattr(latency, "round_ratios", None) or []
    return {
        "batch_size": latency.batch_size, "runtime": latency.runtime, "measured_on": latency.measured_on,
        "on_target_device": latency.on_target, "note": latency.note, "runs": latency.stats["dense"].runs,
        "warmup": latency.warmup, "statistic": "median",
        # the timed calls in rounds, the middle one by pruned/dense kept (runs: that round's calls)
        "rounds": max(len(round_ratios), 1), "round_ratios": round_ratios,
        "p10_ms": {k: v.p10_ms for k, v in latency.stats.items()},
        "p90_ms": {k: v.p90_ms for k, v in latency.stats.items()},
    }


def latency_by_batch(latencies: list) -> dict[str, Any]:
    """``report["latency_by_batch"]``: the same models timed at several batch sizes, keyed by the size."""
    return {
        str(lat.batch_size): {**{k: v.median_ms for k, v in lat.stats.items()},
                              "p10_ms": {k: v.p10_ms for k, v in lat.stats.items()},
                              "p90_ms": {k: v.p90_ms for k, v in lat.stats.items()}}
        for lat in latencies
    }


def latency_model_check(predicted: dict[str, float], budget_ms: float, model_info: dict, measured: dict | None,
                        same_session: Callable[[float, float], tuple[float, float, float]] | None = None,
                        narrowest_ms: float | None = None) -> dict[str, Any]:
    """``report["latency_model"]``: what the latency model predicted at planning against what was measured.

    ``same_session(dense_ms, narrowest_ms) -> (ms, scale, overhead_ms)``, when given, re-predicts the pruned model with the model
    anchored on the dense and narrowest models timed in the same session as the pruned one (a shared
    machine drifts between planning and export); its error is the one ``within_10pct`` judges.

    Example:
        >>> check = latency_model_check({"dense": 2.0, "pruned": 1.0}, 1.0, {}, {"dense": 2.2, "pruned": 1.05})
        >>> round(check["error"]["pruned"], 3), check["within_10pct_of_planning"]
        (0.05, True)
    """
    lm: dict[str, Any] = {"predicted_ms": predicted, "budget_ms": budget_ms, "model": model_info}
    if measured is None:
        return lm
    err = {k: measured[k] / predicted[k] - 1.0 for k in ("dense", "pruned")}
    lm.update(measured_ms=dict(measured), error=err)
    if same_session is not None and narrowest_ms is not None:
        same, scale, overhead = same_session(measured["dense"], narrowest_ms)
        lm["same_session"] = {"narrowest_ms": narrowest_ms, "predicted_pruned_ms": same,
                              "error_pruned": measured["pruned"] / same - 1.0, "scale": scale, "overhead_ms": overhead}
        lm["within_10pct"] = bool(abs(lm["same_session"]["error_pruned"]) <= 0.10)
    lm["within_10pct_of_planning"] = bool(abs(err["pruned"]) <= 0.10)
    return lm


def throughput_section(history: list[dict[str, Any]], processes: int, data_workers: int) -> dict[str, Any]:
    """``report["throughput"]``: mean training samples per second of each stage, in stage order.

    Example:
        >>> h = [{"stage": "dense", "samples_per_s": 100.0}, {"stage": "dense", "samples_per_s": 300.0},
        ...      {"stage": "finetune", "samples_per_s": 50.0}]
        >>> throughput_section(h, 1, 0)["samples_per_s"]
        {'dense': 200.0, 'finetune': 50.0}
    """
    return {
        "samples_per_s": {st: float(np.mean([h["samples_per_s"] for h in history if h["stage"] == st]))
                          for st in dict.fromkeys(h["stage"] for h in history)},
        "processes": processes, "data_workers": data_workers,
    }
