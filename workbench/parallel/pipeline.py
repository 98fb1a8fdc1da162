"""Pipeline parallelism: stages of consecutive layers, micro-batches, a GPipe fill-drain schedule.

Stage s owns layers ``stages[s]`` (:func:`~workbench.parallel.plan.balanced_stages`). A forward
pass over a batch of B rows splits it into m micro-batches of rows; each stage runs, for
j = 1..m: receive micro-batch j's hidden states from stage s-1 (the first stage embeds the
tokens instead), apply its layers, send the result to stage s+1 (the last stage applies the
norm and LM head instead). Stage s can start micro-batch j only once stage s-1 finished it, so
the pipeline fills and drains (GPipe)::

    stage 0 | 1 2 3 4 . . .
    stage 1 | . 1 2 3 4 . .        p = 3 stages, m = 4 micro-batches:
    stage 2 | . . 1 2 3 4          (m + p - 1) slots of time, p * m of them busy

(:func:`gpipe_timetable`: stage s runs micro-batch j in slot s + j, and each stage's forward pass
runs its row of that table) and with equal stage times the idle share, the *bubble*, is
``(p - 1) / (m + p - 1)``. Every stage records when it computed what (:class:`StageEvent`), so
:func:`measured_bubble` compares the measured bubble with the formula. Decode steps are
micro-batched the same way, each step a fill-drain of its own. Notebook 05 teaches it; lab 05
(``labs/solutions/lab05_pipeline.ipynb``) has the student write the timetable and the bubble.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from workbench.kv.base import KVCache
from workbench.kv.contiguous import ContiguousKVCache
from workbench.model.batch import ForwardBatch
from workbench.model.llama import LlamaModel
from workbench.parallel.plan import Mesh
from workbench.plug import pluggable

__all__ = ["StageEvent", "StageProgram", "bubble_formula", "gpipe_timetable", "idle_share",
           "measured_bubble", "now", "one_pass_items", "pipeline_forward", "replay_fill_drain",
           "replay_timetable", "run_bubble", "run_stage", "schedule_bubble", "split_rows",
           "stage_programs", "timetable_events"]


@dataclass(frozen=True)
class StageEvent:
    """Stage ``stage`` computed micro-batch ``micro_batch`` of forward pass ``step`` from
    ``start`` to ``end`` (seconds of ``time.perf_counter``, one clock for the whole host)."""

    stage: int
    step: int
    micro_batch: int
    start: float
    end: float
    kind: str = "decode"  # "prefill" or "decode"


@pluggable("pipeline.timetable")
def gpipe_timetable(p: int, m: int) -> list[list[tuple[int, int]]]:
    """GPipe's forward fill-drain for ``p`` stages and ``m`` micro-batches: ``m + p - 1`` time
    slots, slot t listing the (stage, micro-batch) pairs that run in it, by stage. Stage s runs
    micro-batch j in slot ``s + j``: it must wait for stage s - 1 to finish j, and runs one
    micro-batch at a time."""
    return [[(s, t - s) for s in range(p) if 0 <= t - s < m] for t in range(m + p - 1)]


def timetable_events(table: list[list[tuple[int, int]]], slot_s: float = 1.0) -> list[StageEvent]:
    """A timetable as :class:`StageEvent` s of ``slot_s`` seconds each (for the timeline figure)."""
    return [StageEvent(stage, 0, j, t * slot_s, (t + 1) * slot_s)
            for t, slot in enumerate(table) for stage, j in slot]


def bubble_formula(p: int, m: int) -> float:
    """GPipe's idle share with equal stages: ``(p - 1) / (m + p - 1)``."""
    return (p - 1) / (m + p - 1)


@pluggable("pipeline.bubble")
def measured_bubble(events: list[StageEvent], p: int) -> float:
    """Idle share of the p stages over each pass: ``1 - busy / (p * span)``, summed over passes.

    A pass's span runs from its first stage's first start to its last stage's last end.
    """
    return idle_share(events, p)


def idle_share(events: list[StageEvent], p: int) -> float:
    """:func:`measured_bubble`'s sum, which the replayed timetables use too (not a plug-in point:
    a lab's own ``measured_bubble`` changes what is measured, not the timetables)."""
    busy = span = 0.0
    for step in sorted({e.step for e in events}):
        mine = [e for e in events if e.step == step]
        span += max(e.end for e in mine) - min(e.start for e in mine)
        busy += sum(e.end - e.start for e in mine)
    return 1.0 - busy / (p * span) if span > 0 else 0.0


