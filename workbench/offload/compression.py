"""What 4-bit compression of the offloaded tiers costs in accuracy (FlexGen, section 5).

With ``compress_weights`` the store keeps every offloaded matrix as 4-bit group-wise codes (group
64, :mod:`workbench.quant.groupwise`) and the device computes with their dequantized values; with
``compress_kv`` the offloaded KV cache is stored likewise. :func:`compressed_copy` builds the model
that computes exactly those numbers (the offloaded weights replaced by ``dequantize(quantize(W))``)
so that :func:`workbench.quant.eval.evaluate` can score it on held-out text, and
:func:`kv_factory` gives the KV storage that rounds keys/values the same way. Notebook ``06``.
"""

from __future__ import annotations

import copy

import torch

from workbench.model.llama import LlamaModel
from workbench.offload.kvcache import TieredKVCache
from workbench.offload.layout import weight_units
from workbench.offload.policy import Policy, _compressible, kv_tiers, param_tiers
from workbench.offload.store import QUANT
from workbench.quant.groupwise import quantize


@torch.no_grad()
def compressed_copy(model: LlamaModel, policy: Policy) -> LlamaModel:
    """A copy of ``model`` whose weights off the gpu tier are what the 4-bit store returns."""
    out = copy.deepcopy(model)
    if not policy.compress_weights:
        return out
    tiers = param_tiers(policy, weight_units(model.config))
    params = dict(out.named_parameters())
    if model.config.tie_word_embeddings:
        params["lm_head.weight"] = params["embed_tokens.weight"]
    for unit in weight_units(model.config):
        for p in unit.params:
            if tiers[p.name] != "gpu" and _compressible(p.shape):
                w = params[p.name]
                w.copy_(quantize(w, QUANT).dequantize(w.dtype))
    return out


def kv_factory(model: LlamaModel, policy: Policy):
    """``(batch, max_len) -> KV cache`` placed and compressed as ``policy`` says."""
    tiers = ["gpu" if t == "gpu" else "cpu" for t in kv_tiers(policy, model.config.num_hidden_layers)]

    def make(batch: int, max_len: int) -> TieredKVCache:
        return TieredKVCache(model.config, batch, max_len, tiers, model.device, model.dtype,
                             compress=policy.compress_kv)

    return make


def compressed_bytes_ratio(model: LlamaModel, policy: Policy) -> float:
    """Stored bytes of the offloaded weights, compressed over dense (about 4.25 / 32 in fp32)."""
    tiers = param_tiers(policy, weight_units(model.config))
    dense = packed = 0
    for unit in weight_units(model.config):
        for p in unit.params:
            if tiers[p.name] == "gpu":
                continue
            n = p.numel * model.dtype.itemsize
            dense += n
            packed += (p.numel // 2 + p.numel // 64 * 2) if _compressible(p.shape) else n
    return packed / dense if dense else 1.0
