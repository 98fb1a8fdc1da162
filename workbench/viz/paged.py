"""Figures for notebook ``03_paged_attention``: where KV memory goes, block by block.

* :func:`plot_reservation` - one request's keys/values over its steps: tokens stored against the
  memory each policy holds for it (a max-length slot from the start; whole blocks as it grows).
* :func:`plot_pool` - a block pool at one moment: who owns each block, reference counts, cached
  and free blocks (the :class:`~workbench.kv.blocks.BlockManager` demo).
* :func:`plot_block_map` - blocks (rows) against engine steps (columns), each cell coloured by
  the request that owns the block (``ContinuousEngine.block_map``); preemptions marked.
* :func:`waste_split` and :func:`plot_waste` - of the KV memory, the share holding real tokens,
  reserved but not (yet) holding a token, and free, over a whole run.
* :func:`plot_budget_sweep` - a figure of :func:`workbench.bench.paged.bench_budgets` rows
  against the KV budget, one line per policy.
* :func:`plot_decode_profile` - GPU time of one decode step against the batch, per
  implementation, with the bandwidth floor (``tools/profile_decode.py``'s JSON rows).
* :func:`plot_time_split` - where a serving run's time went: prefill and decode, measured against
  their floors (``bench_throughput`` rows with ``time_split``).

Every plotting function takes plain data, draws on ``ax`` (a new figure when None) and returns
the Axes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from workbench.errors import WorkbenchError
from workbench.kv.blocks import BlockManager
from workbench.viz.batching import _colour_index

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_block_map", "plot_budget_sweep", "plot_decode_profile", "plot_pool",
           "plot_reservation", "plot_time_split", "plot_waste", "waste_split"]

_LEGEND_REQUESTS = 24  # name the requests' colours in block maps up to this many requests
WASTE_PARTS = {"real": ("real tokens", "C2"),
               "reserved_unused": ("reserved, no token (yet)", "C1"),
               "free": ("free", "0.85")}


def _axes(ax: Axes | None, size: tuple[float, float]) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=size)
    return ax


def _request_colour(rid: int):
    from matplotlib import colormaps

    return colormaps["tab20"](_colour_index(rid))


def plot_reservation(histories: Mapping[str, Sequence[Mapping]], show: Sequence[str] | None = None,
                     ax: Axes | None = None) -> Axes:
    """KV tokens of one request over its steps: stored (``tokens``) vs held (``reserved``).

    ``histories`` maps a policy name to the ``kv_history`` of an engine that served that one
    request alone (steps after it finished are left out); the shaded area between a policy's
    reservation and the stored tokens is the memory it holds without a token in it. ``show``
    draws only some of the policies, in the colours they have when all are drawn (a zoom).
    """
    if not histories:
        raise WorkbenchError("plot_reservation needs at least one history")
    ax = _axes(ax, (8, 3.8))
    first = next(iter(histories.values()))
    live = [i for i, h in enumerate(first) if h["running"]]  # the request's lifetime
    steps = np.arange(1, len(live) + 1)
    tokens = np.array([first[i]["tokens"] for i in live])
    for k, (name, history) in enumerate(histories.items()):
        if len(history) != len(first):
            raise WorkbenchError(f"{name}: {len(history)} steps, the first history has "
                                 f"{len(first)}: both must serve the same request")
        if show is not None and name not in show:
            continue
        reserved = np.array([history[i]["reserved"] for i in live], dtype=float)
        colour = f"C{(k + 1) % 10}"
        ax.step(steps, reserved, where="post", color=colour, lw=2,
                label=f"{name}: held (real {tokens.sum() / max(reserved.sum(), 1):.0%})")
        ax.fill_between(steps, tokens, reserved, step="post", color=colour, alpha=0.15)
    ax.step(steps, tokens, where="post", color="k", lw=1.5, label="tokens stored")
    ax.set_xlabel("engine step")
    ax.set_ylabel("KV memory (tokens)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="center right", fontsize=8)
    return ax


def plot_pool(manager: BlockManager, tables: Mapping[str, Sequence[int]],
              ax: Axes | None = None, title: str | None = None) -> Axes:
    """The blocks of ``manager`` in a row: owner(s) and reference count in each cell.

    ``tables`` names the live block tables (``{"A": [0, 1], "B": [0, 2]}``): a block in several
    tables is shared (hatched). Free blocks are white, free but still in the prefix cache grey.
    """
    n = manager.num_blocks
    owners: list[list[str]] = [[] for _ in range(n)]
    for name, table in tables.items():
        for block in table:
            if not 0 <= block < n:
                raise WorkbenchError(f"table {name!r} holds block {block}, pool has {n}")
            owners[block].append(name)
    names = list(tables)
    ax = _axes(ax, (min(1 + 0.7 * n, 14), 1.6))
    for b in range(n):
        who = owners[b]
        cached = manager.refcount[b] == 0 and manager.is_cached(b)
        face = (("0.8" if cached else "white") if not who
                else (*_request_colour(names.index(who[0]))[:3], 0.45))  # light: the text reads
        ax.add_patch(_rect(b, face, hatch="//" if len(who) > 1 else None))
        label = "+".join(who) if who else ("cached" if cached else "free")
        ax.text(b + 0.5, 0.62, label, ha="center", va="center", fontsize=8)
        ax.text(b + 0.5, 0.25, f"ref {manager.refcount[b]}", ha="center", va="center",
                fontsize=7, color="0.2")
    ax.set_xlim(0, n)
    ax.set_ylim(0, 1)
    ax.set_xticks(np.arange(n) + 0.5, [str(b) for b in range(n)])
    ax.set_yticks([])
    ax.set_xlabel("block")
    ax.set_title(title or f"{manager.num_used} of {n} blocks used, {manager.num_free} free")
    return ax


def _rect(x: float, face, hatch: str | None = None):
    from matplotlib.patches import Rectangle

    return Rectangle((x, 0), 1, 1, facecolor=face, edgecolor="0.3", hatch=hatch, lw=1)


def plot_block_map(block_map: Sequence[Sequence[int]], history: Sequence[Mapping] | None = None,
                   ax: Axes | None = None, title: str | None = None,
                   highlight_step: int | None = None) -> Axes:
    """Blocks (rows) against engine steps (columns); a cell is coloured by the request owning
    that block after that step (``block_map[step][block]``, -1 for free: white).

    With the engine's ``history`` (``kv_history``), steps where sequences were preempted get a
    red triangle above the map. ``highlight_step`` draws a vertical line (the widget's cursor).
    """
    steps = len(block_map)
    blocks = max((len(row) for row in block_map), default=0)
    ax = _axes(ax, (min(3 + 0.06 * steps, 14), 1.2 + min(0.12 * blocks, 6)))
    image = np.ones((max(blocks, 1), max(steps, 1), 4))  # [block, step, RGBA], white = free
    owned = 0
    for s, row in enumerate(block_map):
        for b, rid in enumerate(row):
            if rid >= 0:
                image[b, s] = _request_colour(int(rid))
                owned += 1
    ax.imshow(image, aspect="auto", interpolation="nearest",
              extent=(0.5, image.shape[1] + 0.5, image.shape[0] - 0.5, -0.5))
    if history is not None:
        if len(history) != steps:
            raise WorkbenchError(f"history has {len(history)} steps, block_map {steps}")
        hit = [s + 1 for s, h in enumerate(history) if h["preempted"]]
        if hit:
            ax.plot(hit, [-0.5] * len(hit), "v", color="red", ms=7, clip_on=False,
                    label=f"preemption ({sum(h['preempted'] for h in history)})")
    if highlight_step is not None:
        ax.axvline(highlight_step, color="k", lw=1.5)
    ids = sorted({int(r) for row in block_map for r in row if r >= 0})
    if 0 < len(ids) <= _LEGEND_REQUESTS:  # which colour is which request
        from matplotlib.patches import Patch

        handles = ax.get_legend_handles_labels()[0] + [
            Patch(color=_request_colour(r), label=f"request {r}") for r in ids]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=7,
                  frameon=False)
    ax.set_xlabel("engine step")
    ax.set_ylabel("KV block")
    used = owned / max(steps * blocks, 1)
    ax.set_title(f"{title} ({used:.0%} of block-steps owned)" if title
                 else f"{blocks} blocks, {used:.0%} of block-steps owned")
    return ax


def waste_split(history: Sequence[Mapping]) -> dict[str, float]:
    """Of the KV memory summed over a run's steps: ``real`` (tokens stored),
    ``reserved_unused`` (held by a sequence, no token in it: room for tokens to come, the unused
    tail of a max-length slot or of a last block) and ``free`` (held by nobody); they add to 1."""
    capacity = sum(h["capacity"] for h in history)
    if capacity <= 0:
        raise WorkbenchError("waste_split needs a history with capacity (an engine's kv_history)")
    tokens = sum(h["tokens"] for h in history)
    reserved = sum(h["reserved"] for h in history)
    return {"real": tokens / capacity, "reserved_unused": (reserved - tokens) / capacity,
            "free": (capacity - reserved) / capacity}


def plot_waste(splits: Mapping[str, Mapping[str, float]], ax: Axes | None = None) -> Axes:
    """One horizontal bar per policy, split as :func:`waste_split` returns; the real share of
    the memory held (real + reserved, the vLLM paper's figure) is printed at the bar's end."""
    ax = _axes(ax, (9, 0.8 + 0.7 * len(splits)))
    names = list(splits)
    for i, name in enumerate(names):
        left = 0.0
        for part, (label, colour) in WASTE_PARTS.items():
            width = splits[name][part]
            ax.barh(i, width, left=left, color=colour, edgecolor="white",
                    label=label if i == 0 else None)
            if width >= 0.06:
                ax.text(left + width / 2, i, f"{width:.0%}", ha="center", va="center", fontsize=8)
            left += width
        held = splits[name]["real"] + splits[name]["reserved_unused"]
        ax.text(1.01, i, f"real / held = {splits[name]['real'] / max(held, 1e-12):.0%}",
                va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the KV memory, summed over steps")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    return ax


def plot_budget_sweep(rows: Sequence[Mapping], metric: str = "output_tok_s",
                      ax: Axes | None = None) -> Axes:
    """``metric`` of :func:`~workbench.bench.paged.bench_budgets` rows against the KV budget
    (MiB), one line per policy (``"max-length reservation"``, ``"paged"``)."""
    if not rows:
        raise WorkbenchError("plot_budget_sweep needs at least one row")
    ax = _axes(ax, (6.5, 4))
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    for i, policy in enumerate(policies):
        mine = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["budget_gib"])
        ax.plot([r["budget_gib"] * 1024 for r in mine], [r[metric] for r in mine], "o-",
                color=f"C{i + 1}", label=policy)
    ax.set_xlabel("KV budget (MiB)")
    ax.set_ylabel({"output_tok_s": "useful output tok/s", "peak_running": "peak batch",
                   "real_fraction": "real tokens / reserved"}.get(metric, metric))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def plot_decode_profile(rows: Sequence[Mapping], context: int,
                        variants: Sequence[str] | None = None, ax: Axes | None = None) -> Axes:
    """Decode step time (ms, GPU, replayed graph) against the batch at one ``context``, per
    variant, with the floor (weights + KV bytes read over the measured bandwidth) dashed."""
    rows = [r for r in rows if r["context"] == context]
    if not rows:
        raise WorkbenchError(f"no decode-profile rows at context {context}")
    ax = _axes(ax, (6.5, 4))
    for i, variant in enumerate(variants or list(dict.fromkeys(r["variant"] for r in rows))):
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in mine], [r["step_ms"] for r in mine], "o-", color=f"C{i}",
                label=variant)
    floor = sorted({(r["batch"], r["floor_ms"]) for r in rows})
    ax.plot([b for b, _ in floor], [f for _, f in floor], "k--", label="floor (bandwidth)")
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch"] for r in rows})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_xlabel("batch (sequences decoding)")
    ax.set_ylabel("decode step (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"context {context} tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_time_split(rows: Sequence[Mapping], ax: Axes | None = None) -> Axes:
    """Per system, the measured prefill and decode time of a serving run (stacked), with the
    floor of each below it; rows without ``time_split`` are left out."""
    rows = [r for r in rows if "time_split" in r]
    if not rows:
        raise WorkbenchError("plot_time_split needs rows with a time_split (bench_throughput)")
    ax = _axes(ax, (9, 0.8 + 0.9 * len(rows)))
    longest = 0.0
    for i, row in enumerate(rows):
        split = row["time_split"]
        for dy, kind, alpha in ((-0.2, "", 1.0), (0.2, "_floor", 0.45)):
            left = 0.0
            for phase, colour in (("prefill", "C1"), ("decode", "C0")):
                width = split[f"{phase}{kind}_s"]
                label = f"{phase} {'floor' if kind else 'measured'}" if i == 0 else None
                ax.barh(i + dy, width, 0.38, left=left, color=colour, alpha=alpha, label=label)
                left += width
        total = split["prefill_s"] + split["decode_s"]
        ax.text(total, i - 0.2, f" {total:.2f} s ({row.get('fraction_of_floor', 0):.0%} of floor)",
                va="center", fontsize=8)
        longest = max(longest, total)
    ax.set_xlim(0, 1.3 * longest)  # room for the labels
    ax.set_yticks(range(len(rows)), [r["system"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="x", alpha=0.3)
    return ax