def run_bubble(events: list[StageEvent], p: int) -> float:
    """Idle share of the p stages from the first start to the last end of all ``events``: unlike
    :func:`measured_bubble` (each pass on its own, as the formula counts), it also counts the time
    between passes - in decode, the greedy tokens' way back from the last stage to the first and
    the next step's set-up - as idle. Comparable with the bubble of micro-batches in flight
    (:func:`~workbench.parallel.in_flight.decode_in_flight` runs its steps as one pass)."""
    span = max(e.end for e in events) - min(e.start for e in events) if events else 0.0
    return 1.0 - sum(e.end - e.start for e in events) / (p * span) if span > 0 else 0.0


def replay_timetable(items: dict[tuple[int, int], StageEvent], p: int,
                     back: Callable[[int], int]) -> list[StageEvent]:
    """Items ``(stage, k)`` of one pass replayed in the order of k with their *measured* compute
    times and hand-overs that cost nothing: stage s starts k once it finished k - 1 and stage s - 1
    finished k; stage 0 also once the last stage finished item ``back(k)`` (none if negative).
    Returns the events with their replayed start and end, from time 0."""
    n = 1 + max(k for _, k in items)
    finish: dict[tuple[int, int], float] = {}
    out: list[StageEvent] = []
    for k in range(n):
        for s in range(p):
            start = max(finish.get((s, k - 1), 0.0), finish.get((s - 1, k), 0.0))
            if s == 0:
                start = max(start, finish.get((p - 1, back(k)), 0.0))
            e = items.get((s, k))
            finish[(s, k)] = start + (e.end - e.start if e else 0.0)
            if e:
                out.append(replace(e, start=start, end=finish[(s, k)]))
    return out


def one_pass_items(events: list[StageEvent]) -> tuple[int, dict[tuple[int, int], StageEvent]]:
    """Fill-drain steps' events keyed as the items ``k = t m + j`` of one pass (step t in order,
    micro-batch j of m): ``(m, {(stage, k): event})``."""
    m = 1 + max(e.micro_batch for e in events)
    order = {t: i for i, t in enumerate(sorted({e.step for e in events}))}
    return m, {(e.stage, order[e.step] * m + e.micro_batch): e for e in events}


def replay_fill_drain(events: list[StageEvent], p: int) -> list[StageEvent]:
    """Each fill-drain pass of ``events`` replayed on GPipe's timetable (:func:`replay_timetable`:
    a pass's first micro-batch enters stage 0 once the last stage finished the pass before), the
    passes back to back from time 0: the timeline behind :func:`schedule_bubble` (notebook 05
    draws it)."""
    m, items = one_pass_items(events)
    return replay_timetable(items, p, lambda k: k - 1 if k % m == 0 else -1)


def schedule_bubble(events: list[StageEvent], p: int) -> float:
    """The bubble of GPipe's fill-drain with the *measured* compute time of every (stage,
    micro-batch) and hand-overs that cost nothing (:func:`replay_fill_drain`), the idle share
    summed over passes as in :func:`measured_bubble`.

    It splits the gap between the measured bubble and ``(p - 1) / (m + p - 1)`` in two: from the
    formula to this, unequal stages and micro-batches; from this to the measured bubble, what the
    hand-overs (send/recv and the waits they cause) cost. The measured bubble is never below it.
    """
    return idle_share(replay_fill_drain(events, p), p)


def split_rows(batch: ForwardBatch, m: int) -> list[tuple[slice, ForwardBatch]]:
    """Up to ``m`` micro-batches of consecutive rows (a packed batch, one row, stays whole)."""
    B = batch.input_ids.shape[0]
    if batch.layout is not None or m <= 1 or B == 1:
        return [(slice(0, B), batch)]
    bounds = torch.linspace(0, B, min(m, B) + 1).round().long().tolist()
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        rows = slice(a, b)
        parts.append((rows, ForwardBatch(
            input_ids=batch.input_ids[rows], positions=batch.positions[rows],  # [b, T] each
            mask=None if batch.mask is None else batch.mask[rows],  # [b, 1, T, S]
            kv_start=batch.kv_start)))
    return parts


