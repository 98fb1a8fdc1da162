"""Figures of notebook ``09_serving_capstone``: predictions across devices, one step's floors,
and a measured run against its floors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from workbench.viz.roofline import plot_roofline
from workbench.whatif.predict import Prediction

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_device_bars", "plot_prediction", "plot_steps_vs_floor"]


def _axes(ax: Axes | None, size: tuple[float, float]) -> Axes:
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=size)
    return ax


_LABELS = {"decode_tok_s": "decode tokens/s", "throughput_tok_s": "tokens/s over the whole run",
           "tpot_ms": "TPOT (ms)", "ttft_ms": "TTFT (ms)"}


def plot_device_bars(predictions: Sequence[Prediction], key: str = "decode_tok_s",
                     ax: Axes | None = None) -> Axes:
    """Grouped bars of one :meth:`Prediction.row` figure (log scale): one group per device, one
    bar per weight format (bf16 and fp16 share a colour: "16-bit") and TP degree; scenarios that
    do not fit the memory are hatched and faded."""
    import numpy as np

    ax = _axes(ax, (11, 4))
    rows = [p.row() for p in predictions]
    for r in rows:
        r["series"] = ("16-bit" if r["weights"] in ("bf16", "fp16") else r["weights"],
                       r["tp"])
    devices = list(dict.fromkeys(r["device"] for r in rows))
    series = list(dict.fromkeys(r["series"] for r in rows))
    width = 0.8 / len(series)
    for j, (weights, tp) in enumerate(series):
        xs, ys, fits = [], [], []
        for i, name in enumerate(devices):
            r = next((r for r in rows if r["device"] == name and r["series"] == (weights, tp)),
                     None)
            if r is not None:
                xs.append(i + (j - (len(series) - 1) / 2) * width)
                ys.append(r[key])
                fits.append(r["fits"])
        label = weights + (f" TP{tp}" if tp > 1 else "")
        bars = ax.bar(xs, ys, width, label=label, color=f"C{j}")
        for bar, ok in zip(bars, fits):
            if not ok:
                bar.set_hatch("//")
                bar.set_alpha(0.35)
    ax.set_xticks(np.arange(len(devices)), devices, rotation=15, fontsize=8)
    ax.set_yscale("log")
    label = _LABELS.get(key, key)
    ax.set_ylabel(label)
    ax.legend(fontsize=8, ncol=len(series))
    ax.grid(True, axis="y", which="both", alpha=0.2)
    ax.set_title(f"{predictions[0].scenario.model_name}: predicted {label} "
                 "(hatched: does not fit the memory)", fontsize=10)
    return ax


def plot_prediction(p: Prediction, axes: Sequence[Axes] | None = None) -> Sequence[Axes]:
    """Two panels for one prediction: the device's roofline with the decode and prefill steps
    at their floors, and each step's compute / memory / communication times."""
    if axes is None:
        import matplotlib.pyplot as plt

        _, axes = plt.subplots(1, 2, figsize=(12, 4))
    s = p.scenario
    points = [(f"{name} (B={s.batch})", c.intensity, c.flops / max(c.compute_s, c.memory_s))
              for name, c in (("decode", p.decode), ("prefill", p.prefill))]
    plot_roofline(s.device.roofline(s.compute), points, ax=axes[0])
    axes[0].set_title(f"{s.device.name}, {s.compute} ({s.weights} weights)", fontsize=9)
    names = ["compute", "memory", "all-reduce"]
    for i, (step, c) in enumerate((("decode step", p.decode), ("prefill step", p.prefill))):
        values = [c.compute_s * 1e3, c.memory_s * 1e3, c.comm_s * 1e3]
        axes[1].barh([f"{step}: {n}" for n in names], values, color=[f"C{k}" for k in range(3)],
                     alpha=0.9 if i == 0 else 0.5)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("ms (floor = max(compute, memory) + all-reduce)")
    axes[1].set_title(f"TP{s.tp}: where one step's floor comes from", fontsize=9)
    return axes


def plot_steps_vs_floor(rows: Sequence[dict], title: str = "",
                        ax: Axes | None = None) -> Axes:
    """Every step of a measured run (from :func:`workbench.whatif.compare.compare_steps`):
    measured time and its floor, decode steps coloured by batch size."""
    ax = _axes(ax, (11, 3.8))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["predicted_s"] * 1e3 for r in rows], color="black", lw=1.2,
            label="floor (predicted)")
    decode = [r for r in rows if r["kind"] == "decode"]
    points = ax.scatter([r["step"] for r in decode], [r["measured_s"] * 1e3 for r in decode],
                        c=[r["decodes"] for r in decode], cmap="viridis", s=10,
                        label="measured decode step")
    other = [r for r in rows if r["kind"] != "decode"]
    ax.scatter([r["step"] for r in other], [r["measured_s"] * 1e3 for r in other], marker="x",
               color="tab:red", s=18, label="measured step with prefill")
    ax.figure.colorbar(points, ax=ax, label="batch (decoding sequences)")
    ax.set_yscale("log")
    ax.set_xlabel("engine step")
    ax.set_ylabel("ms")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, which="both", alpha=0.2)
    return ax
