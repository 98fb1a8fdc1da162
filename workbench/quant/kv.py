"""A KV cache that stores keys and values quantized: int8, or 4-bit group-wise as FlexGen does.

Each new key/value vector (one token, one head: ``d`` values) is quantized on arrival in groups
along ``d`` and written into packed storage; attention reads the cache back dequantized:

    store:  codes [B, Hkv, max_len, d * bits / 8],  scales (and offsets) [B, Hkv, max_len, d / g]
    attend: softmax(q k_hat^T / sqrt(d)) v_hat,  k_hat, v_hat = dequantize(stored codes)

Because every token's vector is quantized on its own, a prompt prefilled in one pass sees exactly
the same keys/values as when it is fed token by token. The memory the cache reserves shrinks ~2x
(int8, one float16 scale per token and head) or 3.2x (4-bit, group 32, float16 scale and offset)
against bf16; the dequantized copy made for each layer's attention is a temporary. Built like
:class:`~workbench.kv.contiguous.ContiguousKVCache` (same arguments, plus ``quant``), so it can
stand wherever that one is used. Taught in notebook ``07_quantization``.
"""

from __future__ import annotations

import torch

from workbench.kv.base import KVCache
from workbench.model.batch import ForwardBatch
from workbench.model.config import ModelConfig
from workbench.quant.groupwise import QuantConfig, QuantizedTensor, quantize

KV_INT8 = QuantConfig(bits=8, group_size=None)  # one scale per token and head
KV_INT4 = QuantConfig(bits=4, group_size=32, symmetric=False)  # FlexGen-style 4-bit, min + scale


class QuantizedKVCache(KVCache):
    """Packed [B, Hkv, max_len, ...] key/value codes and scales per layer, filled left to right."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 num_kv_heads: int | None = None, layers: range | None = None, *,
                 quant: QuantConfig = KV_INT8) -> None:
        heads = num_kv_heads or config.num_key_value_heads
        self.layers = layers or range(config.num_hidden_layers)
        self.quant, self.dtype, self.max_len = quant, dtype, max_len
        self.shape = torch.Size((batch_size, heads, max_len, config.head_dim))
        self.k = {i: self._empty(device) for i in self.layers}
        self.v = {i: self._empty(device) for i in self.layers}
        self.length = 0  # tokens held by every row (rows of a padded batch advance together)

    def _empty(self, device: torch.device | str) -> QuantizedTensor:
        """Zeroed storage for one layer's keys (or values): codes, scales, offsets."""
        G, _ = self.quant.groups(self.shape[-1])  # checks that the group size divides head_dim
        B, H, S, d = self.shape
        code_dtype = torch.int8 if self.quant.bits == 8 and self.quant.symmetric else torch.uint8
        codes = torch.zeros(B, H, S, d * self.quant.bits // 8, dtype=code_dtype, device=device)
        scales = torch.zeros(B, H, S, G, dtype=self.quant.scale_dtype, device=device)
        zeros = None if self.quant.symmetric else torch.zeros_like(scales)
        return QuantizedTensor(codes, scales, zeros, self.shape, self.quant)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = batch.kv_start, batch.kv_start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens, step needs {end}")
        _write(self.k[layer], quantize(k, self.quant), start, end)  # k: [B, Hkv, T, d]
        _write(self.v[layer], quantize(v, self.quant), start, end)
        return _read(self.k[layer], end, self.dtype), _read(self.v[layer], end, self.dtype)

    def advance(self, batch: ForwardBatch) -> None:
        self.length = batch.kv_start + batch.input_ids.shape[1]

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.k.values(), *self.v.values()))


def _write(store: QuantizedTensor, new: QuantizedTensor, start: int, end: int) -> None:
    """Copy the codes/scales/offsets of tokens [start, end) into the storage (dim 2 = tokens)."""
    store.data[:, :, start:end] = new.data
    store.scale[:, :, start:end] = new.scale
    if store.zero is not None:
        store.zero[:, :, start:end] = new.zero


def _read(store: QuantizedTensor, end: int, dtype: torch.dtype) -> torch.Tensor:
    """The first ``end`` tokens dequantized: [B, Hkv, end, d] in ``dtype``."""
    B, H, _, d = store.shape
    zero = None if store.zero is None else store.zero[:, :, :end]
    view = QuantizedTensor(store.data[:, :, :end], store.scale[:, :, :end], zero,
                           torch.Size((B, H, end, d)), store.config)
    return view.dequantize(dtype)
