"""Tensor parallelism (Megatron-LM): every weight matrix split across the ``tp`` ranks of a stage.

A linear layer ``Y = X W^T`` (W is [out, in]) splits two ways:

* **column-parallel**: W split along ``out`` (W = [W_1; ...; W_tp]); rank r computes its
  own slice of the outputs, ``Y_r = X W_r^T``, from the full input. No communication.
* **row-parallel**: W split along ``in``; rank r holds ``W_r`` and the matching slice ``X_r`` of
  the input and computes a *partial* result ``X_r W_r^T`` of the full output shape; one all-reduce
  sums them: ``Y = sum_r X_r W_r^T``.

Chained, the pair needs only one all-reduce: attention is column-parallel in q/k/v (each rank
takes ``H/tp`` query heads and ``Hkv/tp`` key/value heads, so GQA groups stay whole) and
row-parallel in o_proj; the SwiGLU MLP is column-parallel in gate/up and row-parallel in down.
That is two all-reduces per layer. The KV cache is sharded by heads like the attention. Optional
vocabulary parallelism splits the embedding table (lookup, then an all-reduce) and the LM head
(column-parallel, then an all-gather of the logits). Notebook 04 teaches it.

The shard is our own :class:`~workbench.model.llama.LlamaModel` built with the shard's shape
(:func:`~workbench.parallel.plan.shard_config`), its o_proj/down_proj swapped for
:class:`RowParallelLinear`; each rank reads only its slices of the checkpoint
(:mod:`workbench.parallel.shards`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from workbench.model.config import ModelConfig
from workbench.model.llama import LlamaModel
from workbench.model.rope import inverse_frequencies
from workbench.parallel.plan import Mesh, shard_config
from workbench.plug import pluggable

__all__ = ["ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding",
           "build_rank_model", "vocab_range"]


class ColumnParallelLinear(nn.Linear):
    """``Y_r = X W_r^T + b_r``: this rank's ``out/tp`` output features of the full layer.

    ``gather_output`` all-gathers the slices into the full ``[..., out]`` (the vocab-parallel LM
    head); ``full_out`` trims the padding of an uneven last slice.
    """

    def __init__(self, in_features: int, out_local: int, bias: bool, group=None,
                 gather_output: bool = False, full_out: int | None = None) -> None:
        super().__init__(in_features, out_local, bias=bias)
        self.group, self.gather_output, self.full_out = group, gather_output, full_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # [..., out/tp]
        if not self.gather_output or self.group is None:
            return y
        parts = [torch.empty_like(y) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, y.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)[..., :self.full_out]  # [..., out]


class RowParallelLinear(nn.Linear):
    """``Y = sum_r X_r W_r^T + b``: partial products summed by one all-reduce, bias added once."""

    def __init__(self, in_local: int, out_features: int, bias: bool, group=None) -> None:
        super().__init__(in_local, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # [..., out]: this rank's partial sum
        if self.group is not None:
            dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


@pluggable("tp.vocab_range")
def vocab_range(vocab_size: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of the vocabulary rank ``tp_rank`` holds: ceil(V/tp) each, the last
    one shorter when tp does not divide V (and empty, ``start == end == V``, for ranks past it)."""
    per = -(-vocab_size // tp)
    return min(tp_rank * per, vocab_size), min((tp_rank + 1) * per, vocab_size)


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, end)`` of the embedding table; ids outside look up zeros, an all-reduce
    adds the rank that owns each id."""

    def __init__(self, vocab_size: int, hidden: int, tp: int, tp_rank: int, group) -> None:
        super().__init__()
        self.start, self.end = vocab_range(vocab_size, tp, tp_rank)
        self.per = -(-vocab_size // tp)
        self.weight = nn.Parameter(torch.empty(self.per, hidden))  # padded to equal shards
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.end)  # [B, T]
        local = torch.where(mine, ids - self.start, 0)
        x = F.embedding(local, self.weight) * mine[..., None].to(self.weight.dtype)  # [B, T, h]
        if self.group is not None:
            dist.all_reduce(x, group=self.group)
        return x


def _tp_linears(layer: nn.Module, local: ModelConfig, group) -> None:
    """Swap a decoder layer's linears for column-/row-parallel ones of the shard's shape."""
    attn, mlp, h = layer.self_attn, layer.mlp, local.hidden_size
    q, kv = local.num_attention_heads * local.head_dim, local.num_key_value_heads * local.head_dim
    attn.q_proj = ColumnParallelLinear(h, q, local.qkv_bias)
    attn.k_proj = ColumnParallelLinear(h, kv, local.qkv_bias)
    attn.v_proj = ColumnParallelLinear(h, kv, local.qkv_bias)
    attn.o_proj = RowParallelLinear(q, h, local.o_bias, group)  # all-reduce 1 of the layer
    mlp.gate_proj = ColumnParallelLinear(h, local.intermediate_size, local.mlp_bias)
    mlp.up_proj = ColumnParallelLinear(h, local.intermediate_size, local.mlp_bias)
    mlp.down_proj = RowParallelLinear(local.intermediate_size, h, local.mlp_bias, group)  # 2


def build_rank_model(config: ModelConfig, mesh: Mesh, vocab_parallel: bool = False,
                     device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> LlamaModel:
    """This rank's part of the model, weights uninitialised (load them with
    :func:`workbench.parallel.shards.load_shard`).

    Layers of other stages, and the embedding / final norm / LM head where this stage does not
    need them, are ``nn.Identity`` placeholders that hold no weights, so layer indices (and the
    checkpoint's names) stay global.
    """
    local = shard_config(config, mesh.tp)
    group = mesh.tp_group
    with torch.device("meta"):
        model = LlamaModel(local)
        for i in range(config.num_hidden_layers):
            if i in mesh.layers:
                _tp_linears(model.layers[i], local, group)
            else:
                model.layers[i] = nn.Identity()
        if vocab_parallel and mesh.tp > 1:
            start, end = vocab_range(config.vocab_size, mesh.tp, mesh.tp_rank)
            model.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                        mesh.tp, mesh.tp_rank, group)
            model.lm_head = ColumnParallelLinear(config.hidden_size, model.embed_tokens.per,
                                                 False, group, True, config.vocab_size)
        if not mesh.first:
            model.embed_tokens = nn.Identity()
        if not mesh.last:
            model.norm, model.lm_head = nn.Identity(), nn.Identity()
    model.to_empty(device=device).to(dtype)
    if config.tie_word_embeddings and mesh.first and mesh.last:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty made new tensors: tie again
    model.inv_freq = inverse_frequencies(local).to(device)
    return model.eval()
