"""Figures for notebook ``08_streaming_llm``: perplexity along a long stream, attention maps.

* :func:`plot_ppl_over_position` - perplexity in bins of positions, one line per method, with
  the trained context and the window marked: dense attention leaves the chart past the context.
* :func:`plot_attention_map` - one layer's attention probabilities (log scale), queries down,
  keys across: a sink is a bright first column.
* :func:`plot_sink_share` - per layer and head, the attention the first tokens receive,
  against what uniform attention would give them.
* :func:`plot_time_per_token` - milliseconds per new token for each method (log scale).
* :func:`plot_eviction_penalty` - window without sinks over sinks + window against the window size,
  one line per model: how much each model needs its first tokens.

Every function takes plain data, draws on ``ax`` (a new figure when None) and returns the Axes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch

from workbench.streaming.score import LABELS, VISIBLY_WORSE, StreamScore

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_attention_map", "plot_eviction_penalty", "plot_ppl_over_position",
           "plot_sink_share", "plot_time_per_token"]

COLORS = {"dense": "C3", "window": "C1", "recompute": "C2", "sinks": "C0"}


def _axes(ax: Axes | None, size: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=size)
    return ax


def plot_ppl_over_position(scores: Mapping[str, StreamScore], bin_size: int = 256,
                           context: int | None = None, window: int | None = None,
                           where: torch.Tensor | None = None, ax: Axes | None = None) -> Axes:
    """Perplexity of each method in bins of ``bin_size`` positions (log scale); with ``where``
    [N - 1] bool, every method on those positions only (e.g. where recomputation was evaluated)."""
    ax = _axes(ax, (10, 4))
    for method, score in scores.items():
        starts, ppl = score.ppl_by_bin(bin_size, where)
        centers = np.array(starts) + bin_size / 2
        ax.plot(centers, ppl, "o-", ms=3, color=COLORS.get(method),
                label=f"{LABELS.get(method, method)} ({score.ppl(where=where):.2f} overall)")
    if context is not None:
        ax.axvline(context, color="0.3", ls="--", lw=1)
        ax.annotate("trained context", (context, 1), xycoords=("data", "axes fraction"),
                    xytext=(4, -12), textcoords="offset points", fontsize=8, color="0.3")
    if window is not None:
        ax.axvline(window, color="0.6", ls=":", lw=1)
        ax.annotate("window full", (window, 1), xycoords=("data", "axes fraction"),
                    xytext=(4, -24), textcoords="offset points", fontsize=8, color="0.5")
    ax.set_yscale("log")
    ax.set_xlabel("position in the stream (tokens)")
    ax.set_ylabel(f"perplexity (bins of {bin_size})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return ax


def plot_attention_map(probs: torch.Tensor, ax: Axes | None = None, title: str | None = None,
                       floor: float = 1e-4) -> Axes:
    """Attention probabilities [T, T] (queries down, keys across) on a log colour scale."""
    ax = _axes(ax, (5, 4.5))
    data = probs.float().clamp(min=floor).log10().numpy()
    data[np.triu_indices_from(data, k=1)] = np.nan  # the future: masked, left blank
    im = ax.imshow(data, cmap="magma", vmin=np.log10(floor), vmax=0, interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="log10 attention")
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    if title:
        ax.set_title(title, fontsize=10)
    return ax


def plot_sink_share(share: torch.Tensor, uniform: float, sinks: int = 4,
                    ax: Axes | None = None) -> Axes:
    """Attention on the first ``sinks`` keys, share [L, H]: a bar per layer (mean of its
    heads), a dot per head, and the level uniform attention would give."""
    ax = _axes(ax, (7, 3.5))
    L, H = share.shape
    ax.bar(range(L), share.mean(1).numpy(), color="C0", alpha=0.5, label="mean of the heads")
    for layer in range(L):
        ax.plot([layer] * H, share[layer].numpy(), "k.", ms=4)
    ax.axhline(uniform, color="C3", ls="--", lw=1, label="uniform attention")
    ax.set_xticks(range(L))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"attention on the first {sinks} tokens")
    ax.set_ylim(0, max(1.05 * float(share.max()), 2 * uniform))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return ax


def plot_time_per_token(ms_per_token: Mapping[str, float], ax: Axes | None = None,
                        title: str | None = None) -> Axes:
    """Milliseconds per new token for each method (log scale), values written on the bars."""
    ax = _axes(ax, (7, 3.5))
    methods = list(ms_per_token)
    values = [ms_per_token[m] for m in methods]
    bars = ax.bar(range(len(methods)), values, color=[COLORS.get(m, "0.5") for m in methods])
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.3g} ms", (bar.get_x() + bar.get_width() / 2, value),
                    xytext=(0, 2), textcoords="offset points", ha="center", fontsize=8)
    ax.set_xticks(range(len(methods)), [LABELS.get(m, m).replace(" (", "\n(").replace(" + ", "\n+ ")
                                        for m in methods], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per new token")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y", which="both")
    return ax


def plot_eviction_penalty(penalties: Mapping[str, Mapping[int, float]], ax: Axes | None = None,
                          visible: float = VISIBLY_WORSE) -> Axes:
    """Per model (label -> {window: penalty}, from :func:`~workbench.streaming.score.
    eviction_penalty`): perplexity of window attention without sinks over sinks + window, against the
    window size (log 2 axis); 1 is "the first tokens do not matter", ``visible`` is marked."""
    ax = _axes(ax, (7, 3.5))
    for label, penalty in penalties.items():
        windows = sorted(penalty)
        ax.plot(windows, [penalty[w] for w in windows], "o-", label=label)
    ax.axhline(1.0, color="0.3", lw=1)
    ax.axhline(visible, color="C3", ls="--", lw=1, label=f"{visible:.2f}: visibly worse")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("window (keys per query)")
    ax.set_ylabel("window without sinks /\nsinks + window (perplexity)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return ax
