"""Explore paged KV storage on a real run: block size, pool size, preemption (notebook 03).

:class:`BlockMapExplorer` (ipywidgets) serves a small list of requests with the paged engine
(``ContinuousEngine(..., record_blocks=True)``) and draws its block map
(:func:`workbench.viz.paged.plot_block_map`). Sliders change the block size, the pool (in
tokens) and the preemption mode, and re-run the engine (well under a second per change for a
few requests of a few dozen tokens with the bundled model on a CPU); a step slider moves a cursor
over the map and lists which blocks each request holds at that step. The status line gives the
real-token share of the memory held, the tail waste of last blocks, the preemptions, and whether
every output is still the one the requests get with a pool large enough for all of them.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Any

from workbench.engine import ContinuousEngine, EngineConfig, EngineRun, Request, run_continuous
from workbench.errors import WorkbenchError
from workbench.kv.accounting import kv_summary
from workbench.model.llama import LlamaModel
from workbench.viz.paged import plot_block_map

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["BlockMapExplorer", "block_map_explorer", "run_paged"]

BLOCK_SIZES = (1, 2, 4, 8, 16, 32)


def run_paged(model: LlamaModel, requests: list[Request], block_size: int, num_blocks: int,
              preemption: str = "recompute") -> tuple[EngineRun, ContinuousEngine]:
    """Serve ``requests`` all at once on a pool of ``num_blocks`` blocks, recording the block map
    (swap keeps up to twice the pool in CPU memory). Returns (run, engine)."""
    longest = max(len(r.prompt_ids) for r in requests)
    config = EngineConfig(max_num_seqs=len(requests),
                          max_num_batched_tokens=max(256, longest, len(requests)),
                          chunked_prefill=True, kv="paged", block_size=block_size,
                          num_blocks=num_blocks, preemption=preemption,
                          num_cpu_blocks=2 * num_blocks if preemption == "swap" else 0)
    engine = ContinuousEngine(model, config, record_blocks=True)
    return run_continuous(model, requests, config, engine=engine), engine


class BlockMapExplorer:
    """Block size, pool size and preemption on sliders; the block map of a real run.

    ``requests`` should be small (a handful of requests, a few dozen tokens each): every change
    of the first three sliders re-runs the engine. Displaying the object displays
    :attr:`widget`; :meth:`update` re-runs, :meth:`draw` redraws (tests call them).
    """

    def __init__(self, model: LlamaModel, requests: list[Request], block_size: int = 8,
                 pool_tokens: int | None = None, preemption: str = "recompute") -> None:
        import ipywidgets as w

        if not requests:
            raise WorkbenchError("the explorer needs at least one request")
        if block_size not in BLOCK_SIZES:
            raise WorkbenchError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")
        self.model, self.requests = model, list(requests)
        lengths = [len(r.prompt_ids) + r.max_new_tokens for r in requests]
        self.longest = max(lengths)
        top = BLOCK_SIZES[-1]
        low = -(-self.longest // top) * top  # the longest request fits at any block size
        high = max(low, -(-sum(lengths) // top) * top)  # every request fits at once
        pool_tokens = high // 2 if pool_tokens is None else pool_tokens
        # the outputs every pool must reproduce: all requests at once, nothing preempted
        roomy, _ = run_paged(model, self.requests, top, high // top)
        self.expected = [t.output_ids for t in roomy.traces]
        knob = {"style": {"description_width": "10em"}, "layout": w.Layout(width="34em"),
                "continuous_update": False}
        self.block_size = w.SelectionSlider(options=BLOCK_SIZES, value=block_size,
                                            description="block size (tokens)", **knob)
        self.pool = w.IntSlider(min(max(pool_tokens, low), high), min=low, max=high, step=top,
                                description="pool (tokens)", **knob)
        self.preemption = w.ToggleButtons(options=["recompute", "swap"], value=preemption,
                                          description="preemption")
        self.step = w.IntSlider(0, min=0, max=0, description="step", **knob)
        self.status, self.tables = w.HTML(), w.HTML()
        self.output = w.Output()
        for control in (self.block_size, self.pool, self.preemption):
            control.observe(lambda _: self.update(), names="value")
        self.step.observe(lambda _: self.draw(), names="value")
        self.widget = w.VBox([w.HBox([w.VBox([self.block_size, self.pool]), self.preemption]),
                              self.status, self.step, self.output, self.tables])
        self.engine: ContinuousEngine | None = None

    def update(self) -> dict[str, Any]:
        """Re-run the engine with the sliders' settings, redraw; returns the status figures."""
        bs = self.block_size.value
        run, self.engine = run_paged(self.model, self.requests, bs, self.pool.value // bs,
                                     self.preemption.value)
        kv = kv_summary(self.engine.kv_history)
        tail = sum(h["reserved"] - h["tokens"] for h in self.engine.kv_history)
        held = sum(h["reserved"] for h in self.engine.kv_history)
        same = [t.output_ids for t in run.traces] == self.expected
        slots = self.pool.value // self.longest
        figures = {"steps": kv["steps"], "real_fraction": kv["real_fraction"],
                   "preemptions": kv["preemptions"], "peak_running": kv["peak_running"],
                   "same_outputs": same, "max_length_slots": slots}
        self.status.value = (
            f"{self.pool.value // bs} blocks of {bs} tokens; {kv['steps']} steps, up to "
            f"{kv['peak_running']} requests at once, {kv['preemptions']} preemptions; of the "
            f"memory held, <b>{kv['real_fraction']:.1%} real tokens</b> "
            f"({tail / max(held, 1):.1%} unfilled tails of last blocks). The same memory as "
            f"max-length slots of {self.longest} tokens: {slots} request(s) at once.<br>"
            f"outputs equal to a pool with room for all: <b>{same}</b>")
        self.step.max = max(kv["steps"] - 1, 0)
        self.step.value = min(self.step.value, self.step.max)
        self.draw()
        return figures

    def draw(self) -> Figure | None:
        """Redraw the block map with the step cursor, and list that step's block owners."""
        import matplotlib.pyplot as plt

        if self.engine is None:
            return None
        s = self.step.value
        owners: dict[int, list[int]] = {}
        for block, rid in enumerate(self.engine.block_map[s]):
            if rid >= 0:
                owners.setdefault(rid, []).append(block)
        rows = [f"request {rid}: blocks {', '.join(map(str, blocks))}"
                for rid, blocks in sorted(owners.items())]
        h = self.engine.kv_history[s]
        self.tables.value = (f"after step {s + 1}: {h['tokens']} tokens stored in "
                             f"{h['reserved']} token slots held of {h['capacity']}<br>"
                             + ("<br>".join(html.escape(r) for r in rows) or "(all free)"))
        self.output.clear_output(wait=True)
        with self.output:
            fig, ax = plt.subplots(figsize=(12, 3.6))
            plot_block_map(self.engine.block_map, self.engine.kv_history, ax=ax,
                           highlight_step=s + 1, title=f"{self.preemption.value}")
            fig.tight_layout()
            plt.show()
            plt.close(fig)
        return fig

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def block_map_explorer(model: LlamaModel, requests: list[Request],
                       **knobs: Any) -> BlockMapExplorer:
    """A :class:`BlockMapExplorer`, run and drawn once now (so a static view shows a result)."""
    explorer = BlockMapExplorer(model, requests, **knobs)
    explorer.update()
    return explorer
