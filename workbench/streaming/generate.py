"""Greedy generation through a rolling cache: it goes on past the trained context, in constant
memory (notebook 08). The prompt is fed in one chunk, then one token per step."""

from __future__ import annotations

import torch

from workbench.model.llama import LlamaModel
from workbench.streaming.cache import SinkKVCache


@torch.inference_mode()
def generate_streaming(model: LlamaModel, cache: SinkKVCache, prompt_ids: list[int],
                       max_new_tokens: int, stop_at_eos: bool = False) -> list[int]:
    """Greedy continuation of ``prompt_ids`` (a fresh ``cache``); returns the new token ids.

    ``stop_at_eos`` ends at the model's EOS; by default generation runs on through it, as a
    stream of documents would.
    """
    if not prompt_ids:
        raise ValueError("generate_streaming needs a non-empty prompt")
    if cache.seen:
        raise ValueError("generate_streaming needs a fresh cache")
    eos = set(model.config.eos_token_ids)
    x = torch.tensor([prompt_ids], device=model.device)  # [1, T]
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(cache.next_batch(x), cache, last_only=True)  # [1, V]
        x = logits.argmax(-1, keepdim=True)  # [1, 1]
        out.append(int(x))
        if stop_at_eos and out[-1] in eos:
            break
    return out
