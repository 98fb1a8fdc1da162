"""Draw a :class:`~workbench.roofline.Roofline`: the picture notebook ``00_tour`` is built around.

The x axis is arithmetic intensity (FLOP per byte moved), the y axis FLOP/s, both logarithmic.
The attainable speed ``min(peak, intensity * bandwidth)`` is a slope (memory-bound) meeting a flat
roof (compute-bound) at the ridge point. Measured kernels are drawn as points under that curve:
decode at batch 1 sits near 1 FLOP/byte, deep in the memory-bound region; prefill sits right of
the ridge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from workbench.roofline import Roofline

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_roofline"]

Point = tuple[str, float, float]  # (label, intensity in FLOP/byte, achieved FLOP/s)


def plot_roofline(
    roofline: Roofline,
    points: Sequence[Point] | None = None,
    ax: Axes | None = None,
) -> Axes:
    """Plot attainable FLOP/s against intensity (log-log) with optional labelled ``points``.

    ``points`` is a list of ``(label, intensity, achieved_flops)``, for example
    ``[("decode batch 1", 1.0, 2e10), ("prefill", 300.0, 9e10)]``. The bandwidth slope is drawn
    dashed beyond the ridge and the compute ceiling dashed before it, so both limits stay visible.
    Returns the Axes (a new figure is made when ``ax`` is None).
    """
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(7, 4.5))
    points = list(points or [])
    ridge = roofline.ridge_point
    xs_of_interest = [ridge] + [p[1] for p in points if p[1] > 0]
    lo = min(xs_of_interest) / 10
    hi = max(xs_of_interest) * 10
    n = 200
    xs = [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]

    bw, peak = roofline.bandwidth, roofline.peak_flops
    ax.plot(xs, [roofline.attainable(x) for x in xs], color="C0", lw=2.5, label="attainable")
    slope_x = [x for x in xs if x >= ridge]
    roof_x = [x for x in xs if x <= ridge]
    ax.plot(slope_x, [x * bw for x in slope_x], color="C0", ls="--", lw=1, alpha=0.6,
            label=f"memory: {bw / 1e9:.1f} GB/s")
    ax.plot(roof_x, [peak] * len(roof_x), color="C1", ls="--", lw=1, alpha=0.8,
            label=f"compute: {peak / 1e9:.1f} GFLOP/s")
    ax.axvline(ridge, color="grey", ls=":", lw=1)
    ax.plot([ridge], [peak], "o", color="grey")
    ax.annotate(f"ridge {ridge:.3g} FLOP/byte", (ridge, peak), textcoords="offset points",
                xytext=(6, -14), fontsize=8, color="grey")

    for i, (label, intensity, achieved) in enumerate(points):
        if not (intensity > 0 and achieved > 0 and math.isfinite(intensity * achieved)):
            continue  # cannot be drawn on log axes
        ax.plot([intensity], [achieved], "o", color=f"C{(i + 2) % 10}")
        ax.annotate(label, (intensity, achieved), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    drawn = [a for _, i, a in points if i > 0 and a > 0 and math.isfinite(i * a)]
    ax.set_ylim(min([roofline.attainable(lo)] + drawn) / 2, max([peak] + drawn) * 4)
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("FLOP/s")
    ax.set_title(f"Roofline: {roofline.device_name}")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.2)
    return ax