class RowSliceKV(KVCache):
    """Rows ``rows`` of a :class:`ContiguousKVCache`: one micro-batch writes and reads its own
    rows in place; the parent advances once, after every micro-batch ran."""

    def __init__(self, parent: ContiguousKVCache, rows: slice) -> None:
        self.parent, self.rows = parent, rows

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = batch.kv_start, batch.kv_start + k.shape[2]
        keys, values = self.parent.k[layer][self.rows], self.parent.v[layer][self.rows]  # views
        keys[:, :, start:end], values[:, :, start:end] = k, v  # k, v: [b, Hkv, T, d]
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, batch: ForwardBatch) -> None:
        """The parent cache advances for the whole batch."""

    def nbytes(self) -> int:
        return 0


def now(device: torch.device) -> float:
    """``time.perf_counter`` once the work queued on the device's current stream is done (an
    event's clock). Only that stream: a send still in flight on a communication stream does not
    delay the clock, a receive the stream waits on does."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # the work is done when the clock is read
    return time.perf_counter()


@dataclass
class StageProgram:
    """This stage's work on micro-batch ``micro_batch`` (rows ``rows`` of the batch): ``run()``
    returns the hidden states to send on, or the logits on the last stage. ``inbox`` is the
    buffer the previous stage's hidden states are received into (None on the first stage, which
    embeds the tokens). ``run`` may be replaced by a CUDA graph's replay that reads ``inbox`` and
    rewrites the tensor it returns (:func:`workbench.parallel.replay.pipeline_graph_step`)."""

    micro_batch: int
    rows: slice
    inbox: torch.Tensor | None
    run: Callable[[], torch.Tensor]


def stage_programs(model: LlamaModel, mesh: Mesh, batch: ForwardBatch, kv: KVCache | None,
                   micro_batches: int, hidden: int, device: torch.device, dtype: torch.dtype,
                   last_only: bool = False) -> list[StageProgram]:
    """This stage's row of the GPipe timetable for ``batch``: one program per micro-batch, in
    the order the stage runs them."""
    parts = split_rows(batch, micro_batches)
    order = [j for slot in gpipe_timetable(mesh.pp, len(parts)) for s, j in slot if s == mesh.stage]
    programs = []
    for j in order:
        rows, mb = parts[j]
        B, T = mb.input_ids.shape
        inbox = None if mesh.first else torch.empty(B, T, hidden, device=device, dtype=dtype)
        sub_kv = kv if kv is None or len(parts) == 1 else RowSliceKV(kv, rows)

        def run(mb=mb, inbox=inbox, sub_kv=sub_kv) -> torch.Tensor:
            x = model.embed(mb) if inbox is None else inbox  # [b, T, hidden]
            x = model.run_layers(x, mb, sub_kv, mesh.layers)
            return model.head(x, last_only, mb.logits_indices) if mesh.last else x.contiguous()
        programs.append(StageProgram(j, rows, inbox, run))
    return programs


def run_stage(mesh: Mesh, programs: list[StageProgram], device: torch.device, step: int = 0,
              kind: str = "decode", events: list[StageEvent] | None = None) -> torch.Tensor | None:
    """Run this stage's programs in order: receive each micro-batch's input (blocking ``recv``),
    run it, send the result on with ``isend`` (the stage moves on to its next micro-batch); the
    logits of every row on the last stage, else None."""
    clock = (lambda: now(device)) if events is not None else (lambda: 0.0)  # noqa: E731
    outputs, pending = [], []
    for prog in programs:
        if prog.inbox is not None:
            dist.recv(prog.inbox, src=mesh.prev_rank)
        t0 = clock()
        out = prog.run()
        if events is not None:
            events.append(StageEvent(mesh.stage, step, prog.micro_batch, t0, clock(), kind))
        if mesh.last:
            outputs.append(out)
        else:
            pending.append((dist.isend(out, dst=mesh.next_rank), out))  # keep out alive until sent
    for work, _ in pending:
        work.wait()
    return torch.cat(outputs) if mesh.last else None


def pipeline_forward(model: LlamaModel, mesh: Mesh, batch: ForwardBatch, kv: KVCache | None,
                     micro_batches: int, hidden: int, device: torch.device, dtype: torch.dtype,
                     last_only: bool = False, step: int = 0, kind: str = "decode",
                     events: list[StageEvent] | None = None) -> torch.Tensor | None:
    """This stage's part of one GPipe forward pass (:func:`stage_programs` run by
    :func:`run_stage`); the logits on the last stage, else None."""
    programs = stage_programs(model, mesh, batch, kv, micro_batches, hidden, device, dtype,
                              last_only)
    logits = run_stage(mesh, programs, device, step, kind, events)
    if kv is not None:
        kv.advance(batch)
    return logits

