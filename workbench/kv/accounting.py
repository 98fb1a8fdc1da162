"""KV memory accounting: how much of the memory reserved for keys and values holds real tokens.

The engine records after every step (``ContinuousEngine.kv_history``) the tokens stored, the memory
the running sequences hold (``reserved``, in token slots) and the pool's ``capacity``. Then

- **real fraction** = tokens / reserved, summed over steps: the vLLM paper's "KV memory holding
  real tokens" (20.4-38.2% for max-length reservation in earlier systems, over 96% paged);
- **reservation waste** = reserved - tokens: room held for tokens not generated yet and, for
  max-length slots, never generated at all (internal fragmentation); paged storage only wastes
  the unfilled tail of each sequence's last block;
- **free** = capacity - reserved: memory nobody holds (with slots, a free slot is usable only by a
  whole sequence; a free block by any).

Given one KV memory budget, :func:`capacity_for_budget` says how many max-length slots or how many
blocks it buys - and so how large a batch fits. Taught in notebook 03.
"""

from __future__ import annotations

import torch

from workbench.errors import WorkbenchError
from workbench.kv.paged import kv_bytes_per_token
from workbench.model.config import ModelConfig


def capacity_for_budget(config: ModelConfig, dtype: torch.dtype, budget_bytes: int,
                        max_len: int, block_size: int) -> dict:
    """Slots of ``max_len`` tokens and blocks of ``block_size`` tokens that ``budget_bytes`` buys."""
    per_token = kv_bytes_per_token(config, dtype)
    slots = budget_bytes // (per_token * max_len)
    blocks = budget_bytes // (per_token * block_size)
    if slots < 1:
        raise WorkbenchError(f"a KV budget of {budget_bytes / 2**20:.1f} MiB holds no "
                             f"{max_len}-token sequence ({per_token * max_len / 2**20:.1f} MiB each)")
    return {"bytes_per_token": per_token, "slots": int(slots), "blocks": int(blocks),
            "tokens": int(blocks * block_size)}


def kv_summary(history: list[dict]) -> dict:
    """Real fraction, waste and batch sizes over a run's per-step KV records."""
    if not history:
        return {"steps": 0}
    tokens = sum(h["tokens"] for h in history)
    reserved = sum(h["reserved"] for h in history)
    capacity = sum(h["capacity"] for h in history)
    return {
        "steps": len(history),
        "real_fraction": tokens / max(1, reserved),  # of the reserved memory, real tokens
        "reservation_waste_fraction": (reserved - tokens) / max(1, reserved),
        "mean_reserved_fraction": reserved / max(1, capacity),  # of the pool, held by someone
        "peak_reserved_fraction": max(h["reserved"] / max(1, h["capacity"]) for h in history),
        "mean_running": sum(h["running"] for h in history) / len(history),
        "peak_running": max(h["running"] for h in history),
        "preemptions": sum(h["preempted"] for h in history),
    }
