"""Choosing the next token from logits: greedy, or sampled with temperature / top-k / top-p.

Each request owns a seeded ``torch.Generator``, so a request's sampled tokens depend only on its
own seed, never on which other requests share its batch: static and continuous batching then give
the same samples, and a notebook cell re-run gives the same text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` is greedy (argmax); otherwise sample from the filtered softmax."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also rejects NaN
            raise WorkbenchError(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise WorkbenchError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise WorkbenchError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, request_index: int) -> torch.Generator:
        """The private random stream of request ``request_index``."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + request_index)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Softmax of logits [V] / temperature with top-k and top-p (nucleus) filtering -> [V]."""
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(0) - sorted_p >= params.top_p  # mass before this token
        probs[order[outside]] = 0
        probs /= probs.sum()
    return probs


def sample(logits: torch.Tensor, params: SamplingParams,
           generators: list[torch.Generator]) -> list[int]:
    """Next token of each row of logits [B, V]; row i draws from ``generators[i]``."""
    if params.greedy:
        return logits.argmax(dim=-1).tolist()
    rows = logits.float().cpu()
    return [int(torch.multinomial(filtered_probs(row, params), 1, generator=g))
            for row, g in zip(rows, generators)]
