"""Our own forward pass of the Llama family (Llama 2/3, Qwen2), written to be read.

    x = embed(ids)
    for each layer:  x = x + Attention(RMSNorm(x));  x = x + MLP(RMSNorm(x))
    logits = lm_head(RMSNorm(x))

Attention is grouped-query (GQA): ``num_attention_heads`` query heads share ``num_key_value_heads``
key/value heads, which shrinks the KV cache by the group size. The MLP is SwiGLU:
``down(silu(gate(x)) * up(x))``. Module and parameter names follow Hugging Face checkpoints
(``layers.0.self_attn.q_proj.weight``...) so that weights load by name. The KV cache and the batch
metadata are explicit arguments; nothing is hidden in module state. Taught in notebook ``00_tour``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from workbench.attention.sdpa import sdpa
from workbench.model.batch import ForwardBatch
from workbench.model.config import ModelConfig
from workbench.model.rope import apply_rope, inverse_frequencies, rope_cos_sin

if TYPE_CHECKING:  # the KV storages import the model's batch type; avoid the import cycle
    from workbench.kv.base import KVCache


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x^2) + eps) * weight``, computed in float32 as the reference does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; keys and values go through the KV cache."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: ForwardBatch, kv: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape  # batch, new tokens, hidden
        d = self.head_dim
        q = self.q_proj(x).view(B, T, self.num_heads, d).transpose(1, 2)  # [B, H, T, d]
        k = self.k_proj(x).view(B, T, self.num_kv_heads, d).transpose(1, 2)  # [B, Hkv, T, d]
        v = self.v_proj(x).view(B, T, self.num_kv_heads, d).transpose(1, 2)  # [B, Hkv, T, d]
        if kv is None or not kv.rotates_keys:  # a rolling cache rotates at its own positions
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # (StreamingLLM, notebook 08)
        if kv is None:  # no cache: attend among the T tokens of this step
            out = sdpa(q, k, v, batch.mask, causal=batch.mask is None)  # [B, H, T, d]
        else:  # the storage writes k/v and attends through its own layout
            out = kv.attend(self.layer, q, k, v, batch)  # [B, H, T, d]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * d))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention then MLP."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                batch: ForwardBatch, kv: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """A Llama-family causal language model.

    ``forward`` is the whole model; ``embed``, ``run_layers`` and ``head`` are its three stages, so
    that pipeline stages or layer-by-layer offloading can drive them one at a time.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        table = torch.empty(config.vocab_size, config.hidden_size)  # [V, hidden]
        if table.device.type != "meta":  # nn.Embedding's own N(0, 1) initialisation, same RNG draws;
            nn.init.normal_(table)  # on the meta device it would import torch._dynamo (2.4 s a process)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=table)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", inverse_frequencies(config), persistent=False)

    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        return self.embed_tokens(batch.input_ids)  # [B, T, hidden]

    def run_layers(self, x: torch.Tensor, batch: ForwardBatch, kv: KVCache | None,
                   layers: range | None = None) -> torch.Tensor:
        """Apply decoder layers ``layers`` (all by default) to hidden states x [B, T, hidden]."""
        cos, sin = rope_cos_sin(self.inv_freq, batch.positions, x.dtype)  # [B, T, d] each
        for i in layers if layers is not None else range(len(self.layers)):
            x = self.layers[i](x, cos, sin, batch, kv)
        return x

    def head(self, x: torch.Tensor, last_only: bool = False,
             indices: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and LM head: logits [B, T, vocab]; [B, vocab] of the last column with
        ``last_only``; [M, vocab] of packed columns ``indices`` (a packed batch has B == 1)."""
        if indices is not None:
            x = x[0, indices]  # [M, hidden]
        elif last_only:
            x = x[:, -1]  # [B, hidden]
        return self.lm_head(self.norm(x))

    def forward(self, batch: ForwardBatch, kv: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        x = self.run_layers(self.embed(batch), batch, kv)
        if kv is not None:
            kv.advance(batch)
        return self.head(x, last_only, batch.logits_indices)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype


def empty_model(config: ModelConfig, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> LlamaModel:
    """A model with uninitialised weights allocated directly on ``device`` (no CPU init pass).

    Built on the meta device first, so an 8B shape costs no time in random initialisation that
    a checkpoint load or :func:`workbench.model.presets.random_model` overwrites anyway.
    """
    with torch.device("meta"):
        model = LlamaModel(config)
    model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty made new tensors: tie again
    model.inv_freq = inverse_frequencies(config).to(device)  # buffers are not in checkpoints
    return model
