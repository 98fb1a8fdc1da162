"""The attention computation itself: softmax(q k^T / sqrt(d) + mask) v, through PyTorch's SDPA.

``scaled_dot_product_attention`` picks a fused kernel (FlashAttention, memory-efficient, or the
plain math path on CPU). Grouped-query attention is handled by ``enable_gqa``: each key/value head
serves ``H / Hkv`` query heads without copying it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
         causal: bool = False) -> torch.Tensor:
    """q [B, H, T, d], k/v [B, Hkv, S, d], mask [B, 1, T, S] bool or None -> [B, H, T, d].

    ``causal`` (used only without a mask) means the T queries are the last T of the S keys;
    with T == 1 nothing needs masking, and with T == S it is the usual lower triangle.
    """
    T, S = q.shape[2], k.shape[2]
    if mask is None and causal and T > 1 and T != S:
        raise ValueError("a multi-token step after cached tokens needs an explicit mask")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                          is_causal=mask is None and causal and T > 1,
                                          enable_gqa=q.shape[1] != k.shape[1])
