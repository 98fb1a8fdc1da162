"""Model parallelism in one process, computed for real: the pictures of notebooks 04 and 05.

* :func:`split_matmul` - ``C = A B`` with B cut in ``n`` pieces by columns (each piece gives
  some columns of C: concatenate) or by rows (A cut by columns to match; each pair gives a
  partial C of full size: sum). Tensor parallelism is exactly this, one piece per device.
* :func:`tensor_parallel_layer` - one real decoder layer of a model cut ``tp`` ways as the
  ranks cut it (:func:`~workbench.parallel.shards.tp_slice`: heads, MLP columns), its partial
  outputs summed
  where the all-reduces would sum them, checked equal to the layer itself.
* :func:`pipeline_stages` - a model's layers split into stages, the hidden states handed from
  stage to stage, the logits checked equal to the whole model's.

No process group here: the real multi-process versions run through
:func:`workbench.parallel.generate_parallel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError
from workbench.model.batch import ForwardBatch
from workbench.model.llama import LlamaModel
from workbench.model.rope import rope_cos_sin
from workbench.parallel.plan import balanced_stages, shard_config
from workbench.parallel.shards import tp_slice

__all__ = ["MatmulSplit", "pipeline_stages", "split_matmul", "tensor_parallel_layer"]


@dataclass(frozen=True)
class MatmulSplit:
    """``C = A @ B`` computed whole and in ``n`` pieces (``how`` = "columns" or "rows")."""

    how: str
    a_parts: list[torch.Tensor]  # the whole A ("columns"), or A's column blocks ("rows")
    b_parts: list[torch.Tensor]  # B's column blocks ("columns") or row blocks ("rows")
    partials: list[torch.Tensor]  # each device's result
    combined: torch.Tensor  # concatenated ("columns") or summed ("rows")
    reference: torch.Tensor  # A @ B on one device

    @property
    def max_error(self) -> float:
        return float((self.combined - self.reference).abs().max())


def split_matmul(a: torch.Tensor, b: torch.Tensor, n: int = 2, how: str = "columns") -> MatmulSplit:
    """``A [m, k] @ B [k, n_out]`` over ``n`` devices, split by B's columns or B's rows.

    columns: ``C = [A B_1, ..., A B_n]`` (column-parallel; each device needs all of A).
    rows: ``C = A_1 B_1 + ... + A_n B_n`` with A split by columns (row-parallel; one sum).
    """
    if how not in ("columns", "rows"):
        raise WorkbenchError(f"how must be 'columns' or 'rows', got {how!r}")
    if how == "columns":
        b_parts = list(b.chunk(n, dim=1))  # [k, n_out/n] each
        a_parts = [a] * len(b_parts)
        partials = [a @ bp for bp in b_parts]  # [m, n_out/n] each
        combined = torch.cat(partials, dim=1)  # [m, n_out]
    else:
        b_parts = list(b.chunk(n, dim=0))  # [k/n, n_out] each
        a_parts = list(a.chunk(n, dim=1))  # [m, k/n] each
        partials = [ap @ bp for ap, bp in zip(a_parts, b_parts)]  # [m, n_out] each, partial
        combined = torch.stack(partials).sum(0)  # the all-reduce
    return MatmulSplit(how, a_parts, b_parts, partials, combined, a @ b)


def _copy_shard(full: torch.nn.Linear, shard: torch.nn.Linear, name: str, tp: int, r: int) -> None:
    """Copy rank ``r``'s slice of ``full`` (as :func:`~workbench.parallel.shards.tp_slice` cuts
    checkpoint tensor ``name``) into ``shard``. A bias held whole is a row-parallel layer's: the
    real layer adds it once, after the all-reduce, so here rank 0 adds it and the others add 0."""
    for kind in ("weight", "bias"):
        src = getattr(full, kind)
        if src is None:
            continue
        cut = tp_slice(f"{name}.{kind}", tuple(src.shape), tp, r)
        if cut is None:
            value = src if r == 0 or kind == "weight" else torch.zeros_like(src)
        else:
            dim, start, end = cut
            value = src.narrow(dim, start, end - start)  # rows (column-parallel) or columns (row-)
        getattr(shard, kind).copy_(value)


@torch.no_grad()
def tensor_parallel_layer(model: LlamaModel, ids: torch.Tensor, layer: int = 0,
                          tp: int = 2) -> dict:
    """Layer ``layer`` of ``model`` on ``ids`` [B, T], whole and as ``tp`` head/column shards.

    Each shard's weights are cut as the ranks cut them
    (:func:`~workbench.parallel.shards.tp_slice`).
    Returns the attention and MLP partial outputs of each shard, their sums (what the two
    all-reduces of the layer compute), and the largest difference from the whole layer.
    """
    from workbench.model.llama import MLP, Attention

    config = model.config
    local = shard_config(config, tp)
    block = model.layers[layer]
    batch = ForwardBatch.prefill(ids)
    x = model.embed(batch)  # [B, T, hidden]
    cos, sin = rope_cos_sin(model.inv_freq, batch.positions, x.dtype)
    h = block.input_layernorm(x)
    attn_parts, mlp_parts = [], []
    for r in range(tp):
        attn = Attention(local, layer).to(device=x.device, dtype=x.dtype)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            _copy_shard(getattr(block.self_attn, name), getattr(attn, name),
                        f"layers.{layer}.self_attn.{name}", tp, r)
        attn_parts.append(attn(h, cos, sin, batch, None))  # [B, T, hidden], partial
    attn_sum = torch.stack(attn_parts).sum(0)  # all-reduce 1
    attn_ref = block.self_attn(h, cos, sin, batch, None)
    y = x + attn_sum
    h2 = block.post_attention_layernorm(y)
    for r in range(tp):
        mlp = MLP(local).to(device=x.device, dtype=x.dtype)
        for name in ("gate_proj", "up_proj", "down_proj"):
            _copy_shard(getattr(block.mlp, name), getattr(mlp, name), f"layers.{layer}.mlp.{name}",
                        tp, r)
        mlp_parts.append(mlp(h2))  # [B, T, hidden], partial
    out = y + torch.stack(mlp_parts).sum(0)  # all-reduce 2
    ref = block(x, cos, sin, batch, None)
    return {"attention_partials": attn_parts, "attention_sum": attn_sum,
            "attention_error": float((attn_sum - attn_ref).abs().max()),
            "mlp_partials": mlp_parts, "output": out, "reference": ref,
            "max_error": float((out - ref).abs().max()),
            "heads_per_rank": local.num_attention_heads,
            "kv_heads_per_rank": local.num_key_value_heads}


@torch.no_grad()
def pipeline_stages(model: LlamaModel, ids: torch.Tensor, pp: int = 2) -> dict:
    """The model as ``pp`` stages in a row: stage s runs its layers on what stage s-1 handed
    over. Returns the stages, each hand-over's shape and size, and the error vs the model."""
    stages = balanced_stages(model.config, pp)
    batch = ForwardBatch.prefill(ids)
    x = model.embed(batch)  # stage 0 embeds
    handoffs = []
    for s, layers in enumerate(stages):
        x = model.run_layers(x, batch, None, layers)  # [B, T, hidden]
        if s < pp - 1:
            sent = x.clone()  # what send/recv would carry to stage s + 1
            handoffs.append({"from": s, "to": s + 1, "shape": tuple(sent.shape),
                             "bytes": sent.numel() * sent.element_size()})
            x = sent
    logits = model.head(x)  # the last stage
    reference = model(batch)
    return {"stages": stages, "handoffs": handoffs, "logits": logits,
            "max_error": float((logits - reference).abs().max())}
