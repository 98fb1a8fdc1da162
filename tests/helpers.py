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
