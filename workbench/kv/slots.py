"""Slot KV storage for continuous batching: a fixed set of slots, each reserving max_len tokens.

A running sequence owns one slot; when it finishes, the slot is handed to the next waiting request
at once (iteration-level scheduling, as in Orca). Within a step, the packed batch holds decode
tokens of running sequences next to prefill chunks of new ones (``PackedLayout``), so attention is
computed in two parts:

- decodes, batched: each query attends to the first ``context_len`` keys of its own slot;
- prefill chunks, one sequence at a time: causal over its new tokens, after its cached ones.

Like :class:`~workbench.kv.contiguous.ContiguousKVCache`, each slot reserves room for its maximum
length up front: the memory waste that paged storage (notebook 03) removes.
"""

from __future__ import annotations

import torch

from workbench.attention.masks import causal_mask
from workbench.attention.sdpa import sdpa
from workbench.kv.base import KVCache
from workbench.model.batch import ForwardBatch
from workbench.model.config import ModelConfig


class SlotKVCache(KVCache):
    """Per layer, keys and values [num_slots, Hkv, max_len, d]; sequences address them by slot."""

    def __init__(self, config: ModelConfig, num_slots: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        shape = (num_slots, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype)
                  for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype)
                  for _ in range(config.num_hidden_layers)]
        self.num_slots, self.max_len = num_slots, max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the packed tokens' k/v [1, Hkv, N, d] at (slot, position) of each token."""
        slots, positions = batch.layout.slot_mapping, batch.positions[0]  # [N] each
        self.k[layer][slots, :, positions] = k[0].transpose(0, 1)  # [N, Hkv, d]
        self.v[layer][slots, :, positions] = v[0].transpose(0, 1)
        return self.k[layer], self.v[layer]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        k_cache, v_cache = self.update(layer, k, v, batch)
        lay = batch.layout
        nd, parts = lay.num_decodes, []
        if nd:  # decodes, batched over every slot, in place: no copy of the cache
            parts.append(self._decode(q[0, :, :nd], k_cache, v_cache, lay))  # [1, H, nd, d]
        start = nd
        for slot, n, ctx in zip(lay.slots[nd:], lay.query_lens[nd:], lay.context_lens[nd:]):
            q_seq = q[:, :, start:start + n]  # [1, H, n, d]
            keys = k_cache[slot:slot + 1, :, :ctx]  # [1, Hkv, ctx, d]
            values = v_cache[slot:slot + 1, :, :ctx]
            mask = None if n == ctx else causal_mask(n, ctx, q.device)[None, None]
            parts.append(sdpa(q_seq, keys, values, mask, causal=True))
            start += n
        return torch.cat(parts, dim=2)  # [1, H, N, d]

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                lay) -> torch.Tensor:
        """One query per decoding sequence, q [H, nd, d], against its own slot's keys.

        The queries are placed in a [num_slots, H, 1, d] tensor so that attention reads the
        cache where it lies (a view up to the longest context, no gather); idle slots get a
        dummy query that sees one key, and their output is dropped.
        """
        nd = q.shape[1]
        longest = max(lay.context_lens[:nd])
        if "decode_mask" not in lay.scratch:  # the same for every layer of this step
            slots = lay.slots_t[:nd]
            lens = torch.ones(self.num_slots, dtype=torch.long, device=q.device)
            lens[slots] = lay.context_lens_t[:nd]
            lay.scratch["decode_mask"] = (torch.arange(longest, device=q.device)
                                          < lens[:, None])[:, None, None]  # [slots, 1, 1, S]
        slots, mask = lay.slots_t[:nd], lay.scratch["decode_mask"]
        q_all = q.new_zeros(self.num_slots, q.shape[0], 1, q.shape[2])  # [slots, H, 1, d]
        q_all[slots] = q.transpose(0, 1)[:, :, None]  # [nd, H, 1, d]
        out = sdpa(q_all, k_cache[:, :, :longest], v_cache[:, :, :longest], mask)
        return out[slots, :, 0].transpose(0, 1)[None]  # [1, H, nd, d]

    def advance(self, batch: ForwardBatch) -> None:
        """Nothing to do: each sequence's length lives in the scheduler's bookkeeping."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
