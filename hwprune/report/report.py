"""The run report: a table for the terminal, ``report.json`` for machines, ``report.md`` and plots for people.

Example:
    >>> print(Report.load("runs/x/report.json"))                         # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .table import text_table

from ..io import atomic_write_bytes, atomic_write_json, atomic_write_text


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _loop_line(loop: dict) -> str:
    """One line on the planned widths timed before training (``report.json`` latency_model.loop), and
    whether the plan kept measured in the loop's band (``tolerance`` under the budget, a third of it kept
    as a margin): the loop stops after a few rounds, so a noisy clock can leave it outside.

    Example:
        >>> print(_loop_line({"factor": 0.85, "budget_ms": 5.0, "rounds": [{"planned_ms": 5.0, "measured_ms": 5.9},
        ...                   {"planned_ms": 4.25, "measured_ms": 4.9}]}))
        latency loop, the planned widths timed before training: 5.9000 ms planned at 5.0000, 4.9000 ms planned at 4.2500 (budget 5.0000 ms); planned at 0.850 of the budget, measured 2.0% under it (the aim: 1-3%)
        >>> print(_loop_line({"factor": 1.0, "budget_ms": 5.0, "rounds": [{"planned_ms": 5.0, "measured_ms": 4.0}]}).split("; ")[-1])
        planned at 1.000 of the budget, measured 20.0% under it: no plan measured 1-3% under it in 1 round(s)
    """
    steps = ", ".join(f"{r['measured_ms']:.4f} ms planned at {r['planned_ms']:.4f}" for r in loop["rounds"])
    budget, tol = loop["budget_ms"], loop.get("tolerance", 0.03)
    line = (f"latency loop, the planned widths timed before training: {steps} (budget {budget:.4f} ms); "
            f"planned at {loop['factor']:.3f} of the budget")
    kept = [r for r in loop["rounds"] if math.isclose(r["planned_ms"], loop["factor"] * budget, rel_tol=1e-9)]
    if not kept:
        return line
    under = 1 - kept[0]["measured_ms"] / budget
    band = f"{100 * tol / 3:.0f}-{100 * tol:.0f}%"
    if under < tol / 3 - 1e-12:
        return line + f", measured {100 * -under:.1f}% over it: no plan measured under it in {len(loop['rounds'])} round(s)"
    if under > tol + 1e-12:
        return (line + f", measured {100 * under:.1f}% under it: no plan measured {band} under it in "
                f"{len(loop['rounds'])} round(s)")
    return line + f", measured {100 * under:.1f}% under it (the aim: {band})"


def _rounds_text(g) -> str:
    """How the timed calls were split into rounds, for report.md's latency line ('' for one round).

    Example:
        >>> data = {"latency.round_ratios": [{"pruned": 0.54}, {"pruned": 0.34}, {"pruned": 0.55}]}
        >>> _rounds_text(data.get)
        ', in 3 rounds, the middle one kept (pruned/dense per round: 0.540, 0.340, 0.550)'
    """
    ratios = g("latency.round_ratios") or []
    if len(ratios) < 2:
        return ""
    per = ", ".join(f"{r.get('pruned', float('nan')):.3f}" for r in ratios)
    return f", in {len(ratios)} rounds, the middle one kept (pruned/dense per round: {per})"


@dataclass
class Report:
    """Everything a run measured. ``data`` follows the nested layout of ``report.json``."""

    data: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    def get(self, dotted: str, default=None):
        cur: Any = self.data
        for part in dotted.split("."):
            if not isinstance(cur, dict) or part not in cur:
                return default
            cur = cur[part]
        return cur

    def table(self) -> str:
        """The dense-vs-pruned table printed at the end of a run."""
        g = self.get
        rows = [("", "dense", "pruned", "pruned/dense")]
        acc_d, acc_p = g("accuracy.dense"), g("accuracy.pruned")
        if acc_d is not None:
            rows.append(("accuracy (%)", f"{100 * acc_d:.2f}", f"{100 * acc_p:.2f}", f"{100 * (acc_p - acc_d):+.2f} pts"))
        q = g("quality.pruned")
        if q:  # a distilled encoder: pruned against dense on held-out sentences (dense against itself is 1)
            rows.append(("held-out mean cosine", "1", f"{q['mean_cosine']:.4f}", ""))
            rows.append(("Spearman, pair similarities", "1", f"{q['spearman']:.4f}", ""))
        for key, label in (("params", "params"), ("flops", "FLOPs (MACs)")):
            d, p = g(f"{key}.dense"), g(f"{key}.pruned")
            if d:
                rows.append((label, _human(d), _human(p), f"{p / d:.3f}x"))
        ld, lp = g("latency_ms.dense"), g("latency_ms.pruned")
        by_batch = g("latency_by_batch")
        if by_batch:
            for bs, lat in by_batch.items():
                rows.append((f"latency (ms, batch {bs})", f"{lat['dense']:.3f}", f"{lat['pruned']:.3f}", f"{lat['pruned'] / lat['dense']:.3f}x"))
        elif ld:
            rows.append((f"latency (ms, batch {g('latency.batch_size')})", f"{ld:.4f}", f"{lp:.4f}", f"{lp / ld:.3f}x"))
        pd, pp = g("latency_model.predicted_ms.dense"), g("latency_model.predicted_ms.pruned")
        if pp is not None:
            rows.append(("latency predicted (ms)", f"{pd:.4f}", f"{pp:.4f}", f"{pp / pd:.3f}x"))
        out = text_table(rows, right=(1, 2, 3))
        req, ach = g("requested"), g("achieved")
        if req:
            kind = next(iter(req))
            out += f"\n{kind}: requested {req[kind]:g}, achieved {ach.get(kind, float('nan')):.4f}"
            if req.get("latency_ms") is not None and kind != "latency_ms":  # a speedup, and the ms it became
                out += f" (budget {req['latency_ms']:.4f} ms)"
            policy, reason = g("projection.allocation"), g("projection.reason")
            if policy:
                out += f"\nallocation: {policy}" + (f"; {reason}" if reason else "")
        err = g("latency_model.error")
        if err:
            out += (f"\nlatency model, planning prediction (calibrated before training): measured "
                    f"{100 * err['pruned']:+.1f}% pruned, {100 * err['dense']:+.1f}% dense (the machine's drift)")
            same = g("latency_model.same_session")
            if same:
                met = "met" if g("latency_model.within_10pct") else "NOT met"
                out += (f"\nlatency model, anchors re-timed with the pruned model: predicted "
                        f"{same['predicted_pruned_ms']:.4f} ms, measured {100 * same['error_pruned']:+.1f}% "
                        f"(goal within 10%: {met})")
        loop = g("latency_model.loop")
        if loop and loop.get("rounds"):
            out += "\n" + _loop_line(loop)
        note = g("latency_model.model.calibration.profile_note")
        if note:
            out += f"\n  NOTE: {note}"
        if g("latency.runtime"):
            out += f"\nlatency: {g('latency.runtime')}; {g('latency.measured_on')}"
            if g("latency.note"):
                out += f"\n  NOTE: {g('latency.note')}"
        if g("blocks.note"):
            out += f"\nblocks: {g('blocks.note')}"
        return out

    def __str__(self) -> str:
        return self.table()

    def to_json(self) -> dict[str, Any]:
        return {**self.data, "layers": self.layers, "history": self.history}

    def save(self, run_dir: str | os.PathLike) -> None:
        """Write ``report.json`` and ``report.md`` (atomically)."""
        run_dir = Path(run_dir)
        atomic_write_json(run_dir / "report.json", self.to_json())
        atomic_write_text(run_dir / "report.md", self.markdown())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Report":
        d = json.loads(Path(path).read_text())
        layers, history = d.pop("layers", []), d.pop("history", [])
        return cls(d, layers, history)

    def markdown(self) -> str:
        g = self.get
        lines = [f"# hwprune report: {g('run.model')} on {g('run.data')}, target {g('run.target')}", ""]
        lines += [
            f"- method: `{g('run.method')}`; budget: {g('run.budget')}",
            f"- command: `{g('run.command')}`" if g("run.command") else "",
            f"- hwprune {g('env.hwprune')}, torch {g('env.torch')}, onnxruntime {g('env.onnxruntime')}",
            "", "## Dense vs pruned", "", "```", self.table(), "```", "",
        ]
        proj = g("projection") or {}
        if proj:
            lines += [
                "## Reaching the budget", "",
                f"- units removed: {proj.get('removed_units')} of {proj.get('units')} prunable units "
                f"({proj.get('rounding')})",
                f"- already zero after regularized training: {100 * proj.get('zero_fraction_before', 0):.1f}% of units "
                f"(the budget asks {100 * proj.get('target_fraction', 0):.1f}%)",
                f"- accuracy right before / after the projection: {100 * proj.get('accuracy_before', 0):.2f}% / "
                f"{100 * proj.get('accuracy_after', 0):.2f}% (pruning shock "
                f"{100 * (proj.get('accuracy_after', 0) - proj.get('accuracy_before', 0)):+.2f} pts)"
                if not g("quality") else
                f"- held-out mean cosine right before / after the projection: {proj.get('accuracy_before', 0):.4f} / "
                f"{proj.get('accuracy_after', 0):.4f} (pruning shock)",
                "",
            ]
        q = g("quality.pruned")
        if q:
            lines += [
                "## Quality", "",
                f"- {g('quality.measure')}",
                f"- mean cosine {q['mean_cosine']:.4f} (lowest {q['min_cosine']:.4f}) over {q['sentences']} held-out "
                f"sentences; Spearman {q['spearman']:.4f} over {q['pairs']} pairs",
                f"- corpus: {g('quality.corpus')}; {g('quality.train_sentences')} training sentences", "",
            ]
        lines += [
            "## Export", "",
            f"- `model.onnx`: onnxruntime vs torch max |diff| = {g('onnx.max_abs_diff'):.2e} on "
            f"{g('onnx.checked_inputs')} real test inputs" if g("onnx.max_abs_diff") is not None else "- no ONNX export",
            f"- latency: median of {g('latency.runs')} runs after {g('latency.warmup')} warm-up runs, dense and pruned "
            f"taking turns in blocks of consecutive calls in one process{_rounds_text(g)}; {g('latency.runtime')}; "
            f"{g('latency.measured_on')}" if g("latency") else
            "- latency: not measured (--no-latency)",
        ]
        if g("latency.note"):
            lines += [f"- **{g('latency.note')}**"]
        tp = g("throughput") or {}
        if tp.get("samples_per_s"):
            per = ", ".join(f"{k} {v:.0f}" for k, v in tp["samples_per_s"].items())
            lines += [f"- training throughput (samples/s, whole job, {tp.get('processes', 1)} process(es), "
                      f"{tp.get('data_workers', 0)} data workers): {per}"]
        if g("blocks.layers"):
            lines += ["", "## Weight blocks", "", f"- {g('blocks.note')}", "",
                      "| layer | kind | matrix | block | blocks | kept | density |", "|---|---|---|---|---|---|---|"]
            for row in g("blocks.layers"):
                lines.append(f"| {row['layer']} | {row['kind']} | {row['matrix'][0]}x{row['matrix'][1]} | "
                             f"{row['block'][0]}x{row['block'][1]} | {row['blocks']} | {row['kept']} | {row['density']:.1%} |")
            for layer, why in (g("blocks.dense_layers") or {}).items():
                lines.append(f"| {layer} | dense | | | | | {why} |")
        if g("full_width_layers"):
            lines += ["", "## Layers that keep their output width", "", "| layer | why |", "|---|---|"]
            lines += [f"| {layer} | {why} |" for layer, why in g("full_width_layers").items()]
        lm = g("latency_model")
        if lm:
            cal = (lm.get("model") or {}).get("calibration") or {}
            lines += [
                "", "## Latency model", "",
                f"- profile: `{(lm.get('model') or {}).get('profile')}`"
                + (f" (measured on {cal['profile_measured_on']})" if cal.get("profile_measured_on") else "")
                + f"; budget {lm.get('budget_ms', float('nan')):.4f} ms",
                f"- predicted dense / pruned: {lm['predicted_ms']['dense']:.4f} / {lm['predicted_ms']['pruned']:.4f} ms",
            ]
            if lm.get("loop") and lm["loop"].get("rounds"):
                lines.append(f"- {_loop_line(lm['loop'])}")
            if cal.get("profile_note"):
                lines.append(f"- note: {cal['profile_note']}")
            if lm.get("measured_ms"):
                lines.append(f"- measured dense / pruned: {lm['measured_ms']['dense']:.4f} / {lm['measured_ms']['pruned']:.4f} ms "
                             f"({100 * lm['error']['dense']:+.1f}% / {100 * lm['error']['pruned']:+.1f}% from the planning "
                             "prediction; the dense model's error is the machine's drift since calibration)")
            same = lm.get("same_session")
            if same:
                lines.append(f"- anchors (dense, narrowest {same['narrowest_ms']:.4f} ms) re-timed in the same session as the "
                             f"pruned model: predicted {same['predicted_pruned_ms']:.4f} ms, measured "
                             f"{100 * same['error_pruned']:+.1f}% (goal within 10%: {'met' if lm.get('within_10pct') else 'NOT met'})")
            if cal:
                lines.append(f"- calibration (measured before training on {cal.get('runtime')}): dense {cal['dense_ms']:.4f} ms, "
                             f"narrowest {cal['min_ms']:.4f} ms; scale {cal['scale']:.3f}, overhead {cal['overhead_ms']:.4f} ms")
        lines += ["", "## Layers", "", "| layer | kind | dense width | pruned width | kept |", "|---|---|---|---|---|"]
        for row in self.layers:
            lines.append(
                f"| {row['layer']} | {row['kind']} | {row['dense']} | {row['pruned']} | {row['pruned'] / max(row['dense'], 1):.0%} |"
            )
        lines += ["", "## Plots", "", "![group norms](norms.png)", "", "![training history](history.png)", ""]
        return "\n".join(l for l in lines if l is not None) + "\n"


def layer_table(dense, pruned) -> list[dict[str, Any]]:
    """Output width of every conv / linear layer, dense against pruned."""
    from torch import nn

    pruned_modules = dict(pruned.named_modules())
    rows = []
    for name, m in dense.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            p = pruned_modules.get(name)
            width = lambda mod: mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
            kind = "linear" if isinstance(m, nn.Linear) else ("depthwise conv" if m.groups > 1 and m.groups == m.in_channels else "conv")
            rows.append({"layer": name, "kind": kind, "dense": width(m), "pruned": width(p) if p is not None else 0})
    return rows


def plot_norms(before: np.ndarray, after: np.ndarray, path: str | os.PathLike, kept: np.ndarray | None = None) -> None:
    """Histogram of unit norms (per unit weight) before and after regularized training."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=False)
    for ax, values, title in ((axes[0], before, "before regularized training"), (axes[1], after, "after regularized training")):
        values = np.asarray(values, dtype=np.float64)
        zeros = int((values <= 0).sum())
        pos = values[values > 0]
        if len(pos):
            lo, hi = max(pos.min(), 1e-8), pos.max()
            bins = np.logspace(np.log10(lo), np.log10(hi * 1.0001 + 1e-12), 40)
            ax.hist(pos, bins=bins, color="#4477aa")
            ax.set_xscale("log")
        ax.set_title(f"{title}\n{zeros} of {len(values)} units exactly zero")
        ax.set_xlabel("unit norm / unit weight")
        ax.set_ylabel("units")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_history(history: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Test accuracy and sparsity (fraction of zero units) over all epochs, stages shaded."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = np.arange(1, len(history) + 1)
    acc = [100 * h.get("test_accuracy", np.nan) if h.get("test_accuracy") is not None else np.nan for h in history]
    sp = [100 * h.get("sparsity", np.nan) if h.get("sparsity") is not None else np.nan for h in history]
    ax.plot(x, acc, "o-", color="#4477aa", label="test accuracy (%)", ms=3)
    ax.set_xlabel("epoch (all stages)")
    ax.set_ylabel("test accuracy (%)")
    ax2 = ax.twinx()
    ax2.plot(x, sp, "s-", color="#cc6677", label="units removed or zero (%)", ms=3)
    ax2.set_ylabel("units removed or zero (%)")
    ax2.set_ylim(-2, 102)
    colors = {"dense": "#eeeeee", "regularize": "#fff3d6", "finetune": "#e1f2e1"}
    start = 0
    for i in range(1, len(history) + 1):
        if i == len(history) or history[i]["stage"] != history[start]["stage"]:
            st = history[start]["stage"]
            ax.axvspan(start + 0.5, i + 0.5, color=colors.get(st, "#ffffff"), zorder=0)
            ax.text((start + i + 1) / 2, 0.02, st, transform=ax.get_xaxis_transform(), ha="center", fontsize=8)
            start = i
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [l.get_label() for l in lines], loc="center right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
