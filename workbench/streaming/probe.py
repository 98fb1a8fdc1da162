"""The model's attention probabilities, to see the attention sinks (notebook 08).

SDPA never materializes ``softmax(q k^T / sqrt(d) + mask)``, so :class:`AttentionProbe` is a KV
"storage" that keeps nothing and computes the attention of a full forward pass explicitly,
recording the probabilities of every layer. The model itself is unchanged: it hands its (rotated)
queries and keys to the probe as it would to any KV cache, and the probe returns ``probs @ v``,
which equals what SDPA returns (a test checks the logits).

StreamingLLM's observation, visible here: many heads put a large share of their attention on the
first token(s) whatever they say. Softmax must give every query a total weight of 1; the first
tokens, seen by every later query, become the place to put weight that is not needed elsewhere.
"""

from __future__ import annotations

import math

import torch

from workbench.kv.base import KVCache
from workbench.model.batch import ForwardBatch
from workbench.model.llama import LlamaModel


class AttentionProbe(KVCache):
    """Records ``probs[layer]`` [B, H, T, T] of one causal forward pass (no cache kept)."""

    def __init__(self) -> None:
        self.probs: dict[int, torch.Tensor] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v  # nothing is kept: each layer attends among the step's own tokens

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        B, H, T, d = q.shape
        kv_heads = k.shape[1]
        G = H // kv_heads  # query heads per kv head
        scores = (q.view(B, kv_heads, G, T, d).float()
                  @ k[:, :, None].float().transpose(-1, -2)) / math.sqrt(d)  # [B, Hkv, G, T, T]
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        mask = causal if batch.mask is None else batch.mask[:, :, None]  # [B, 1, 1, T, T]
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        self.probs[layer] = probs.reshape(B, H, T, T)
        out = probs @ v[:, :, None].float()  # [B, Hkv, G, T, d]
        return out.to(q.dtype).reshape(B, H, T, d)

    def advance(self, batch: ForwardBatch) -> None:
        """Nothing to do: the probe keeps no tokens."""

    def nbytes(self) -> int:
        return 0


@torch.inference_mode()
def attention_maps(model: LlamaModel, ids: torch.Tensor) -> torch.Tensor:
    """Attention probabilities [L, H, T, T] (float32, CPU) of ``ids`` [T] read from position 0."""
    probe = AttentionProbe()
    model(ForwardBatch.prefill(ids.to(model.device)[None]), probe)
    return torch.stack([probe.probs[i][0].cpu() for i in range(len(model.layers))])


def sink_share(probs: torch.Tensor, sinks: int = 4, skip: int | None = None) -> torch.Tensor:
    """Mean attention [L, H] that queries put on the first ``sinks`` keys, over queries
    ``t >= skip`` (default ``4 * sinks``, so that the first tokens, which see little else, do not
    count). Uniform attention would give each query ``sinks / (t + 1)``."""
    skip = 4 * sinks if skip is None else skip
    return probs[..., skip:, :sinks].sum(-1).mean(-1)


def uniform_share(num_tokens: int, sinks: int = 4, skip: int | None = None) -> float:
    """What :func:`sink_share` would be if every query spread its attention evenly."""
    skip = 4 * sinks if skip is None else skip
    t = torch.arange(skip, num_tokens, dtype=torch.float64)
    return float((sinks / (t + 1)).mean())
