"""Static batching: fixed batches of left-padded prompts, each run until its longest member ends.

    for each batch of B requests (in arrival order; it starts once its last member has arrived):
        left-pad to the longest prompt, prefill all rows in one forward pass
        repeat: sample one token per row, feed it back (one decode step for the whole batch)
        until every row has hit EOS or its max_new_tokens

A row that finished early still occupies its slot until the batch ends: that idle slot-step is the
waste continuous batching removes (notebook 02). Every step is recorded for the timeline figures.
"""

from __future__ import annotations

import torch

from workbench.attention.masks import padded_causal_mask
from workbench.engine.requests import (Request, RequestTrace, check_request,
                                       per_request_limits, reject_if_invalid)
from workbench.engine.run import Clock, EngineRun
from workbench.engine.sampling import SamplingParams, sample
from workbench.errors import WorkbenchError
from workbench.kv.contiguous import ContiguousKVCache
from workbench.model.batch import ForwardBatch
from workbench.model.llama import LlamaModel


def generate_static(model: LlamaModel, prompts: list[list[int]], max_new_tokens: int | list[int],
                    batch_size: int = 8, sampling: SamplingParams = SamplingParams(),
                    eos_ids: tuple[int, ...] | None = None, progress: bool = False) -> EngineRun:
    """Generate for every prompt (token ids), all arrived at t=0, in padded batches, in order."""
    limits = per_request_limits(max_new_tokens, len(prompts))
    requests = [Request(tuple(p), n, id=i) for i, (p, n) in enumerate(zip(prompts, limits))]
    for r in requests:
        check_request(model.config, list(r.prompt_ids), r.max_new_tokens, f"request {r.id}")
    return run_static(model, requests, batch_size, sampling, eos_ids, progress)


@torch.inference_mode()
def run_static(model: LlamaModel, requests: list[Request], batch_size: int = 8,
               sampling: SamplingParams = SamplingParams(),
               eos_ids: tuple[int, ...] | None = None, progress: bool = False) -> EngineRun:
    """Serve ``requests`` with static batching; traces come back in the order given."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise WorkbenchError(f"batch_size must be >= 1, got {batch_size}")
    eos = set(model.config.eos_token_ids if eos_ids is None else eos_ids)
    traces = {r.id: RequestTrace(r.id, r.arrival_s, len(r.prompt_ids)) for r in requests}
    run = EngineRun(traces=[traces[r.id] for r in requests])
    clock = Clock()
    order = sorted((r for r in requests if not reject_if_invalid(model.config, r, traces[r.id])),
                   key=lambda r: r.arrival_s)
    bar = tqdm(total=len(requests), disable=not progress, desc="static", unit="req")
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        clock.wait_until(max(r.arrival_s for r in batch))  # a static batch waits to be full
        _run_batch(model, batch, traces, sampling, eos, run, clock)
        bar.update(len(batch))
    bar.close()
    run.seconds = clock.now()
    return run


def _run_batch(model: LlamaModel, requests: list[Request], traces: dict[int, RequestTrace],
               sampling: SamplingParams, eos: set[int], run: EngineRun, clock: Clock) -> None:
    """One static batch: prefill the padded prompts, then decode until every row is done."""
    device, B = model.device, len(requests)
    prompts = [list(r.prompt_ids) for r in requests]
    P, steps = max(map(len, prompts)), max(r.max_new_tokens for r in requests)
    pad = next(iter(eos), 0)
    input_ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts], device=device)  # [B, P]
    valid = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts],
                         device=device)  # [B, P]
    positions = (valid.cumsum(1) - 1).clamp(min=0)  # [B, P]: a row's first real token is at 0
    kv = ContiguousKVCache(model.config, B, P + steps, device, model.dtype)
    batch = ForwardBatch(input_ids, positions, padded_causal_mask(valid, P))
    generators = [sampling.generator(r.id) for r in requests]
    done = [r.max_new_tokens == 0 for r in requests]
    for r in requests:
        traces[r.id].scheduled_s = clock.now()
        if r.max_new_tokens == 0:
            traces[r.id].finish_reason, traces[r.id].finish_s = "length", clock.now()
    for _ in range(steps):
        if all(done):
            break
        logits = model(batch, kv, last_only=True)  # [B, vocab]
        tokens = sample(logits, sampling, generators)
        now = clock.now()
        run.timeline.append([None if done[i] else r.id for i, r in enumerate(requests)])
        for i, (r, token) in enumerate(zip(requests, tokens)):
            if done[i]:
                continue  # idle slot: the token is computed and thrown away
            trace = traces[r.id]
            trace.output_ids.append(token)
            trace.token_times.append(now)
            if token in eos and not r.ignore_eos:
                trace.finish_reason, done[i] = "eos", True
            elif len(trace.output_ids) >= r.max_new_tokens:
                trace.finish_reason, done[i] = "length", True
            if done[i]:
                trace.finish_s = now
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        batch = ForwardBatch(input_ids=torch.tensor(tokens, device=device)[:, None],  # [B, 1]
                             positions=batch.positions[:, -1:] + 1,
                             mask=valid[:, None, None, :],  # [B, 1, 1, S]: every real key
                             kv_start=kv.length)
