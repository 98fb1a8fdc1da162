"""Figures for notebooks 04 (tensor parallelism) and 05 (pipeline parallelism).

* :func:`plot_matrix_split` - ``C = A B`` with B split in two: by columns (the parts of C are
  concatenated) or by rows (the partial Cs are summed), drawn as coloured blocks.
* :func:`plot_stages` - the model's layers as boxes coloured by pipeline stage, with the
  hand-overs between stages.
* :func:`plot_pipeline_timeline` - a Gantt chart of each stage's micro-batches over time (the
  GPipe fill-drain), titled with the measured bubble and the formula's.
* :func:`plot_timetable` - a timetable of equal slots (GPipe's, or a lab student's), drawn the
  same way.
* :func:`plot_bubble` - measured bubble against ``(p-1)/(m+p-1)`` for several micro-batch counts.
* :func:`plot_step_times` - decode step time per configuration beside its floor.

Every function takes plain data, draws on ``ax`` (a new figure when None) and returns the Axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from workbench.parallel.illustrate import MatmulSplit
from workbench.parallel.pipeline import (StageEvent, bubble_formula, measured_bubble,
                                         timetable_events)

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_bubble", "plot_matrix_split", "plot_pipeline_timeline", "plot_stages",
           "plot_step_times", "plot_timetable"]

_COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
            "#8c8c8c"]


def _axes(ax, size):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=size)
    return ax


def _block(ax, x, y, w, h, colour, text, alpha=0.85):
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((x, y), w, h, facecolor=colour, edgecolor="black", alpha=alpha))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9)


def plot_matrix_split(split: MatmulSplit, ax: Axes | None = None) -> Axes:
    """A, B and C as blocks; colours show which device computes what. Shapes are to scale."""
    ax = _axes(ax, (9, 3))
    m, k = split.reference.shape[0], split.b_parts[0].shape[0] if split.how == "columns" else \
        sum(b.shape[0] for b in split.b_parts)
    n_out = split.reference.shape[1]
    n = len(split.b_parts)
    gap = 1.5
    # A
    if split.how == "columns":
        _block(ax, 0, 0, k, m, "#bbbbbb", "A\n(all devices)")
    else:
        x = 0
        for i, a in enumerate(split.a_parts):
            _block(ax, x, 0, a.shape[1], m, _COLOURS[i], f"A{i + 1}")
            x += a.shape[1]
    ax.text(k + gap / 2, m / 2, "x", ha="center", va="center", fontsize=14)
    # B
    x0 = k + gap
    for i, b in enumerate(split.b_parts):
        if split.how == "columns":
            _block(ax, x0 + i * b.shape[1], 0, b.shape[1], k, _COLOURS[i], f"B{i + 1}")
        else:
            y_top = k - (i + 1) * b.shape[0]
            _block(ax, x0, y_top, n_out, b.shape[0], _COLOURS[i], f"B{i + 1}")
    ax.text(x0 + n_out + gap / 2, m / 2, "=", ha="center", va="center", fontsize=14)
    # C
    x1 = x0 + n_out + gap
    if split.how == "columns":
        for i, c in enumerate(split.partials):
            _block(ax, x1 + i * c.shape[1], 0, c.shape[1], m, _COLOURS[i], f"A B{i + 1}")
        label = "concatenate"
    else:
        for i in range(n):
            _block(ax, x1 + i * 0.4, -i * 0.4, n_out, m, _COLOURS[i], "" if i < n - 1 else
                   " + ".join(f"A{j + 1} B{j + 1}" for j in range(n)), alpha=0.6)
        label = "sum (all-reduce)"
    ax.set_xlim(-0.5, x1 + n_out + 1.5)
    ax.set_ylim(-n * 0.4 - 0.5, max(m, k) + 0.5)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"split B by {split.how}: each device computes its part, then {label}; "
                 f"max |C_split - C| = {split.max_error:.1e}", fontsize=10)
    return ax


def plot_stages(stages: Sequence[range], handoffs: Sequence[dict] = (),
                ax: Axes | None = None) -> Axes:
    """Layers 0..L-1 as boxes coloured by stage; arrows where activations change hands."""
    n = stages[-1].stop
    ax = _axes(ax, (min(2 + 0.7 * n, 14), 2))
    for s, layers in enumerate(stages):
        for i in layers:
            _block(ax, i, 0, 0.9, 1, _COLOURS[s % len(_COLOURS)], f"L{i}")
        ax.text((layers.start + layers.stop - 0.1) / 2, 1.25, f"stage {s}\nrank {s}",
                ha="center", va="bottom", fontsize=9)
    for h in handoffs:
        x = stages[h["from"]].stop - 0.05
        ax.annotate("", xy=(x + 0.05, -0.35), xytext=(x - 0.9, -0.35),
                    arrowprops=dict(arrowstyle="->"))
        ax.text(x, -0.6, f"send {h['bytes'] / 1024:.0f} KiB", ha="center", va="top", fontsize=8)
    ax.set_xlim(-0.3, n + 0.2)
    ax.set_ylim(-1.2, 2.2)
    ax.axis("off")
    return ax


def plot_pipeline_timeline(events: Sequence[StageEvent], p: int, m: int | None = None,
                           step: int | None = None, ax: Axes | None = None,
                           cycle: int | None = None) -> Axes:
    """Stages (rows) against time (ms); one bar per micro-batch, coloured by micro-batch.
    ``cycle``: item k is micro-batch k mod cycle (:func:`~workbench.parallel.in_flight.decode_in_flight`
    numbers its items t m + j in one pass)."""
    chosen = [e for e in events if step is None or e.step == step]
    t0 = min(e.start for e in chosen)
    ax = _axes(ax, (10, 0.6 + 0.5 * p))
    for e in chosen:
        j = e.micro_batch % cycle if cycle else e.micro_batch
        ax.barh(e.stage, (e.end - e.start) * 1e3, left=(e.start - t0) * 1e3, height=0.7,
                color=_COLOURS[j % len(_COLOURS)], edgecolor="black", linewidth=0.4)
        if step is not None:
            ax.text((e.start + e.end) / 2 * 1e3 - t0 * 1e3, e.stage, str(j + 1),
                    ha="center", va="center", fontsize=8)
    ax.set_yticks(range(p), [f"stage {s}" for s in range(p)])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    measured = measured_bubble(chosen, p)
    title = f"measured bubble {measured:.2f}"
    if m is not None:
        title += f", formula (p-1)/(m+p-1) = {bubble_formula(p, m):.2f} (p={p}, m={m})"
    ax.set_title(title, fontsize=10)
    return ax


def plot_timetable(table: Sequence[Sequence[tuple[int, int]]], ax: Axes | None = None) -> Axes:
    """A timetable (slot t: the (stage, micro-batch) pairs running in it, as
    :func:`~workbench.parallel.pipeline.gpipe_timetable` returns) as a timeline of equal slots."""
    events = timetable_events([list(slot) for slot in table], slot_s=1e-3)  # one slot = 1 "ms"
    p, m = 1 + max(e.stage for e in events), 1 + max(e.micro_batch for e in events)
    ax = plot_pipeline_timeline(events, p, m, step=0, ax=ax)
    ax.set_xlabel("time slot")
    ax.set_title(f"{len(table)} slots: idle share {measured_bubble(events, p):.2f}, formula "
                 f"(p-1)/(m+p-1) = {bubble_formula(p, m):.2f} (p={p}, m={m})", fontsize=10)
    return ax


def plot_bubble(rows: Sequence[dict], ax: Axes | None = None) -> Axes:
    """rows: {"p", "m", "measured"} and optionally "schedule" (the timetable replayed with the
    measured stage times, :func:`~workbench.parallel.pipeline.schedule_bubble`); the formula drawn
    as a line per p."""
    ax = _axes(ax, (6, 3.5))
    for i, p in enumerate(sorted({r["p"] for r in rows})):
        mine = sorted((r for r in rows if r["p"] == p), key=lambda r: r["m"])
        ms = [r["m"] for r in mine]
        ax.plot(ms, [bubble_formula(p, m) for m in ms], "--", color=_COLOURS[i],
                label=f"p={p}: (p-1)/(m+p-1)")
        ax.plot(ms, [r["measured"] for r in mine], "o", color=_COLOURS[i], label=f"p={p}: measured")
        if all("schedule" in r for r in mine):
            ax.plot(ms, [r["schedule"] for r in mine], "x", color=_COLOURS[i], ms=8,
                    label=f"p={p}: timetable, measured stage times, free hand-overs")
    ax.set_xlabel("micro-batches m")
    ax.set_ylabel("bubble (idle share)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return ax


def plot_step_times(rows: Sequence[dict], ax: Axes | None = None) -> Axes:
    """rows: {"label", "step_ms", "floor_ms"}: measured decode step time beside its floor."""
    import numpy as np

    ax = _axes(ax, (7, 3.5))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["step_ms"] for r in rows], 0.4, label="measured", color=_COLOURS[0])
    ax.bar(x + 0.2, [r["floor_ms"] for r in rows], 0.4, label="floor", color=_COLOURS[2])
    ax.set_xticks(x, [r["label"] for r in rows])
    ax.set_ylabel("decode step (ms)")
    ax.legend(fontsize=8)
    return ax
