"""Figures for notebook ``06_offloading``.

* :func:`plot_schedule_timeline` - lanes disk / copy / compute over time, one bar per unit: where
  the loads hide behind compute (block schedule) and where compute waits for them.
* :func:`plot_predicted_vs_measured` - the cost model's step time against the measured one, with
  the y = x line and a +-25 % band.
* :func:`plot_bytes_moved` - bytes each policy moves per step, by kind (disk reads, host-to-device).
* :func:`plot_flash_io` - bytes and reads per token of dense, separate and bundled flash loading.
* :func:`plot_memory` - planned against measured peak fast memory per run, with the budget line.

Every function draws on ``ax`` (a new figure when None) and returns the Axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_bytes_moved", "plot_flash_io", "plot_memory", "plot_predicted_vs_measured",
           "plot_schedule_timeline"]

_LANES = ("disk", "copy", "compute")


def _axes(ax, size):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=size)
    return ax


def _color(label: str) -> str:
    if label.startswith("layer"):
        return f"C{int(label.split()[1]) % 8}"
    return {"head": "0.35", "embed": "0.7"}.get(label, "0.5")


def plot_schedule_timeline(spans: Sequence, ax: Axes | None = None, until_s: float | None = None,
                           title: str = "") -> Axes:
    """Horizontal bars per lane (``Span`` objects: lane, label, start_s, end_s), in ms."""
    ax = _axes(ax, (12, 2.4))
    lanes = [lane for lane in _LANES if any(s.lane == lane for s in spans)]
    for y, lane in enumerate(lanes):
        for s in spans:
            if s.lane != lane or (until_s is not None and s.start_s > until_s):
                continue
            ax.barh(y, (s.end_s - s.start_s) * 1e3, left=s.start_s * 1e3, height=0.6,
                    color=_color(s.label), edgecolor="black", linewidth=0.3)
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_xlabel("time (ms)")
    ax.set_title(title or "schedule timeline (colour = unit)")
    return ax


def plot_predicted_vs_measured(rows: Sequence[dict], ax: Axes | None = None,
                               key: str = "decode_step_s", flagged: Sequence[str] = ()) -> Axes:
    """Rows with ``predicted_<key>`` and ``<key>`` (seconds) and a ``policy`` label; rows whose
    label is in ``flagged`` (e.g. stalled runs) are drawn hollow."""
    ax = _axes(ax, (5, 5))
    pred = np.array([r[f"predicted_{key}"] for r in rows]) * 1e3
    meas = np.array([r[key] for r in rows]) * 1e3
    lo, hi = min(pred.min(), meas.min()) * 0.7, max(pred.max(), meas.max()) * 1.3
    xs = np.geomspace(lo, hi, 50)
    ax.plot(xs, xs, "k-", lw=1, label="predicted = measured")
    ax.fill_between(xs, xs / 1.25, xs * 1.25, color="0.85", label="within 25 %")
    for i, r in enumerate(rows):
        label = r.get("policy", str(i))
        hollow = label in flagged
        ax.scatter(meas[i], pred[i], zorder=3, label=label + (" (stalled)" if hollow else ""),
                   facecolors="none" if hollow else f"C{i % 10}", edgecolors=f"C{i % 10}")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers at 1, 2, 5 x 10^k; no crowded minor labels
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("measured step time (ms)")
    ax.set_ylabel("predicted step time (ms)")
    ax.legend(fontsize=7, loc="upper left")
    return ax


def plot_bytes_moved(rows: Sequence[dict], ax: Axes | None = None) -> Axes:
    """Stacked bars of ``bytes_per_step`` (MB) per policy row."""
    ax = _axes(ax, (9, 3.5))
    kinds = sorted({k for r in rows for k, v in r["bytes_per_step"].items() if v})
    labels = [r.get("policy", r["system"]) for r in rows]
    bottom = np.zeros(len(rows))
    for i, kind in enumerate(kinds):
        values = np.array([r["bytes_per_step"].get(kind, 0) for r in rows]) / 1e6
        ax.bar(range(len(rows)), values, bottom=bottom, label=kind, color=f"C{i}")
        bottom += values
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("MB moved per step")
    ax.legend(fontsize=8)
    return ax


def plot_flash_io(plans_by_window: dict[int, Sequence], axes=None):
    """Bytes and reads per token of each strategy, one group of bars per window size."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    windows = list(plans_by_window)
    strategies = [p.strategy for p in plans_by_window[windows[0]]]
    width = 0.8 / len(strategies)
    for j, strategy in enumerate(strategies):
        for ax, field, scale in ((axes[0], "bytes_per_token", 1e3), (axes[1], "reads_per_token", 1)):
            values = [next(getattr(p, field) for p in plans_by_window[w] if p.strategy == strategy)
                      / scale for w in windows]
            ax.bar(np.arange(len(windows)) + j * width, values, width, label=strategy,
                   color=f"C{j}")
    for ax, ylabel in ((axes[0], "KB read per token"), (axes[1], "reads per token")):
        ax.set_xticks(np.arange(len(windows)) + width * (len(strategies) - 1) / 2,
                      [f"window {w}" for w in windows])
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    return axes


def plot_memory(rows: Sequence[dict], budget_bytes: int, ax: Axes | None = None) -> Axes:
    """Grouped bars (GiB) per run: the plan it ran with (``planned_then``), the current planner's
    plan (``plan_now``) and the measured peak (``peak_fast_bytes``); a line at the budget."""
    ax = _axes(ax, (10, 3.8))
    series = [("planned_then", "plan at the time", "0.75"), ("plan_now", "plan now", "C0"),
              ("peak_fast_bytes", "measured peak", "C3")]
    x = np.arange(len(rows))
    width = 0.8 / len(series)
    for j, (key, label, color) in enumerate(series):
        values = [(r.get(key) or 0) / 2**30 for r in rows]
        ax.bar(x + (j - 1) * width, values, width, label=label, color=color)
    ax.axhline(budget_bytes / 2**30, color="black", ls="--", lw=1, label="budget")
    ax.set_xticks(x, [r["policy"] if r["system"].startswith("workbench") else
                      f"accelerate {r['policy']}" for r in rows], rotation=20, ha="right",
                  fontsize=8)
    ax.set_ylabel("fast memory (GiB)")
    ax.legend(fontsize=8, ncol=4, loc="upper left")
    return ax
