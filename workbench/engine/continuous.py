"""Continuous batching: one packed forward pass per step over whatever the scheduler picked.

    step():
        step = scheduler.schedule()             # decodes of running sequences, new prefills
        move KV blocks the scheduler asked for  # swaps and copy-on-write (paged storage only)
        batch = pack(step)                      # one row [1, N]: ids, positions, KV slots, lengths
        logits = model(batch, kv)               # only where a sequence's next token is due
        tokens = sample(logits)                 # each request from its own seeded stream
        append tokens; finish on EOS or max_new_tokens; a finished sequence frees its KV memory

New requests join the running batch at any step and finished ones leave at once, so no slot idles
while requests wait (Orca's iteration-level scheduling; vLLM's engine loop). Taught in notebook 02;
the paged storage (``EngineConfig(kv="paged")``) and its scheduler in notebook 03.
"""

from __future__ import annotations

from collections import deque

import torch

from workbench.engine.requests import Request, RequestTrace, reject_if_invalid
from workbench.engine.run import Clock, EngineRun
from workbench.engine.sampling import SamplingParams, sample
from workbench.engine.paged_scheduler import PagedScheduler
from workbench.engine.scheduler import EngineConfig, Scheduler, Sequence, Step
from workbench.errors import WorkbenchError
from workbench.kv.blocks import slot_mapping as paged_slots
from workbench.kv.paged import PagedKVCache
from workbench.kv.slots import SlotKVCache
from workbench.model.batch import ForwardBatch, PackedLayout
from workbench.model.llama import LlamaModel


