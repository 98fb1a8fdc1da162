"""Heat maps of attention masks: queries down, keys across, attended cells coloured.

:func:`plot_mask` draws one mask (a [T, S] tensor or one row of a [B, 1, T, S] batch mask), with
token texts or indices on the axes and, for a packed batch, the sequence boundaries
(``cu_seqlens`` of the queries and of the keys) drawn as lines. :func:`plot_masks` puts several
side by side. :func:`mask_explorer` is a small ipywidgets control: pick a layout, the sequence
lengths and a window, and see the mask. Used by notebook ``01_attention_masking``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from workbench.attention.masks import (causal_mask, cu_seqlens, packed_causal_mask,
                                       padded_causal_mask, sliding_window_mask)
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["LAYOUTS", "MaskExplorer", "layout_mask", "mask_explorer", "plot_mask", "plot_masks",
           "token_labels"]

_MAX_TICKS = 40  # above this many rows/columns, let matplotlib choose the ticks


def _as_2d(mask: torch.Tensor, row: int) -> torch.Tensor:
    if mask.dim() == 4:
        return mask[row, 0]  # [B, 1, T, S] -> [T, S]
    if mask.dim() == 3:
        return mask[row]
    if mask.dim() != 2:
        raise WorkbenchError(f"expected a [T, S] or [B, 1, T, S] mask, got {tuple(mask.shape)}")
    return mask


def token_labels(tokenizer: Any, ids: Sequence[int], prefix: str = "") -> list[str]:
    """Axis labels for token ids: each token's text with spaces as ``·`` and newlines as ``↵``
    (``prefix``, e.g. ``"A:"``, tells sequences apart in a packed batch)."""
    texts = [tokenizer.decode([i]) for i in ids]
    return [prefix + t.replace(" ", "·").replace("\n", "↵") for t in texts]


def _ticks(axis: Any, n: int, labels: Sequence[str] | None, rotate: bool) -> None:
    if labels is not None:
        if len(labels) != n:
            raise WorkbenchError(f"{len(labels)} labels for {n} rows/columns")
        axis.set_ticks(range(n), [str(x) for x in labels], rotation=90 if rotate else 0,
                       fontsize=7)
    elif n <= _MAX_TICKS:
        axis.set_ticks(range(n), [str(i) for i in range(n)], fontsize=7)


def plot_mask(mask: torch.Tensor, ax: Axes | None = None, title: str | None = None,
              query_labels: Sequence[str] | None = None, key_labels: Sequence[str] | None = None,
              query_lens: Sequence[int] | None = None, context_lens: Sequence[int] | None = None,
              seq_names: Sequence[str] | None = None, row: int = 0, color: str = "C0") -> Axes:
    """Draw ``mask`` (True = attend, coloured) with queries as rows and keys as columns.

    ``query_lens``/``context_lens`` (a packed batch) draw the sequence boundaries and name each
    block (``seq_names``, default ``seq 0``, ...); with only ``query_lens`` the keys are taken to be
    the same tokens (fresh prefills). ``row`` picks the row of a [B, 1, T, S] mask.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    m = _as_2d(mask, row).detach().to("cpu", torch.float32)  # [T, S]
    T, S = m.shape
    if ax is None:
        _, ax = plt.subplots(figsize=(min(9, 1.5 + 0.28 * S), min(9, 1.2 + 0.28 * T)))
    ax.imshow(m.numpy(), cmap=ListedColormap(["#f4f4f4", color]), vmin=0, vmax=1,
              interpolation="nearest", aspect="equal")
    if max(T, S) <= 80:  # a thin grid between cells
        ax.set_xticks([x - 0.5 for x in range(1, S)], minor=True)
        ax.set_yticks([y - 0.5 for y in range(1, T)], minor=True)
        ax.grid(which="minor", color="white", linewidth=0.6)
        ax.tick_params(which="minor", length=0)
    _ticks(ax.xaxis, S, key_labels, rotate=True)
    _ticks(ax.yaxis, T, query_labels, rotate=False)
    if query_lens is not None:
        context_lens = query_lens if context_lens is None else context_lens
        q_cut = cu_seqlens(query_lens).tolist()
        k_cut = cu_seqlens(context_lens).tolist()
        for y in q_cut[1:-1]:
            ax.axhline(y - 0.5, color="k", linewidth=1.2)
        for x in k_cut[1:-1]:
            ax.axvline(x - 0.5, color="k", linewidth=1.2)
        for i, (q0, k0) in enumerate(zip(q_cut[:-1], k_cut[:-1])):  # name each sequence's block
            name = seq_names[i] if seq_names is not None else f"seq {i}"
            ax.annotate(name, (k0 - 0.4, q0 - 0.4), fontsize=7, va="top", ha="left",
                        bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.7))
    ax.set_xlabel(f"keys ({S})")
    ax.set_ylabel(f"queries ({T})")
    attended = int(m.sum())
    ax.set_title(f"{title + chr(10) if title else ''}{attended} of {T * S} cells attended",
                 fontsize=9)
    return ax


