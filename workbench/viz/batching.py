"""Figures for notebook ``02_batching``: who sits in which batch slot, latency and throughput.

* :func:`plot_timeline` - rows are batch slots, columns are engine steps, each cell coloured by
  the request it served (white when idle). Static batching shows white tails after short requests
  end; continuous batching fills them with the next request.
* :func:`plot_latency_cdf` - the share of requests served within x ms, one curve per system.
* :func:`plot_throughput_vs_cap` - useful output tok/s against the output-length cap (the
  Anyscale sweep): the wider the spread of output lengths, the more static batching wastes.
* :func:`plot_queue_length` - requests waiting (arrived, not yet scheduled) over time.

Every function takes plain data, draws on ``ax`` (a new figure when None) and returns the Axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from workbench.engine.requests import RequestTrace
from workbench.errors import WorkbenchError
from workbench.metrics import METRICS, SlotRows, request_latencies, timeline_utilization

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_latency_cdf", "plot_queue_length", "plot_throughput_vs_cap", "plot_timeline"]

_LABEL_CELLS, _LABEL_STEPS = 800, 40  # print ids in the cells of timelines up to this size


def _axes(ax: Axes | None, size: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=size)
    return ax


def _colour_index(rid: int) -> int:
    """tab20 index of request ``rid``: ids 0-9 take the 10 dark hues, 10-19 the light ones, so
    neighbouring ids never share a hue; the pattern repeats every 20 ids."""
    return (2 * rid) % 20 + (rid // 10) % 2


def plot_timeline(slot_rows: SlotRows, title: str | None = None, ax: Axes | None = None) -> Axes:
    """Batch slots (rows S1..Sn) against steps (columns), a cell coloured by its request id.

    ``slot_rows[step][slot]`` is the request id served there, or None for an idle slot (drawn
    white). Colours come from the qualitative ``tab20`` map (20 colours), so one request keeps
    its colour across steps and systems; small timelines also print the id in each cell. The
    title ends with the slot utilization (busy cells / all cells).
    """
    from matplotlib import colormaps

    n_steps = len(slot_rows)
    n_slots = max((len(step) for step in slot_rows), default=0)
    ax = _axes(ax, (min(2 + 0.25 * n_steps, 14), 1 + 0.35 * max(n_slots, 1)))
    cmap = colormaps["tab20"]
    image = np.ones((max(n_slots, 1), max(n_steps, 1), 4))  # [slot, step, RGBA], white = idle
    for step, row in enumerate(slot_rows):
        for slot, rid in enumerate(row):
            if rid is not None:
                if isinstance(rid, bool) or not isinstance(rid, (int, np.integer)):
                    raise WorkbenchError(f"slot_rows[{step}][{slot}] must be a request id or "
                                         f"None, got {rid!r}")
                image[slot, step] = cmap(_colour_index(int(rid)))
    ax.imshow(image, aspect="auto", interpolation="nearest",
              extent=(-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5))
    if 0 < n_steps * n_slots <= _LABEL_CELLS and n_steps <= _LABEL_STEPS:
        for step, row in enumerate(slot_rows):
            for slot, rid in enumerate(row):
                if rid is not None:
                    ax.text(step, slot, str(rid), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(n_slots), [f"S{i + 1}" for i in range(n_slots)])
    ax.set_xticks(np.arange(-0.5, n_steps, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_slots, 1), minor=True)
    ax.grid(which="minor", color="lightgrey", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("engine step")
    ax.set_ylabel("batch slot")
    utilization = f"slot utilization {timeline_utilization(slot_rows):.0%}"
    ax.set_title(f"{title} ({utilization})" if title else utilization)
    return ax


def plot_latency_cdf(traces_by_system: Mapping[str, Sequence[RequestTrace]],
                     metric: str = "e2el", ax: Axes | None = None) -> Axes:
    """Empirical CDF of a per-request latency (``"e2el"``, ``"ttft"``, ``"tpot"`` or ``"itl"``,
    in ms; completed requests only), one step curve per system, its median in the legend."""
    if metric not in METRICS:
        raise WorkbenchError(f"unknown latency metric {metric!r}: expected one of {METRICS}")
    ax = _axes(ax, (6.5, 4))
    for system, traces in traces_by_system.items():
        values = np.sort(request_latencies(traces, metric))
        if values.size == 0:
            ax.plot([], [], label=f"{system} (no data)")
            continue
        fraction = np.arange(1, values.size + 1) / values.size
        ax.step(np.concatenate([[0.0], values]), np.concatenate([[0.0], fraction]), where="post",
                label=f"{system} (median {np.median(values):,.0f} ms)")
    ax.set_xlabel(f"{metric.upper()} (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_throughput_vs_cap(results: Mapping[str, Mapping[int, float]],
                           ax: Axes | None = None) -> Axes:
    """Useful output tok/s (y) against the output-length cap (x, log2 axis), one line per system.

    ``results`` maps a system name to ``{cap: output_tok_s}``, for example
    ``{"workbench/static": {32: 410.0, 128: 350.0}, "workbench/continuous": {...}}``.
    """
    ax = _axes(ax, (6.5, 4))
    caps: set[int] = set()
    for system, by_cap in results.items():
        xs = sorted(by_cap)
        caps.update(xs)
        ax.plot(xs, [by_cap[x] for x in xs], marker="o", label=system)
    if caps:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(caps), [str(c) for c in sorted(caps)])
        ax.minorticks_off()
    ax.set_xlabel("output-length cap (tokens)")
    ax.set_ylabel("output tok/s (useful)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_queue_length(times: Sequence[float], lengths_by_system: Mapping[str, Sequence[int]],
                      ax: Axes | None = None) -> Axes:
    """Requests waiting for a batch slot over time (see :func:`workbench.metrics.queue_lengths`),
    a step curve per system sampled at the shared ``times`` (seconds)."""
    ax = _axes(ax, (6.5, 3.5))
    for system, lengths in lengths_by_system.items():
        if len(lengths) != len(times):
            raise WorkbenchError(f"{system}: {len(lengths)} queue lengths for {len(times)} times")
        ax.step(times, lengths, where="post", label=system)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("requests waiting")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax
