"""Figures for notebook ``07_quantization``.

* :func:`plot_error_vs_group` - an error measure (weight error, perplexity change...) against the
  group size, one line per format (int8/int4, symmetric/asymmetric): smaller groups, smaller error.
* :func:`plot_weight_grid` - the values of one weight group as a histogram, with the grid of
  values its codes can take drawn over it (where rounding sends each weight).
* :func:`plot_memory_bars` - bytes per setting, stacked by part (codes, scales and offsets, parts
  left unquantized), with the ratio to the first bar written on top.
* :func:`plot_decode_speed` - decode tok/s per setting beside its memory-bandwidth floor.
* :func:`quant_explorer` - a widget to try bits, group sizes and symmetry on one weight matrix.

Every function takes plain data, draws on ``ax`` (a new figure when None) and returns the Axes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from workbench.quant.groupwise import QuantConfig, quantize

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_decode_speed", "plot_error_vs_group", "plot_memory_bars", "plot_weight_grid",
           "quant_explorer"]


def _axes(ax: Axes | None, size: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=size)
    return ax


def _group_label(group: int | None) -> str:
    return "per\nchannel" if group is None else str(group)


def plot_error_vs_group(errors: Mapping[QuantConfig, float], ylabel: str, title: str | None = None,
                        log: bool = True, ax: Axes | None = None) -> Axes:
    """``errors[config]`` against the config's group size, one line per (bits, symmetry).

    Groups are placed left to right from smallest to per-channel (None), evenly spaced.
    """
    ax = _axes(ax, (6, 3.6))
    groups = sorted({c.group_size for c in errors}, key=lambda g: (g is None, g or 0))
    lines: dict[tuple[int, bool], list[tuple[int, float]]] = {}
    for config, value in errors.items():
        lines.setdefault((config.bits, config.symmetric), []).append(
            (groups.index(config.group_size), value))
    for (bits, symmetric), points in sorted(lines.items(), reverse=True):
        points.sort()
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o",
                linestyle="-" if symmetric else "--",
                color="tab:blue" if bits == 8 else "tab:orange",
                label=f"int{bits} {'symmetric' if symmetric else 'asymmetric'}")
    ax.set_xticks(range(len(groups)), [_group_label(g) for g in groups])
    ax.set_xlabel("group size (values sharing one scale)")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title or f"{ylabel} vs bits and group size")
    return ax


def plot_weight_grid(values: torch.Tensor, config: QuantConfig, bins: int = 60,
                     title: str | None = None, ax: Axes | None = None) -> Axes:
    """Histogram of one group of weights (1-D ``values``, quantized as one group) and the
    ``2^bits`` values its codes can represent (grey lines); red ticks mark the rounded weights."""
    values = values.detach().float().flatten()
    q = quantize(values[None], QuantConfig(config.bits, None, config.symmetric,
                                           config.scale_dtype))
    scale = q.scale.float().item()
    zero = 0.0 if q.zero is None else q.zero.float().item()
    codes = range(-config.qmax, config.qmax + 1) if config.symmetric else range(config.qmax + 1)
    grid = [c * scale + zero for c in codes]
    ax = _axes(ax, (7, 3.2))
    ax.hist(values.numpy(), bins=bins, color="tab:blue", alpha=0.7, label="weights")
    for i, g in enumerate(grid):
        ax.axvline(g, color="grey", lw=0.6 if config.bits == 8 else 1.0, alpha=0.6,
                   label="representable values" if i == 0 else None)
    rounded = q.dequantize()[0].numpy()
    ax.plot(rounded, [0] * len(rounded), "|", color="tab:red", markersize=12,
            label="after rounding")
    ax.set_xlabel("weight value")
    ax.set_ylabel("count")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title or f"{len(values)} weights on the {config.name} grid "
                          f"(step {scale:.2g}: error <= step/2)")
    return ax


def plot_memory_bars(parts: Mapping[str, Mapping[str, float]], unit: float = 1e6,
                     unit_name: str = "MB", title: str = "memory", ax: Axes | None = None) -> Axes:
    """Stacked bars: ``parts[setting][part] = bytes``; the ratio to the first setting on top."""
    ax = _axes(ax, (7, 3.6))
    names = list(parts)
    kinds: list[str] = []
    for p in parts.values():
        kinds += [k for k in p if k not in kinds]
    colors = dict(zip(kinds, ["tab:blue", "tab:orange", "tab:grey", "tab:green", "tab:purple"]))
    bottoms = [0.0] * len(names)
    for kind in kinds:
        heights = [parts[n].get(kind, 0) / unit for n in names]
        ax.bar(names, heights, bottom=bottoms, color=colors.get(kind), label=kind)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    first = bottoms[0]
    for x, total in enumerate(bottoms):
        ax.text(x, total, f"{total:.3g} {unit_name}\n{first / total:.2f}x smaller" if x else
                f"{total:.3g} {unit_name}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(unit_name)
    ax.set_ylim(0, max(bottoms) * 1.25)
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return ax



def plot_decode_speed(tok_s: Mapping[str, float], floors: Mapping[str, float] | None = None,
                      title: str = "greedy decode speed", ax: Axes | None = None) -> Axes:
    """Horizontal bars of decode tok/s per setting; a black tick at each setting's bandwidth
    floor (the speed if a step only read its weights once) when ``floors`` is given."""
    ax = _axes(ax, (7, 0.5 + 0.4 * len(tok_s)))
    names = list(tok_s)
    ax.barh(names, [tok_s[n] for n in names], color="tab:blue")
    for y, n in enumerate(names):
        ax.text(tok_s[n], y, f" {tok_s[n]:.0f}", va="center", fontsize=8)
        if floors and n in floors:
            ax.plot([floors[n]] * 2, [y - 0.4, y + 0.4], color="black", lw=2,
                    label="bandwidth floor" if y == 0 else None)
    ax.invert_yaxis()
    ax.set_xlabel("tokens / s")
    if floors:
        ax.set_xscale("log")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title)
    return ax


def quant_explorer(weight: torch.Tensor):
    """A widget: pick bits, group size, symmetry and a row of ``weight`` [out, in]; see the first
    group of that row on its grid, and the relative error of the whole matrix."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    weight = weight.detach().float().cpu()
    sizes = [g for g in (16, 32, 64, 128, 256) if weight.shape[1] % g == 0] + [None]
    bits = widgets.ToggleButtons(options=[4, 8], value=4, description="bits")
    group = widgets.Dropdown(options=[("per channel" if g is None else str(g), g) for g in sizes],
                             value=sizes[min(2, len(sizes) - 1)], description="group")
    symmetric = widgets.Checkbox(value=True, description="symmetric")
    row = widgets.IntSlider(0, 0, weight.shape[0] - 1, description="row", continuous_update=False)
    out = widgets.Output()

    def draw(_=None) -> None:
        config = QuantConfig(bits.value, group.value, symmetric.value)
        size = group.value or weight.shape[1]
        approx = quantize(weight, config).dequantize()
        error = ((weight - approx).norm() / weight.norm()).item()
        with out:
            out.clear_output(wait=True)
            title = (f"row {row.value}, first group: {config.name}; whole matrix relative "
                     f"error {error:.4f}")
            ax = plot_weight_grid(weight[row.value, :size], config, title=title)
            plt.show(ax.figure)

    for w in (bits, group, symmetric, row):
        w.observe(draw, names="value")
    draw()
    return widgets.VBox([widgets.HBox([bits, group, symmetric, row]), out])