class ContinuousEngine:
    """Serve requests with iteration-level scheduling over a packed batch.

    KV storage: one max-length slot per running sequence (``kv="contiguous"``) or blocks from a
    shared pool (``kv="paged"``). ``kv_history`` records, per step, the sequences running and the
    KV memory they hold against what is reserved; ``block_map`` (with ``record_blocks``) which
    request owns each block.
    """

    def __init__(self, model: LlamaModel, config: EngineConfig = EngineConfig(),
                 sampling: SamplingParams = SamplingParams(),
                 eos_ids: tuple[int, ...] | None = None, record_blocks: bool = False,
                 check_blocks: bool = False) -> None:
        context = model.config.max_position_embeddings
        self.max_len = min(config.max_model_len or context, context)
        self.model, self.config, self.sampling = model, config, sampling
        self.eos = set(model.config.eos_token_ids if eos_ids is None else eos_ids)
        if config.kv == "paged":
            per_seq = -(-self.max_len // config.block_size)
            self.num_blocks = config.num_blocks or config.max_num_seqs * per_seq
            # one more block than the scheduler hands out: padding rows of CUDA graphs write there
            self.kv = PagedKVCache(model.config, self.num_blocks + 1, config.block_size,
                                   model.device, model.dtype, config.num_cpu_blocks,
                                   layers=getattr(model, "kv_layers", None))  # a stage's (PP)
            self.scheduler: Scheduler = PagedScheduler(config, self.num_blocks)
        else:
            self.kv = SlotKVCache(model.config, config.max_num_seqs, self.max_len, model.device,
                                  model.dtype)
            self.scheduler = Scheduler(config)
        self.graphs = None
        if config.cuda_graphs and model.device.type == "cuda":
            from workbench.engine.cudagraph import DecodeGraphs

            self.graphs = DecodeGraphs(model, self.kv, config.max_num_seqs,
                                       -(-self.max_len // config.block_size), self.num_blocks,
                                       compile=config.compile)
        self.sequences: dict[int, Sequence] = {}
        self.timeline: list[list[int | None]] = []
        self.kv_history: list[dict] = []
        self.block_map: list[list[int]] | None = [] if record_blocks else None
        self.num_finished = 0  # requests done for any reason (progress bars read it)
        self.check_blocks = check_blocks and config.kv == "paged"  # tests: verify every step

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
        elif self.config.kv == "paged" and self._too_big(seq):
            trace.finish_reason, trace.finish_s = "rejected", now
            trace.error = (f"request {request.id}: {len(seq.tokens) + request.max_new_tokens} "
                           f"tokens need more than the {self.num_blocks} KV blocks of the pool")
            self.num_finished += 1
        elif request.max_new_tokens == 0:
            trace.finish_reason, trace.finish_s = "length", now
            self.num_finished += 1
        else:
            self.scheduler.add(seq)
        return trace

    def _too_big(self, seq: Sequence) -> bool:
        """A sequence that could not run even with the whole pool to itself."""
        longest = min(len(seq.tokens) + seq.request.max_new_tokens, self.max_len)
        return -(-longest // self.config.block_size) > self.num_blocks

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
        start = clock.now()
        step = self.scheduler.schedule()
        if self.check_blocks:
            self.scheduler.check(step)
        self._move_blocks(step)
        scheduled = step.scheduled
        if not scheduled:
            return
        emitting = [s for s, n in scheduled if s.num_cached + n == len(s.tokens)]
        if self.graphs is not None and not step.prefills and self.graphs.fits(len(scheduled)):
            logits = self.graphs.run(step.decodes)  # [len(emitting), vocab]
        else:
            logits = self.model(self._pack(step), self.kv)  # [len(emitting), vocab]
        launched = clock.now()  # the host has queued the whole step on the device
        tokens = sample(logits, self.sampling, [s.generator for s in emitting])
        now = clock.now()  # the device is done (the tokens are on the host)
        row: list[int | None] = [None] * self.config.max_num_seqs
        for seq, n in scheduled:
            seq.num_cached += n
            row[seq.slot] = seq.request.id
            if seq.trace.scheduled_s is None:
                seq.trace.scheduled_s = now
            if self.config.kv == "paged":
                self.scheduler.cached(seq)
        self.timeline.append(row)
        for seq, token in zip(emitting, tokens):
            self._append(seq, token, now)
        # host work: scheduling and packing before the launch, bookkeeping after the tokens
        self._record(step, now, host_s=(launched - start) + (clock.now() - now))

    def _move_blocks(self, step: Step) -> None:
        """Swaps and copy-on-write copies the scheduler decided, before the step writes."""
        if step.swap_out:
            self.kv.swap_out(*map(list, zip(*step.swap_out)))
        if step.swap_in:
            self.kv.swap_in(*map(list, zip(*step.swap_in)))
        for src, dst in step.copies:
            self.kv.copy_block(src, dst)

    def _pack(self, step: Step) -> ForwardBatch:
        """The packed row [1, N] of this step's tokens, and where their keys and values go."""
        scheduled, paged = step.scheduled, self.config.kv == "paged"
        bs = self.config.block_size
        ids, positions, slot_mapping, logit_columns = [], [], [], []
        for seq, n in scheduled:
            start = seq.num_cached
            ids += seq.tokens[start:start + n]
            positions += range(start, start + n)
            if paged:
                slot_mapping += paged_slots(seq.block_table, start, n, bs)
            else:
                slot_mapping += [seq.slot] * n
            if start + n == len(seq.tokens):  # all its tokens cached after this step
                logit_columns.append(len(ids) - 1)
        slots = [s.slot for s, _ in scheduled]
        context_lens = [s.num_cached + n for s, n in scheduled]
        tables, width = [], 0
        if paged:  # block tables, padded to the widest with the (never written) last block
            width = max(len(s.block_table) for s, _ in scheduled)
            for seq, _ in scheduled:
                tables += seq.block_table + [self.num_blocks] * (width - len(seq.block_table))
        # one host-to-device copy per step, split on the device (each copy from pageable
        # memory makes the host wait for the GPU queue, so per-layer copies would serialise)
        sizes = [len(ids), len(ids), len(ids), len(logit_columns), len(slots), len(slots),
                 len(tables)]
        flat = torch.tensor(ids + positions + slot_mapping + logit_columns + slots + context_lens
                            + tables, device=self.model.device)
        ids_t, pos_t, slot_map_t, logit_t, slots_t, ctx_t, tables_t = flat.split(sizes)
        nd = len(step.decodes)
        layout = PackedLayout(slots=slots, query_lens=[n for _, n in scheduled],
                              context_lens=context_lens, num_decodes=nd,
                              slot_mapping=slot_map_t, slots_t=slots_t, context_lens_t=ctx_t,
                              block_tables=tables_t.view(len(scheduled), width) if paged else None,
                              decode_blocks=-(-max(context_lens[:nd], default=0) // bs))
        return ForwardBatch(input_ids=ids_t[None], positions=pos_t[None],  # [1, N] each
                            layout=layout, logits_indices=logit_t)

    def _record(self, step: Step, now: float, host_s: float) -> None:
        """After a step: its shape and end time, KV tokens stored vs memory reserved, and (with
        ``record_blocks``) which request holds each block."""
        running = self.scheduler.running
        tokens = sum(s.num_cached for s in running)
        if self.config.kv == "paged":
            blocks = self.scheduler.blocks
            reserved = blocks.num_used * self.config.block_size
            capacity = self.num_blocks * self.config.block_size
        else:
            reserved = len(running) * self.max_len
            capacity = self.config.max_num_seqs * self.max_len
        self.kv_history.append({
            "t": now, "host_s": host_s, "decodes": len(step.decodes),
            "prefill_tokens": sum(n for _, n in step.prefills),
            "context": sum(s.num_cached for s, _ in step.scheduled),  # keys read by attention
            "running": len(running), "tokens": tokens, "reserved": reserved,
            "capacity": capacity, "preempted": len(step.preempted)})
        if self.block_map is not None and self.config.kv == "paged":
            owners = [-1] * self.num_blocks
            for seq in running:
                for block in seq.block_table:
                    owners[block] = seq.request.id
            self.block_map.append(owners)

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
                   eos_ids: tuple[int, ...] | None = None, progress: bool = False,
                   engine: ContinuousEngine | None = None) -> EngineRun:
    """Serve ``requests`` as they arrive (``arrival_s``); traces come back in the order given.

    Pass an ``engine`` to reuse one (its CUDA graphs, its prefix cache) or to read its records
    afterwards; it must be idle.
    """
    from tqdm.auto import tqdm

    engine = engine or ContinuousEngine(model, config, sampling, eos_ids)
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
