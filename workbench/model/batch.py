"""The metadata of one forward pass: which tokens, at which positions, seeing which keys.

The engine builds a :class:`ForwardBatch`, the model reads it, and the KV storage reads it to know
where the new keys and values go. Padding is just one way to fill it in: a left-padded static batch
sets ``mask`` to hide the pad columns; later strategies (packed ragged batches, paged slots) add
their own fields without changing the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PackedLayout:
    """How the N tokens of one packed row [1, N] split into sequences (continuous batching).

    Sequences come decodes first (one new token each), then prefill chunks. Sequence i owns KV
    slot ``slots[i]``, brings ``query_lens[i]`` new tokens and, after this step, holds
    ``context_lens[i]`` tokens in its slot. Python lists, so no step ever waits on the device.

    With paged storage (notebook 03) ``slot_mapping`` holds each token's slot in the block pool
    (``block * block_size + offset``), ``block_tables`` each sequence's blocks and
    ``decode_blocks`` how many table columns the batched decode attention reads.
    """

    slots: list[int]
    query_lens: list[int]
    context_lens: list[int]
    num_decodes: int
    slot_mapping: torch.Tensor = field(repr=False)  # [N] the KV slot of each new token
    slots_t: torch.Tensor = field(repr=False)  # [M] ``slots`` on the device
    context_lens_t: torch.Tensor = field(repr=False)  # [M] ``context_lens`` on the device
    block_tables: torch.Tensor | None = field(default=None, repr=False)  # [M, blocks] (paged)
    decode_blocks: int = 0  # table columns the decodes attend over (paged)
    scratch: dict = field(default_factory=dict, repr=False)  # per-step values layers share


@dataclass
class ForwardBatch:
    """Inputs of one forward pass over B rows of T new tokens each."""

    input_ids: torch.Tensor  # [B, T] token ids
    positions: torch.Tensor  # [B, T] RoPE positions of those tokens
    # [B, 1, T, S] bool, True where query t may attend key s of its row (S = keys in cache after
    # this step). None means plain causal attention among the T tokens after kv_start cached ones.
    mask: torch.Tensor | None = None
    kv_start: int = 0  # how many tokens each row already holds in contiguous KV storage
    layout: PackedLayout | None = None  # set for packed batches (B == 1)
    logits_indices: torch.Tensor | None = None  # [M] columns whose logits are needed

    @classmethod
    def prefill(cls, input_ids: torch.Tensor) -> "ForwardBatch":
        """Unpadded rows starting at position 0 (training, or a batch of equal-length prompts)."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        return cls(input_ids=input_ids, positions=positions)
