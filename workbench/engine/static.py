"""Static batching: fixed batches of left-padded prompts, each run until its longest member ends.

    for each batch of B prompts:
        left-pad to the longest prompt, prefill all rows in one forward pass
        repeat: sample one token per row, feed it back (one decode step for the whole batch)
        until every row has hit EOS or its max_new_tokens

A row that finished early still occupies its slot until the batch ends: that idle slot-step is the
waste continuous batching removes (notebook 02). Every step is recorded for the timeline figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from workbench.attention.masks import padded_causal_mask
from workbench.engine.requests import check_request, per_request_limits
from workbench.engine.sampling import SamplingParams, sample
from workbench.errors import WorkbenchError
from workbench.kv.contiguous import ContiguousKVCache
from workbench.model.batch import ForwardBatch
from workbench.model.llama import LlamaModel


@dataclass
class GenerationOutput:
    output_ids: list[int]  # generated tokens only, the EOS that ended them included
    finish_reason: str  # "eos" or "length"


@dataclass
class StaticRun:
    outputs: list[GenerationOutput]
    # one entry per decode-or-prefill step: (batch index, step, request ids still generating)
    steps: list[tuple[int, int, list[int]]] = field(default_factory=list)
    slot_steps: int = 0  # batch slots x steps, busy or not
    seconds: float = 0.0

    @property
    def busy_slot_steps(self) -> int:
        return sum(len(active) for _, _, active in self.steps)

    @property
    def utilization(self) -> float:
        """Fraction of slot-steps that produced a token for a live request."""
        return self.busy_slot_steps / max(1, self.slot_steps)


@torch.inference_mode()
def generate_static(model: LlamaModel, prompts: list[list[int]], max_new_tokens: int | list[int],
                    batch_size: int = 8, sampling: SamplingParams = SamplingParams(),
                    eos_ids: tuple[int, ...] | None = None, progress: bool = False) -> StaticRun:
    """Generate for every prompt (token ids) in padded batches of ``batch_size``, in order."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise WorkbenchError(f"batch_size must be >= 1, got {batch_size}")
    limits = per_request_limits(max_new_tokens, len(prompts))
    for i, (ids, limit) in enumerate(zip(prompts, limits)):
        check_request(model.config, ids, limit, where=f"request {i}")
    eos = set(model.config.eos_token_ids if eos_ids is None else eos_ids)
    run = StaticRun(outputs=[GenerationOutput([], "length") for _ in prompts])
    start = time.perf_counter()
    batches = range(0, len(prompts), batch_size)
    for b, first in enumerate(tqdm(batches, disable=not progress, desc="static batches")):
        ids = list(range(first, min(first + batch_size, len(prompts))))
        _run_batch(model, [prompts[i] for i in ids], [limits[i] for i in ids], ids, sampling,
                   eos, run, b)
    run.seconds = time.perf_counter() - start
    return run


def _run_batch(model: LlamaModel, prompts: list[list[int]], limits: list[int], ids: list[int],
               sampling: SamplingParams, eos: set[int], run: StaticRun, b: int) -> None:
    """One static batch: prefill the padded prompts, then decode until every row is done."""
    device, B = model.device, len(prompts)
    P, steps = max(map(len, prompts)), max(limits)
    pad = next(iter(eos), 0)
    input_ids = torch.tensor([[pad] * (P - len(p)) + p for p in prompts], device=device)  # [B, P]
    valid = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts],
                         device=device)  # [B, P]
    positions = (valid.cumsum(1) - 1).clamp(min=0)  # [B, P]: a row's first real token is at 0
    kv = ContiguousKVCache(model.config, B, P + steps, device, model.dtype)
    batch = ForwardBatch(input_ids, positions, padded_causal_mask(valid, P))
    generators = [sampling.generator(i) for i in ids]
    done = [limit == 0 for limit in limits]
    for step in range(steps):
        if all(done):
            break
        logits = model(batch, kv, last_only=True)  # [B, vocab]
        tokens = sample(logits, sampling, generators)
        run.steps.append((b, step, [ids[r] for r in range(B) if not done[r]]))
        run.slot_steps += B
        for r, token in enumerate(tokens):
            if done[r]:
                continue  # idle slot: the token is computed and thrown away
            out = run.outputs[ids[r]]
            out.output_ids.append(token)
            if token in eos:
                out.finish_reason, done[r] = "eos", True
            elif len(out.output_ids) >= limits[r]:
                done[r] = True
        valid = torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        batch = ForwardBatch(input_ids=torch.tensor(tokens, device=device)[:, None],  # [B, 1]
                             positions=batch.positions[:, -1:] + 1,
                             mask=valid[:, None, None, :],  # [B, 1, 1, S]: every real key
                             kv_start=kv.length)
