"""Iteration-level scheduling (Orca, vLLM): which tokens of which sequences run in the next step.

Every step the scheduler rebuilds the batch from scratch:

1. each running sequence that is decoding contributes its one newest token;
2. a running sequence still in its (chunked) prefill contributes its next chunk;
3. waiting requests are admitted, first come first served, while a KV slot is free, fewer than
   ``max_num_seqs`` run, and the step's token budget ``max_num_batched_tokens`` is not spent.

So a finished sequence's slot is refilled at the very next step, instead of idling until the whole
batch ends as in static batching. Taught in notebook 02.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from workbench.engine.requests import Request, RequestTrace
from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class EngineConfig:
    """Limits of the continuous-batching engine (names as in vLLM)."""

    max_num_seqs: int = 16  # sequences running at once = KV slots
    max_num_batched_tokens: int = 512  # tokens in one forward pass (prefill chunks + decodes)
    max_model_len: int | None = None  # KV room per sequence; None = the model's context
    chunked_prefill: bool = False  # split long prompts over several steps

    def __post_init__(self) -> None:
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
    """A request while the engine serves it: its tokens so far and its KV slot."""

    request: Request
    trace: RequestTrace
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)  # prompt, then generated tokens
    slot: int | None = None
    num_cached: int = 0  # leading tokens whose keys/values are in the slot

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def prefilling(self) -> bool:
        return self.num_cached < self.prompt_len


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

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, new tokens this step) pairs: decodes first, then prefill chunks."""
        budget = self.config.max_num_batched_tokens
        decodes = [(s, 1) for s in self.running if not s.prefilling]
        budget -= len(decodes)
        prefills = []
        for seq in self.running:  # chunked prefills already under way
            if seq.prefilling and budget > 0:
                n = min(seq.prompt_len - seq.num_cached, budget)
                prefills.append((seq, n))
                budget -= n
        while self.waiting and self.free_slots and budget > 0:
            seq = self.waiting[0]
            if seq.prompt_len > budget and not self.config.chunked_prefill:
                break  # first come, first served: wait for a step with room for the prompt
            self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            self.running.append(seq)
            n = min(seq.prompt_len, budget)
            prefills.append((seq, n))
            budget -= n
        return decodes + prefills

    def finish(self, seq: Sequence) -> None:
        """Take a sequence out (finished or cancelled) and free its slot for the next request."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
            self.free_slots.append(seq.slot)
        seq.slot = None
