"""Shared helpers for the model / loading / engine tests (no fixtures here: import what you need)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from workbench.model import LlamaModel, ModelConfig
from workbench.model.loading import save_checkpoint

BUNDLED_DIR = Path(__file__).resolve().parents[1] / "data" / "models" / "stdlib-llama-7m"


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, restoring the previous setting afterwards.

    The tests drive tiny models (a few MFLOP per step): with 2 cores shared with other processes,
    one thread avoids oversubscription stalls and is several times faster than the default.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def tiny_config(**overrides) -> ModelConfig:
    """A 2-layer GQA model small enough to build and save in milliseconds."""
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64, eos_token_ids=(0,), pad_token_id=0)
    fields.update(overrides)
    return ModelConfig(**fields)


def write_tiny_checkpoint(out_dir: Path, config: ModelConfig | None = None, seed: int = 0,
                          dtype: torch.dtype = torch.float32) -> LlamaModel:
    """Save a randomly initialised model as an HF-style checkpoint directory; return the model."""
    torch.manual_seed(seed)
    model = LlamaModel(config or tiny_config()).eval()
    save_checkpoint(model, out_dir, dtype=dtype)
    return model


def paged_attention_case(B: int, H: int, Hkv: int, D: int, bs: int, nb: int,
                         dtype: torch.dtype, device: str = "cpu") -> dict:
    """A random paged decode-attention problem and its answer by the gather path: q [B, H, D],
    pools [blocks, bs, Hkv, D] in shuffled blocks, tables [B, nb], lengths [B] from 1 to nb x bs."""
    from workbench.engine.fastpath import gather_attention

    g = torch.Generator(device=device).manual_seed(B)
    blocks = B * nb + 3
    k_pool = torch.randn(blocks, bs, Hkv, D, device=device, generator=g).to(dtype)
    v_pool = torch.randn(blocks, bs, Hkv, D, device=device, generator=g).to(dtype)
    tables = torch.randperm(blocks, device=device, generator=g)[:B * nb].view(B, nb)
    lens = torch.randint(1, nb * bs + 1, (B,), device=device, generator=g)
    q = torch.randn(B, H, D, device=device, generator=g).to(dtype)
    keep = torch.arange(nb * bs, device=device) < lens[:, None]
    mask = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(
        ~keep, float("-inf"))[:, None, None]
    return dict(q=q, k_pool=k_pool, v_pool=v_pool, tables=tables, lens=lens,
                expected=gather_attention(q, k_pool, v_pool, tables, mask))


def rope_attention_outputs(B: int, H: int, Hkv: int, D: int, bs: int, nb: int,
                           dtype: torch.dtype, device: str = "cpu",
                           splits: int | None = None, **launch) -> dict:
    """One decode step's attention on a :func:`paged_attention_case`, two ways: "reference"
    (RoPE in PyTorch, ``write_kv``, ``paged_decode``) and "fused" (``rope_paged_decode``), each
    (output [B, H, D], k pool, v pool). The last row's new token opens a split (splits are whole
    tiles of 32 or 64 tokens); with more rows, the first row's new token is its only one.
    ``launch``: the fused kernel's tile and compile options."""
    from workbench.engine.fastpath import _rope
    from workbench.kv.paged_triton import paged_decode, rope_paged_decode, write_kv

    case = paged_attention_case(B, H, Hkv, D, bs, nb, dtype, device)
    lens, tables = case["lens"], case["tables"]
    lens[-1] = 64 * ((nb * bs - 1) // 64) + 1
    lens[0] = 1 if B > 1 else lens[0]
    g = torch.Generator(device=device).manual_seed(D)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, device=device, generator=g).to(dtype)
    half = torch.rand(B, 1, D // 2, device=device, generator=g) * 6.3  # angles
    cos, sin = (f(torch.cat((half, half), -1)).to(dtype) for f in (torch.cos, torch.sin))
    pos = lens - 1
    slots = tables[torch.arange(B, device=device), pos // bs] * bs + pos % bs  # [B]
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    out = {}
    for way in ("reference", "fused"):
        k_pool, v_pool = case["k_pool"].clone(), case["v_pool"].clone()
        if way == "reference":
            write_kv(k_pool, v_pool, _rope(k.view(B, Hkv, D), cos, sin), v.view(B, Hkv, D), slots)
            attn = paged_decode(_rope(q.view(B, H, D), cos, sin), k_pool, v_pool, tables, lens,
                                splits)
        else:
            attn = rope_paged_decode(qkv, cos, sin, k_pool, v_pool, slots, tables, lens, H, splits,
                                     **launch)
        out[way] = (attn, k_pool, v_pool)
    return out
