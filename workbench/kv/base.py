"""The interface between the model and KV storage.

During decoding, each new token's keys and values are kept so that later tokens attend to them
without recomputing the prefix (the KV cache). The model does not know how they are stored: it hands
the new keys/values of each layer to :meth:`KVCache.update` and attends to whatever comes back.
Contiguous per-sequence reservation (here), paged blocks (vLLM), a rolling window with attention
sinks (StreamingLLM), a head shard (tensor parallelism) or an offloaded tier all fit behind it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from workbench.attention.sdpa import sdpa
from workbench.model.batch import ForwardBatch


class KVCache(ABC):
    """Per-layer key/value storage that the model writes to and reads from."""

    # True for a storage that applies RoPE itself at the positions it assigns (StreamingLLM's
    # rolling cache, notebook 08): the model then hands over q and k before rotation
    rotates_keys: bool = False

    @abstractmethod
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` [B, Hkv, T, d] of this step; return the keys/values to attend to.

        The returned tensors are [B, Hkv, S, d], S matching the last dimension of ``batch.mask``.
        """

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        """Store this step's k/v, then attend: q [B, H, T, d] -> [B, H, T, d].

        The default stores through :meth:`update` and attends densely under ``batch.mask``;
        storages with their own layout (packed slots, pages) override it.
        """
        k_all, v_all = self.update(layer, k, v, batch)  # [B, Hkv, S, d]
        return sdpa(q, k_all, v_all, batch.mask, causal=batch.mask is None)

    @abstractmethod
    def advance(self, batch: ForwardBatch) -> None:
        """Called once after all layers ran: the step's tokens are now part of the cache."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of memory the storage reserves."""
