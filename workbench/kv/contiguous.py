"""Contiguous KV storage: every row reserves room for its maximum length up front.

This is what Hugging Face's static cache and pre-vLLM servers do: simple indexing, one dense tensor
per layer, but memory is reserved for ``max_len`` tokens whether the sequence reaches it or not (the
waste that paged storage removes, notebook 03).
"""

from __future__ import annotations

import torch

from workbench.kv.base import KVCache
from workbench.model.batch import ForwardBatch
from workbench.model.config import ModelConfig


class ContiguousKVCache(KVCache):
    """Dense [B, Hkv, max_len, d] key and value tensors per layer, filled left to right."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 num_kv_heads: int | None = None, layers: range | None = None) -> None:
        heads = num_kv_heads or config.num_key_value_heads  # a tensor-parallel shard holds fewer
        self.layers = layers or range(config.num_hidden_layers)  # a pipeline stage holds fewer
        shape = (batch_size, heads, max_len, config.head_dim)
        self.k = {i: torch.zeros(shape, device=device, dtype=dtype) for i in self.layers}
        self.v = {i: torch.zeros(shape, device=device, dtype=dtype) for i in self.layers}
        self.max_len = max_len
        self.length = 0  # tokens held by every row (rows of a padded batch advance together)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = batch.kv_start, batch.kv_start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens, step needs {end}")
        self.k[layer][:, :, start:end] = k  # k: [B, Hkv, T, d]
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, batch: ForwardBatch) -> None:
        self.length = batch.kv_start + batch.input_ids.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))
