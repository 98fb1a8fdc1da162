"""Boolean attention masks (True = may attend), shaped [B, 1, T, S] for SDPA.

A causal mask lets query t see keys 0..t. With a KV cache the T queries are the *last* T of the S
keys, so query t sees keys 0..S-T+t. A padded batch also hides the pad columns of each row. Taught
in notebook 01 (masking); used by static batching since notebook 00.
"""

from __future__ import annotations

import torch


def causal_mask(T: int, S: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """[T, S] lower-triangular mask for T queries that are the last T of S keys."""
    S = T if S is None else S
    q = torch.arange(S - T, S, device=device)[:, None]  # absolute index of each query
    return torch.arange(S, device=device)[None, :] <= q  # [T, S]


def padded_causal_mask(valid: torch.Tensor, T: int) -> torch.Tensor:
    """Causal mask over rows with pad columns hidden: valid [B, S] -> [B, 1, T, S].

    A pad query (its own column invalid) would see no key at all and SDPA would return NaN for it;
    it is allowed to see itself instead. Its output is never used.
    """
    B, S = valid.shape
    mask = causal_mask(T, S, valid.device)[None] & valid[:, None, :]  # [B, T, S]
    own = torch.arange(S - T, S, device=valid.device)
    mask[:, torch.arange(T), own] |= ~valid[:, S - T:]  # pad query -> itself
    return mask[:, None]  # [B, 1, T, S]
