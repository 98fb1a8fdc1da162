"""Iteration-level scheduling (Orca, vLLM): which tokens of which sequences run in the next step.

Every step the scheduler rebuilds the batch from scratch:

1. each running sequence that is decoding contributes its one newest token;
2. a running sequence still in its (chunked) prefill contributes its next chunk;
3. waiting requests are admitted, first come first served, while a KV slot is free, fewer than
   ``max_num_seqs`` run, and the step's token budget ``max_num_batched_tokens`` is not spent
   (:func:`admit`, the plug-in point of lab 02).

So a finished sequence's slot is refilled at the very next step, instead of idling until the whole
batch ends as in static batching. Taught in notebook 02.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import islice

import torch

from workbench.engine.requests import Request, RequestTrace
from workbench.errors import WorkbenchError
from workbench.plug import pluggable


KV_LAYOUTS = ("contiguous", "paged")
PREEMPTION_MODES = ("recompute", "swap")


@dataclass(frozen=True)
class EngineConfig:
    """Limits of the continuous-batching engine (names as in vLLM).

    ``kv="contiguous"`` reserves ``max_model_len`` tokens of KV memory per running sequence (one
    slot each); ``kv="paged"`` hands out ``block_size``-token blocks from a pool of ``num_blocks``
    as sequences grow (None: enough for ``max_num_seqs`` full-length sequences), preempting by
    ``preemption`` when the pool runs dry (``swap`` keeps up to ``num_cpu_blocks`` blocks in CPU
    memory), optionally sharing prompt blocks through the prefix cache. ``cuda_graphs`` replays
    decode steps from captured CUDA graphs (GPU, paged only), ``compile`` with fused weights and
    ``torch.compile``'d elementwise work inside them (:mod:`workbench.engine.fastpath`).
    """

    max_num_seqs: int = 16  # sequences running at once (= KV slots when contiguous)
    max_num_batched_tokens: int = 512  # tokens in one forward pass (prefill chunks + decodes)
    max_model_len: int | None = None  # KV room per sequence; None = the model's context
    chunked_prefill: bool = False  # split long prompts over several steps
    kv: str = "contiguous"  # "contiguous" | "paged"
    block_size: int = 16  # tokens per KV block (paged)
    num_blocks: int | None = None  # blocks in the device pool (paged)
    preemption: str = "recompute"  # "recompute" | "swap" (paged)
    num_cpu_blocks: int = 0  # CPU blocks for swapping (paged)
    prefix_caching: bool = False  # share full prompt blocks between requests (paged)
    cuda_graphs: bool = False  # replay decode steps from CUDA graphs (paged, GPU)
    compile: bool = False  # inside the graphs: fused weights, torch.compile'd glue

    def __post_init__(self) -> None:
        if self.kv not in KV_LAYOUTS:
            raise WorkbenchError(f"kv must be one of {', '.join(KV_LAYOUTS)}, got {self.kv!r}")
        if self.preemption not in PREEMPTION_MODES:
            raise WorkbenchError(f"preemption must be one of {', '.join(PREEMPTION_MODES)}, "
                                 f"got {self.preemption!r}")
        for name in ("block_size", "num_blocks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise WorkbenchError(f"{name} must be >= 1, got {value}")
        if self.num_cpu_blocks < 0:
            raise WorkbenchError(f"num_cpu_blocks must be >= 0, got {self.num_cpu_blocks}")
        if self.kv == "contiguous" and (self.prefix_caching or self.cuda_graphs
                                        or self.num_blocks is not None):
            raise WorkbenchError("prefix_caching, cuda_graphs and num_blocks need kv='paged'")
        if self.compile and not self.cuda_graphs:
            raise WorkbenchError("compile is the fast path inside CUDA graphs: set cuda_graphs")
        if self.max_num_seqs < 1:
            raise WorkbenchError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise WorkbenchError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must "
                                 f"be >= max_num_seqs ({self.max_num_seqs}): every running "
                                 "sequence needs one token per step")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise WorkbenchError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(eq=False)
class Sequence:
    """A request while the engine serves it: its tokens so far and where its KV lives."""

    request: Request
    trace: RequestTrace
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)  # prompt, then generated tokens
    slot: int | None = None  # KV slot (contiguous) or timeline lane (paged)
    num_cached: int = 0  # leading tokens whose keys/values are stored
    block_table: list[int] = field(default_factory=list)  # paged: its blocks in token order
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache names of full blocks
    cpu_blocks: list[int] = field(default_factory=list)  # paged: where it is while swapped out
    num_preemptions: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def prefilling(self) -> bool:
        """More than the newest token still to compute: a prompt, or a recompute after
        preemption (a decoding sequence has all but its newest token cached)."""
        return self.num_cached < len(self.tokens) - 1 or not self.trace.output_ids


@dataclass
class Step:
    """What the scheduler picked for one step, and the KV blocks to move before it runs."""

    decodes: list[Sequence] = field(default_factory=list)  # one new token each
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens)
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, CPU block)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (CPU block, device block)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def scheduled(self) -> list[tuple[Sequence, int]]:
        """(sequence, new tokens) pairs in packing order: decodes first, then prefills."""
        return [(s, 1) for s in self.decodes] + self.prefills


@pluggable("batching.admit")  # lab 02: a student's admission step can run in the engine
def admit(prompt_lens: list[int], free_slots: int, token_budget: int,
          chunked_prefill: bool = False) -> list[int]:
    """The admission step: how many prompt tokens each waiting request prefills this step.

    ``prompt_lens`` are the waiting requests' prompt lengths, oldest first; ``free_slots`` the KV
    slots free (``max_num_seqs`` minus the running sequences); ``token_budget`` what is left of
    ``max_num_batched_tokens`` after this step's decodes and chunks under way. Requests join first
    come, first served, each taking a slot and ``min(prompt_len, budget left)`` tokens, while a
    slot is free and the budget is positive. Without chunked prefill a prompt must fit whole:
    the first one that does not stops admission (no overtaking, so it cannot starve). Returns the
    token counts of the admitted requests, which are the first ``len(result)`` of the queue.
    Taught in notebook 02 (continuous batching).
    """
    chunks: list[int] = []
    for prompt_len in prompt_lens:
        if len(chunks) == free_slots or token_budget <= 0:
            break
        if prompt_len > token_budget and not chunked_prefill:
            break  # first come, first served: wait for a step with room for the whole prompt
        chunks.append(min(prompt_len, token_budget))
        token_budget -= chunks[-1]
    return chunks


class Scheduler:
    """Waiting queue, running set and free slots; ``schedule`` picks the next step's work."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.free_slots: list[int] = list(range(config.max_num_seqs - 1, -1, -1))

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Step:
        """This step's decodes of running sequences, then prefill chunks."""
        budget = self.config.max_num_batched_tokens
        decodes = [s for s in self.running if not s.prefilling]
        budget -= len(decodes)
        prefills = []
        for seq in self.running:  # chunked prefills already under way
            if seq.prefilling and budget > 0:
                n = min(seq.prompt_len - seq.num_cached, budget)
                prefills.append((seq, n))
                budget -= n
        # no more can join than there are free slots: look at that many waiting requests
        heads = [s.prompt_len for s in islice(self.waiting, len(self.free_slots))]
        for n in admit(heads, len(self.free_slots), budget, self.config.chunked_prefill):
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            self.running.append(seq)
            prefills.append((seq, n))
        return Step(decodes, prefills)

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out (finished or cancelled) and free its slot for the next request."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
        seq.slot = None
