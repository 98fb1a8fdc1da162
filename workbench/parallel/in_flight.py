"""Decode with the pipeline kept full across steps: micro-batches in flight (notebook 05 section 4).

A GPipe step (:func:`~workbench.parallel.pipeline.pipeline_forward`) fills and drains: no
micro-batch of step t + 1 starts before every micro-batch of step t has left the last stage. But
micro-batch j's next token depends only on its own previous one, so :func:`decode_in_flight` sends
it back into stage 0 as soon as its token returns from the last stage (point to point), while the
other micro-batches are still in the pipe - the way serving engines keep as many batches in flight
as there are stages (vLLM's virtual engines). Each stage runs the same programs as a GPipe step
(:func:`~workbench.parallel.pipeline.stage_programs`); only the order of hand-overs differs.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from workbench.kv.contiguous import ContiguousKVCache
from workbench.model.batch import ForwardBatch
from workbench.model.llama import LlamaModel
from workbench.parallel.pipeline import (StageEvent, idle_share, now, one_pass_items, replay_timetable,
                                         stage_programs)
from workbench.parallel.plan import Mesh

__all__ = ["as_one_pass", "bubble_formula_in_flight", "decode_in_flight", "replay_in_flight",
           "schedule_bubble_in_flight"]


def bubble_formula_in_flight(p: int, m: int, steps: int) -> float:
    """The idle share of :func:`decode_in_flight` with equal stages: micro-batch j's step t enters
    stage 0 once its step t - 1 left the last stage, ``p`` slots after it entered. With m >= p the
    stages never wait after the first fill, ``(p - 1) / (steps m + p - 1)``; with m < p every step
    waits for the round trip, ``1 - steps m / (steps p + m - 1)``."""
    return 1.0 - steps * m / (steps * max(m, p) + min(m, p) - 1)


def replay_in_flight(events: list[StageEvent], p: int, m: int) -> list[StageEvent]:
    """:func:`decode_in_flight`'s one pass (items ``k = t m + j``) replayed with the measured
    compute times and free hand-overs (:func:`~workbench.parallel.pipeline.replay_timetable`):
    stage 0 starts k once the last stage finished k - m, the token it embeds. The timeline behind
    :func:`schedule_bubble_in_flight` (notebook 05 draws it)."""
    return replay_timetable({(e.stage, e.micro_batch): e for e in events}, p, lambda k: k - m)


def schedule_bubble_in_flight(events: list[StageEvent], p: int, m: int) -> float:
    """:func:`~workbench.parallel.pipeline.schedule_bubble` for :func:`decode_in_flight`'s one
    pass (:func:`replay_in_flight`). Between :func:`bubble_formula_in_flight` and this: unequal
    stages; from this to the measured bubble: the hand-overs."""
    return idle_share(replay_in_flight(events, p, m), p)


def as_one_pass(events: list[StageEvent]) -> list[StageEvent]:
    """Fill-drain steps' events (step t, micro-batch j of m) renumbered as the items ``k = t m + j``
    of one in-flight pass, so that :func:`schedule_bubble_in_flight` replays the in-flight timetable
    with *the same* measured stage times as :func:`~workbench.parallel.pipeline.schedule_bubble`.
    The two timetables then differ only in their order: a comparison free of run-to-run noise."""
    return [replace(e, step=0, micro_batch=k) for (_, k), e in one_pass_items(events)[1].items()]


def decode_in_flight(model: LlamaModel, mesh: Mesh, tokens: torch.Tensor, kv: ContiguousKVCache,
                     start: int, steps: int, micro_batches: int, hidden: int, device: torch.device,
                     dtype: torch.dtype, events: list[StageEvent] | None = None
                     ) -> torch.Tensor | None:
    """Greedy decode of ``steps`` tokens for every row, micro-batches in flight across steps.

    ``tokens`` [B] is every row's last token at position ``start - 1`` (the prompt is in ``kv``,
    positions ``0 .. start - 1``); returns the new tokens [B, steps] on the first and the last
    stage, None on the others. With m >= p micro-batches the stages stay busy after the first fill
    (:func:`bubble_formula_in_flight`). Events record (step 0, micro-batch t m + j): one pass.
    """
    B = tokens.shape[0]
    first_rank, last_rank = mesh.rank_of(0, mesh.tp_rank), mesh.rank_of(mesh.pp - 1, mesh.tp_rank)
    back_here = mesh.first and not mesh.last  # stage 0 receives the tokens
    clock = (lambda: now(device)) if events is not None else (lambda: 0.0)  # noqa: E731
    current = tokens.clone()  # [B]: the tokens stage 0 embeds next (its programs read this)
    out = torch.empty(B, steps, dtype=torch.long, device=device)
    pending = []

    def token_back(rows: slice, t: int) -> None:  # micro-batch ``rows``'s token of step t
        back = torch.empty(rows.stop - rows.start, dtype=torch.long, device=device)
        dist.recv(back, src=last_rank, group=mesh.back_group)
        current[rows], out[rows, t] = back, back

    for t in range(steps):
        pos = start + t
        batch = ForwardBatch(input_ids=current[:, None], kv_start=pos,  # [B, 1], a view of current
                             positions=torch.full((B, 1), pos, device=device))
        programs = stage_programs(model, mesh, batch, kv, micro_batches, hidden, device, dtype,
                                  last_only=True)
        for prog in programs:
            if back_here and t > 0:
                token_back(prog.rows, t - 1)
            if prog.inbox is not None:
                dist.recv(prog.inbox, src=mesh.prev_rank)
            t0 = clock()
            y = prog.run()  # logits [b, vocab] on the last stage, else hidden states
            if mesh.last:
                y = y.argmax(-1)  # [b]
                current[prog.rows], out[prog.rows, t] = y, y
            if events is not None:
                events.append(StageEvent(mesh.stage, 0, t * len(programs) + prog.micro_batch, t0,
                                         clock()))
            if not mesh.last:  # the next stage
                pending.append((dist.isend(y, dst=mesh.next_rank), y))
            elif not mesh.first:  # stage 0 (the token), on the tokens' own group
                pending.append((dist.isend(y, dst=first_rank, group=mesh.back_group), y))
    if back_here:  # the last step's tokens
        for prog in programs:
            token_back(prog.rows, steps - 1)
    for work, _ in pending:
        work.wait()
    kv.length = start + steps
    return out if mesh.first or mesh.last else None