def plot_masks(panels: Mapping[str, torch.Tensor | tuple[torch.Tensor, dict]],
               ncols: int | None = None, panel_size: float = 3.6) -> Figure:
    """Several masks side by side: ``{title: mask}`` or ``{title: (mask, plot_mask kwargs)}``."""
    import matplotlib.pyplot as plt

    ncols = ncols or len(panels)
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_size * ncols, panel_size * nrows),
                             squeeze=False)
    for ax, (title, panel) in zip(axes.flat, panels.items()):
        mask, kwargs = panel if isinstance(panel, tuple) else (panel, {})
        plot_mask(mask, ax=ax, title=title, **kwargs)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- the explorer

LAYOUTS = ("causal", "left padding", "right padding", "packed", "sliding window",
           "packed + sliding window")


def layout_mask(layout: str, lengths: Sequence[int], new_tokens: Sequence[int] | None = None,
                window: int = 4) -> tuple[torch.Tensor, dict]:
    """The mask of one of :data:`LAYOUTS` for sequences of ``lengths`` tokens, and the
    :func:`plot_mask` keyword arguments that draw it (row 0, or the packed boundaries).

    ``causal`` and ``sliding window`` use the first length only; ``new_tokens`` (packed layouts)
    are the new tokens per sequence, the last of its ``lengths`` (default: all of them).
    """
    lengths = [int(n) for n in lengths]
    if not lengths or min(lengths) < 1:
        raise WorkbenchError(f"lengths must be positive integers, got {lengths}")
    if layout == "causal":
        return causal_mask(lengths[0]), {}
    if layout == "sliding window":
        return sliding_window_mask(lengths[0], window=window), {}
    if layout in ("left padding", "right padding"):
        P = max(lengths)
        left = layout == "left padding"
        valid = torch.tensor([[False] * (P - n) + [True] * n if left else
                              [True] * n + [False] * (P - n) for n in lengths])  # [B, P]
        return padded_causal_mask(valid, P), {"row": lengths.index(min(lengths))}  # most pads
    if layout in ("packed", "packed + sliding window"):
        queries = lengths if new_tokens is None else [int(n) for n in new_tokens]
        w = window if layout.endswith("window") else None
        mask = packed_causal_mask(queries, lengths, window=w)
        return mask, {"query_lens": queries, "context_lens": lengths}
    raise WorkbenchError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise WorkbenchError(f"expected whole numbers separated by commas, got {text!r}") from None


class MaskExplorer:
    """Controls (layout, lengths, new tokens, window) and a figure redrawn on every change.

    Displaying the object displays :attr:`widget`; :meth:`draw` redraws (tests call it).
    """

    def __init__(self, lengths: Sequence[int] = (6, 3, 5), new_tokens: Sequence[int] | None = None,
                 layout: str = "packed", window: int = 3) -> None:
        import ipywidgets as w

        style = {"description_width": "9em"}
        self.layout = w.Dropdown(options=LAYOUTS, value=layout, description="layout", style=style)
        self.lengths = w.Text(", ".join(map(str, lengths)), description="lengths (keys)",
                              style=style)
        self.new_tokens = w.Text(", ".join(map(str, new_tokens or lengths)),
                                 description="new tokens (packed)", style=style)
        self.window = w.IntSlider(window, min=1, max=16, description="window", style=style)
        self.status = w.HTML()
        self.output = w.Output()
        for control in (self.layout, self.lengths, self.new_tokens, self.window):
            control.observe(lambda _: self.draw(), names="value")
        self.widget = w.VBox([w.HBox([w.VBox([self.layout, self.window]),
                                      w.VBox([self.lengths, self.new_tokens])]),
                              self.status, self.output])

    def draw(self) -> torch.Tensor | None:
        """Rebuild the mask from the controls and redraw it; return it (None on bad input)."""
        import matplotlib.pyplot as plt

        try:
            mask, kwargs = layout_mask(self.layout.value, _int_list(self.lengths.value),
                                       _int_list(self.new_tokens.value), self.window.value)
        except WorkbenchError as err:
            self.status.value = f"<span style='color:#b00'>{err}</span>"
            return None
        self.status.value = f"mask shape {list(mask.shape)}"
        self.output.clear_output(wait=True)
        with self.output:
            ax = plot_mask(mask, title=self.layout.value, **kwargs)
            plt.show()
            plt.close(ax.figure)
        return mask

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def mask_explorer(lengths: Sequence[int] = (6, 3, 5), new_tokens: Sequence[int] | None = None,
                  layout: str = "packed", window: int = 3) -> MaskExplorer:
    """An ipywidgets control to pick a layout and lengths and see the mask (drawn once now)."""
    explorer = MaskExplorer(lengths, new_tokens, layout, window)
    explorer.draw()
    return explorer
