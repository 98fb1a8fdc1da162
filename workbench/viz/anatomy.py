"""Bar charts of a model's anatomy: where its bytes sit and where one decode step spends its time.

:func:`plot_parameter_table` draws :func:`workbench.anatomy.parameter_table` (MiB per component);
:func:`plot_decode_profile` draws :func:`workbench.anatomy.decode_step_profile`: the time of each
component, then the instrumented step stacked by component beside the plain step and the
memory-bandwidth floor. Used by notebook ``00_tour``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_decode_profile", "plot_parameter_table"]


def plot_parameter_table(rows: list[dict[str, Any]], ax: Axes | None = None) -> Axes:
    """Horizontal bars of MiB per component (the ``total`` row goes into the title)."""
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(7, 3.8))
    parts = [r for r in rows if r["component"] != "total"][::-1]  # first row on top
    total = next((r for r in rows if r["component"] == "total"), None)
    ys = range(len(parts))
    ax.barh(ys, [r["MiB"] for r in parts], color=[f"C{i % 10}" for i in ys])
    ax.set_yticks(list(ys), [r["component"] for r in parts], fontsize=8)
    for y, r in zip(ys, parts):
        label = "tied: 0 (shares the embedding)" if r.get("note", "").startswith("tied") else (
            f"{r['parameters']:,} ({100 * r['share']:.1f}%)")
        ax.annotate(label, (r["MiB"], y), textcoords="offset points", xytext=(3, -3), fontsize=7)
    ax.set_xlabel("MiB")
    ax.set_xlim(0, max([r["MiB"] for r in parts] + [1e-9]) * 1.45)
    if total is not None:
        ax.set_title(f"Parameters: {total['parameters']:,} = {total['MiB']:.1f} MiB", fontsize=10)
    ax.grid(True, axis="x", alpha=0.2)
    return ax


def plot_decode_profile(rows: list[dict[str, Any]], title: str = "One decode step") -> Figure:
    """Left: ms per component. Right: the instrumented step stacked by component, the plain
    step and (if present) the memory-bandwidth floor, on one time axis."""
    import matplotlib.pyplot as plt

    parts = [r for r in rows if r["kind"] == "component"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8),
                                      gridspec_kw={"width_ratios": [1.1, 1]})
    ys = list(range(len(parts)))[::-1]  # first component on top
    colors = [f"C{i % 10}" for i in range(len(parts))]
    left.barh(ys, [r["ms"] for r in parts], color=colors)
    left.set_yticks(ys, [r["component"] for r in parts], fontsize=8)
    for y, r in zip(ys, parts):
        left.annotate(f"{r['ms']:.3g} ms ({100 * r['share']:.0f}%)", (r["ms"], y),
                      textcoords="offset points", xytext=(3, -3), fontsize=7)
    left.set_xlim(0, max([r["ms"] for r in parts] + [1e-9]) * 1.35)
    left.set_xlabel("ms (median, instrumented)")
    left.set_title("time per component", fontsize=10)

    start = 0.0
    for r, color in zip(parts, colors):
        right.barh(2, r["ms"], left=start, color=color)
        start += r["ms"]
    labels = ["sum of components"]
    for y, kind, color in ((1, "total", "0.35"), (0, "floor", "0.7")):
        row = next((r for r in rows if r["kind"] == kind), None)
        if row is not None:
            right.barh(y, row["ms"], color=color)
            right.annotate(f"{row['ms']:.3g} ms", (row["ms"], y), textcoords="offset points",
                           xytext=(3, -3), fontsize=8)
            labels.append(row["component"])
    right.annotate(f"{start:.3g} ms", (start, 2), textcoords="offset points", xytext=(3, -3),
                   fontsize=8)
    right.set_yticks([2, 1, 0][:len(labels)], labels, fontsize=8)
    right.set_xlim(0, max([start] + [r["ms"] for r in rows]) * 1.25)
    right.set_xlabel("ms (components coloured as on the left)")
    right.set_title("whole step vs. the memory-bandwidth floor", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig
