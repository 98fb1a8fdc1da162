"""The metadata of one forward pass: which tokens, at which positions, seeing which keys.

The engine builds a :class:`ForwardBatch`, the model reads it, and the KV storage reads it to know
where the new keys and values go. Padding is just one way to fill it in: a left-padded static batch
sets ``mask`` to hide the pad columns; later strategies (packed ragged batches, paged slots) add
their own fields without changing the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """Inputs of one forward pass over B rows of T new tokens each."""

    input_ids: torch.Tensor  # [B, T] token ids
    positions: torch.Tensor  # [B, T] RoPE positions of those tokens
    # [B, 1, T, S] bool, True where query t may attend key s of its row (S = keys in cache after
    # this step). None means plain causal attention among the T tokens after kv_start cached ones.
    mask: torch.Tensor | None = None
    kv_start: int = 0  # how many tokens each row already holds in contiguous KV storage

    @classmethod
    def prefill(cls, input_ids: torch.Tensor) -> "ForwardBatch":
        """Unpadded rows starting at position 0 (training, or a batch of equal-length prompts)."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        return cls(input_ids=input_ids, positions=positions)
