"""Static next to continuous batching on the same requests, drawn and explored (notebook 02).

* :func:`run_strategies` serves one request list with both engines: static batches of ``slots``
  (:func:`~workbench.engine.run_static`) and continuous batching over ``slots`` KV slots
  (:func:`~workbench.engine.run_continuous`). Same model, same requests, same greedy sampling.
* :func:`plot_strategies` draws their slot timelines side by side on one step axis
  (:func:`workbench.viz.batching.plot_timeline`): white cells are slots that computed nothing
  useful.
* :class:`BatchingExplorer` (ipywidgets) puts the workload on sliders - the mean and the cap of
  the exponential output lengths, the number of slots, the arrival rate - and re-runs both real
  engines on a small workload (two static batches' worth of requests) at every change: 1-2 s on
  a 2-core CPU with the bundled model (about 15 ms per engine step, at most ~130 steps).
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from workbench.engine import EngineConfig, EngineRun, Request, run_continuous, run_static
from workbench.errors import WorkbenchError
from workbench.metrics import summarize
from workbench.model.llama import LlamaModel
from workbench.viz.batching import plot_timeline
from workbench.workloads import Exponential, Fixed, WorkloadSpec, make_requests

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["BatchingExplorer", "batching_explorer", "plot_strategies", "run_strategies"]

STRATEGIES = ("static", "continuous")


def run_strategies(model: LlamaModel, requests: list[Request], slots: int,
                   max_num_batched_tokens: int = 2048) -> dict[str, EngineRun]:
    """``{"static": run, "continuous": run}``: the requests served by both engines, one after
    the other, each with ``slots`` sequences at a time.

    The continuous engine's token budget is raised to the longest prompt if needed, so that no
    request is rejected for its length (chunked prefill stays off, as in static batching).
    """
    if slots < 1:
        raise WorkbenchError(f"slots must be >= 1, got {slots}")
    longest = max((len(r.prompt_ids) for r in requests), default=1)
    budget = max(max_num_batched_tokens, longest, slots)
    return {"static": run_static(model, requests, batch_size=slots),
            "continuous": run_continuous(model, requests, EngineConfig(slots, budget))}


def plot_strategies(runs: Mapping[str, EngineRun], fig: Figure | None = None,
                    width: float = 14.0) -> Figure:
    """One timeline per run, side by side, on the same step axis (the longer run's steps)."""
    import matplotlib.pyplot as plt

    if not runs:
        raise WorkbenchError("plot_strategies needs at least one run")
    steps = max(max(len(r.timeline) for r in runs.values()), 1)
    slots = max((len(row) for r in runs.values() for row in r.timeline), default=1)
    if fig is None:
        fig = plt.figure(figsize=(width, 1.3 + 0.32 * slots))
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    for ax, (name, run) in zip(axes, runs.items()):
        plot_timeline(run.timeline, title=f"{name}: {len(run.timeline)} steps", ax=ax)
        ax.set_xlim(-0.5, steps - 0.5)
    for ax in axes[1:]:
        ax.set_ylabel("")
    fig.tight_layout()
    return fig


class BatchingExplorer:
    """Sliders for a small workload; both engines re-run and the timelines redraw on a change.

    The workload has ``rounds x slots`` requests (``rounds`` full static batches). Output
    lengths are ``Exponential(mean, cap)`` (exact lengths, ``ignore_eos``), prompts are
    ``prompt_len`` tokens (held-out code with a tokenizer, random ids without), and an arrival
    rate of 0 sends every request at t=0 (else Poisson arrivals, requests/s). Displaying the
    object displays :attr:`widget`; :meth:`update` re-runs and redraws (tests call it).
    """

    def __init__(self, model: LlamaModel, tokenizer: Any = None, rounds: int = 2,
                 prompt_len: int = 16, mean: int = 8, cap: int = 24, slots: int = 4,
                 rate: float = 0.0, seed: int = 0) -> None:
        import ipywidgets as w

        if rounds < 1:
            raise WorkbenchError(f"rounds must be >= 1, got {rounds}")
        self.model, self.tokenizer = model, tokenizer
        self.rounds, self.prompt_len, self.seed = rounds, prompt_len, seed
        knob = {"style": {"description_width": "12em"}, "layout": w.Layout(width="30em"),
                "continuous_update": False}
        # the ranges keep a re-run short: both engines together take at most ~4 x cap steps,
        # and Poisson arrivals of 2 x 8 requests spread over less than a second
        self.mean = w.IntSlider(mean, min=1, max=24, description="output length mean", **knob)
        self.cap = w.IntSlider(cap, min=1, max=32, description="output length cap", **knob)
        self.slots = w.IntSlider(slots, min=1, max=8, description="slots (batch size)", **knob)
        self.rate = w.FloatSlider(rate, min=0.0, max=200.0, step=40.0,
                                  description="arrivals/s (0: all at t=0)", **knob)
        self.status = w.HTML()
        self.output = w.Output()
        for control in (self.mean, self.cap, self.slots, self.rate):
            control.observe(lambda _: self.update(), names="value")
        self.widget = w.VBox([w.HBox([w.VBox([self.mean, self.cap]),
                                      w.VBox([self.slots, self.rate])]),
                              self.status, self.output])

    def requests(self) -> list[Request]:
        """The workload the sliders describe (the same for the same settings)."""
        rate = float(self.rate.value)
        spec = WorkloadSpec(name="explorer", num_requests=self.rounds * self.slots.value,
                            prompt_len=Fixed(self.prompt_len),
                            output_len=Exponential(self.mean.value, cap=self.cap.value),
                            arrival="poisson" if rate > 0 else "burst",
                            rate=rate if rate > 0 else None, seed=self.seed)
        config = self.model.config
        return make_requests(spec, self.tokenizer, config.vocab_size,
                             config.max_position_embeddings)

    def update(self) -> dict[str, EngineRun] | None:
        """Re-run both engines on the current workload, redraw, and return the two runs."""
        import matplotlib.pyplot as plt

        try:
            requests = self.requests()
            runs = run_strategies(self.model, requests, self.slots.value)
        except WorkbenchError as err:
            self.status.value = f"<span style='color:#b00'>{html.escape(str(err))}</span>"
            return None
        same = all(a.output_ids == b.output_ids
                   for a, b in zip(runs["static"].traces, runs["continuous"].traces))
        lengths = ", ".join(str(r.max_new_tokens) for r in requests)
        parts = []
        for name, run in runs.items():
            stats = summarize(run.traces, run.seconds)
            parts.append(f"<b>{name}</b>: {len(run.timeline)} steps, slot utilization "
                         f"{run.utilization:.0%}, {run.seconds:.2f} s, "
                         f"{stats['output_tok_s']:.0f} useful tok/s, median TTFT "
                         f"{stats['median_ttft_ms']:.0f} ms")
        self.status.value = (f"output lengths: {lengths}<br>" + "<br>".join(parts)
                             + f"<br>same tokens under both: {same}")
        self.output.clear_output(wait=True)
        with self.output:
            fig = plot_strategies(runs)
            plt.show()
            plt.close(fig)
        return runs

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def batching_explorer(model: LlamaModel, tokenizer: Any = None, **knobs: Any) -> BatchingExplorer:
    """A :class:`BatchingExplorer`, run and drawn once now (so a static view shows a result)."""
    explorer = BatchingExplorer(model, tokenizer, **knobs)
    explorer.update()
    return explorer
