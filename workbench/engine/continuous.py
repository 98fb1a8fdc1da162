"""Continuous batching: one packed forward pass per step over whatever the scheduler picked.

    step():
        scheduled = scheduler.schedule()        # decodes of running sequences, new prefills
        batch = pack(scheduled)                 # one row [1, N]: ids, positions, slots, lengths
        logits = model(batch, kv)               # only where a sequence's next token is due
        tokens = sample(logits)                 # each request from its own seeded stream
        append tokens; finish on EOS or max_new_tokens; a finished sequence frees its slot

New requests join the running batch at any step and finished ones leave at once, so no slot idles
while requests wait (Orca's iteration-level scheduling; vLLM's engine loop). Taught in notebook 02.
"""

from __future__ import annotations

from collections import deque

import torch

from workbench.engine.requests import Request, RequestTrace, reject_if_invalid
from workbench.engine.run import Clock, EngineRun
from workbench.engine.sampling import SamplingParams, sample
from workbench.engine.scheduler import EngineConfig, Scheduler, Sequence
from workbench.errors import WorkbenchError
from workbench.kv.slots import SlotKVCache
from workbench.model.batch import ForwardBatch, PackedLayout
from workbench.model.llama import LlamaModel


class ContinuousEngine:
    """Serve requests with iteration-level scheduling over a packed batch and slot KV storage."""

    def __init__(self, model: LlamaModel, config: EngineConfig = EngineConfig(),
                 sampling: SamplingParams = SamplingParams(),
                 eos_ids: tuple[int, ...] | None = None) -> None:
        context = model.config.max_position_embeddings
        self.max_len = min(config.max_model_len or context, context)
        self.model, self.config, self.sampling = model, config, sampling
        self.eos = set(model.config.eos_token_ids if eos_ids is None else eos_ids)
        self.kv = SlotKVCache(model.config, config.max_num_seqs, self.max_len, model.device,
                              model.dtype)
        self.scheduler = Scheduler(config)
        self.sequences: dict[int, Sequence] = {}
        self.timeline: list[list[int | None]] = []
        self.num_finished = 0  # requests done for any reason (progress bars read it)

    def add_request(self, request: Request, now: float = 0.0) -> RequestTrace:
        """Queue a request; one that can never run is rejected here, alone."""
        if request.id in self.sequences:
            raise WorkbenchError(f"duplicate request id {request.id}")
        trace = RequestTrace(request.id, request.arrival_s, len(request.prompt_ids))
        seq = Sequence(request, trace, self.sampling.generator(request.id),
                       tokens=list(request.prompt_ids))
        self.sequences[request.id] = seq
        too_long = (not self.config.chunked_prefill
                    and seq.prompt_len > self.config.max_num_batched_tokens)
        if reject_if_invalid(self.model.config, request, trace, self.max_len, now):
            self.num_finished += 1
        elif too_long:
            trace.finish_reason, trace.finish_s = "rejected", now
            trace.error = (f"request {request.id}: prompt of {seq.prompt_len} tokens exceeds "
                           f"max_num_batched_tokens ({self.config.max_num_batched_tokens}) and "
                           "chunked prefill is off")
            self.num_finished += 1
        elif request.max_new_tokens == 0:
            trace.finish_reason, trace.finish_s = "length", now
            self.num_finished += 1
        else:
            self.scheduler.add(seq)
        return trace

    def cancel(self, request_id: int, now: float = 0.0) -> None:
        """Stop a request wherever it is; its slot is free for the next step."""
        seq = self.sequences[request_id]
        if seq.trace.finish_reason is None:
            self._finish(seq, "cancelled", now)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    @torch.inference_mode()
    def step(self, clock: Clock) -> None:
        """Schedule, run one packed forward pass, sample, and update every scheduled sequence."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return
        batch, emitting = self._pack(scheduled)
        logits = self.model(batch, self.kv)  # [len(emitting), vocab]
        tokens = sample(logits, self.sampling, [s.generator for s in emitting])
        now = clock.now()
        row: list[int | None] = [None] * self.config.max_num_seqs
        for seq, n in scheduled:
            seq.num_cached += n
            row[seq.slot] = seq.request.id
            if seq.trace.scheduled_s is None:
                seq.trace.scheduled_s = now
        self.timeline.append(row)
        for seq, token in zip(emitting, tokens):
            self._append(seq, token, now)

    def _pack(self, scheduled: list[tuple[Sequence, int]]) -> tuple[ForwardBatch, list[Sequence]]:
        """The packed row [1, N] and the sequences whose next token this step produces."""
        ids, positions, slot_mapping, logit_columns, emitting = [], [], [], [], []
        for seq, n in scheduled:
            start = seq.num_cached
            ids += seq.tokens[start:start + n]
            positions += range(start, start + n)
            slot_mapping += [seq.slot] * n
            if start + n == len(seq.tokens):  # all its tokens cached after this step
                logit_columns.append(len(ids) - 1)
                emitting.append(seq)
        slots = [s.slot for s, _ in scheduled]
        context_lens = [s.num_cached + n for s, n in scheduled]
        # one host-to-device copy per step, split on the device (each copy from pageable
        # memory makes the host wait for the GPU queue, so per-layer copies would serialise)
        sizes = [len(ids), len(ids), len(ids), len(logit_columns), len(slots), len(slots)]
        flat = torch.tensor(ids + positions + slot_mapping + logit_columns + slots + context_lens,
                            device=self.model.device)
        ids_t, pos_t, slot_map_t, logit_t, slots_t, ctx_t = flat.split(sizes)
        layout = PackedLayout(slots=slots, query_lens=[n for _, n in scheduled],
                              context_lens=context_lens,
                              num_decodes=sum(not s.prefilling for s, _ in scheduled),
                              slot_mapping=slot_map_t, slots_t=slots_t, context_lens_t=ctx_t)
        batch = ForwardBatch(input_ids=ids_t[None], positions=pos_t[None],  # [1, N] each
                             layout=layout, logits_indices=logit_t)
        return batch, emitting

    def _append(self, seq: Sequence, token: int, now: float) -> None:
        seq.tokens.append(token)
        seq.trace.output_ids.append(token)
        seq.trace.token_times.append(now)
        if token in self.eos and not seq.request.ignore_eos:
            self._finish(seq, "eos", now)
        elif len(seq.trace.output_ids) >= seq.request.max_new_tokens:
            self._finish(seq, "length", now)

    def _finish(self, seq: Sequence, reason: str, now: float) -> None:
        seq.trace.finish_reason, seq.trace.finish_s = reason, now
        self.scheduler.finish(seq)
        self.num_finished += 1


def run_continuous(model: LlamaModel, requests: list[Request],
                   config: EngineConfig = EngineConfig(),
                   sampling: SamplingParams = SamplingParams(),
                   eos_ids: tuple[int, ...] | None = None, progress: bool = False) -> EngineRun:
    """Serve ``requests`` as they arrive (``arrival_s``); traces come back in the order given."""
    from tqdm.auto import tqdm

    engine = ContinuousEngine(model, config, sampling, eos_ids)
    pending = deque(sorted(requests, key=lambda r: r.arrival_s))
    traces: dict[int, RequestTrace] = {}
    clock = Clock()
    bar = tqdm(total=len(requests), disable=not progress, desc="continuous", unit="req")
    while pending or engine.has_work():
        while pending and pending[0].arrival_s <= clock.now():
            request = pending.popleft()
            traces[request.id] = engine.add_request(request, clock.now())
        if not engine.has_work():
            if pending:
                clock.wait_until(pending[0].arrival_s)  # idle until the next arrival
            continue
        engine.step(clock)
        bar.update(engine.num_finished - bar.n)
    bar.close()
    return EngineRun(traces=[traces[r.id] for r in requests], timeline=engine.timeline,
                     seconds=clock.now())
