"""Boolean attention masks (True = may attend), shaped [B, 1, T, S] for SDPA.

A causal mask lets query t see keys 0..t. With a KV cache the T queries are the *last* T of the S
keys, so query t sees keys 0..S-T+t. A padded batch also hides the pad columns of each row. Taught
in notebook 01 (masking); used by static batching since notebook 00.

Every mask here is one rule applied to (sequence, position) labels of queries and keys
(:func:`segment_mask`, the "document mask" of FlexAttention)::

    attend(q, k) = seq(q) == seq(k)  and  pos(k) <= pos(q)  [and  pos(q) - pos(k) < window]

* **packed (varlen)** batches put several sequences in one row of B = 1: sequence i brings
  ``query_lens[i]`` new tokens (a prefill chunk, or 1 decode token) that are the last of its
  ``context_lens[i]`` keys; keys and queries are laid out sequence after sequence. The result is
  block-diagonal, each block causal. FlashAttention's varlen kernels take the same layout as
  ``cu_seqlens`` offsets and skip the off-diagonal blocks instead of masking them.
* **sliding window** (Mistral, Gemma 2 local layers): a query sees only the last ``window`` keys up
  to itself, so the KV cache a query needs stays ``window`` long (rolling buffers, StreamingLLM
  in notebook 08).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.plug import pluggable

Device = torch.device | str


@pluggable("masks.causal")  # lab 01: a student's mask can run in the engine
def causal_mask(T: int, S: int | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """[T, S] lower-triangular mask for T queries that are the last T of S keys."""
    S = T if S is None else S
    q = torch.arange(S - T, S, device=device)[:, None]  # absolute index of each query
    return torch.arange(S, device=device)[None, :] <= q  # [T, S]


@pluggable("masks.padded")
def padded_causal_mask(valid: torch.Tensor, T: int) -> torch.Tensor:
    """Causal mask over rows with pad columns hidden: valid [B, S] -> [B, 1, T, S].

    A pad query (its own column invalid) would see no key at all: a softmax over nothing, NaN in a
    plain implementation (PyTorch's CPU SDPA returns zeros, other kernels need not); it is allowed to
    see itself instead. Its output is never used.
    """
    B, S = valid.shape
    mask = causal_mask(T, S, valid.device)[None] & valid[:, None, :]  # [B, T, S]
    own = torch.arange(S - T, S, device=valid.device)
    mask[:, torch.arange(T), own] |= ~valid[:, S - T:]  # pad query -> itself
    return mask[:, None]  # [B, 1, T, S]


# ----------------------------------------------------------------------------- sliding window


def _check_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise WorkbenchError(f"window must be a positive integer, got {window!r}")


def sliding_window_mask(T: int, S: int | None = None, window: int = 1,
                        device: Device = "cpu") -> torch.Tensor:
    """[T, S]: query t (the key at index q = S - T + t) sees keys q - window + 1 .. q.

    Each query sees at most ``window`` keys, itself included (Mistral's ``sliding_window``).
    With ``window >= S`` it is exactly :func:`causal_mask`.
    """
    _check_window(window)
    S = T if S is None else S
    q = torch.arange(S - T, S, device=device)[:, None]  # [T, 1] absolute index of each query
    k = torch.arange(S, device=device)[None, :]  # [1, S]
    return (k <= q) & (k > q - window)  # [T, S]


def padded_sliding_window_mask(valid: torch.Tensor, T: int, window: int) -> torch.Tensor:
    """:func:`padded_causal_mask` restricted to a sliding window: valid [B, S] -> [B, 1, T, S].

    The window counts columns. Pads sit before (left padding) or after (right padding) a row's
    real tokens, never between them, so the last ``window`` columns up to a real query are its
    last ``window`` real tokens. A pad query still sees only itself.
    """
    S = valid.shape[1]
    window_mask = sliding_window_mask(T, S, window, valid.device)  # [T, S]
    return padded_causal_mask(valid, T) & window_mask[None, None]  # [B, 1, T, S]


# ----------------------------------------------------------------------------- packed / varlen


def _check_lens(query_lens: Sequence[int], context_lens: Sequence[int]) -> None:
    if len(query_lens) != len(context_lens) or not query_lens:
        raise WorkbenchError(f"need one query length and one context length per sequence, got "
                             f"{list(query_lens)} and {list(context_lens)}")
    for i, (q, c) in enumerate(zip(query_lens, context_lens)):
        if not 1 <= q <= c:
            raise WorkbenchError(f"sequence {i}: needs 1 <= query_len <= context_len, got "
                                 f"query_len {q}, context_len {c}")


def cu_seqlens(lens: Sequence[int], device: Device = "cpu") -> torch.Tensor:
    """Cumulative offsets [0, l0, l0 + l1, ..., sum] (int32 [n + 1]), FlashAttention's name.

    Sequence i occupies rows ``cu[i]:cu[i + 1]`` of a packed tensor; ``flash_attn_varlen_func``
    takes ``cu_seqlens_q`` (over query_lens) and ``cu_seqlens_k`` (over context_lens).
    """
    lens_t = torch.as_tensor(list(lens), dtype=torch.int32, device=device)
    return torch.cat([torch.zeros(1, dtype=torch.int32, device=device),
                      lens_t.cumsum(0, dtype=torch.int32)])


def sequence_ids(lens: Sequence[int], device: Device = "cpu") -> torch.Tensor:
    """[sum(lens)]: the index of the sequence each packed row belongs to ([2, 1] -> [0, 0, 1])."""
    lens_t = torch.as_tensor(list(lens), device=device)
    return torch.repeat_interleave(torch.arange(len(lens_t), device=device), lens_t)


def _packed_range(starts: Sequence[int], lens: Sequence[int], device: Device) -> torch.Tensor:
    """[sum(lens)]: starts[i], starts[i] + 1, ... (lens[i] of them) for each i, concatenated."""
    ids = sequence_ids(lens, device)  # [N]
    offsets = cu_seqlens(lens, device).long()  # [n + 1]
    local = torch.arange(len(ids), device=device) - offsets[ids]  # index within its sequence
    return torch.as_tensor(list(starts), device=device)[ids] + local


def packed_positions(query_lens: Sequence[int], context_lens: Sequence[int] | None = None,
                     device: Device = "cpu") -> torch.Tensor:
    """RoPE positions [1, N] of a packed batch: sequence i's new tokens are at
    ``context_lens[i] - query_lens[i] .. context_lens[i] - 1`` (a fresh prefill starts at 0)."""
    context_lens = query_lens if context_lens is None else context_lens
    _check_lens(query_lens, context_lens)
    starts = [c - q for q, c in zip(query_lens, context_lens)]
    return _packed_range(starts, query_lens, device)[None]  # [1, N]


def segment_mask(q_seq: torch.Tensor, q_pos: torch.Tensor, k_seq: torch.Tensor,
                 k_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """The one rule behind every mask here: q_seq/q_pos [N], k_seq/k_pos [S] -> [N, S].

    A query sees a key of its own sequence at the same or an earlier position, and, with a
    ``window``, fewer than ``window`` positions back.
    """
    same = q_seq[:, None] == k_seq[None, :]  # [N, S]
    back = q_pos[:, None] - k_pos[None, :]  # [N, S] how far back the key is
    mask = same & (back >= 0)
    if window is not None:
        _check_window(window)
        mask &= back < window
    return mask


@pluggable("masks.packed")
def packed_causal_mask(query_lens: Sequence[int], context_lens: Sequence[int] | None = None,
                       window: int | None = None, device: Device = "cpu") -> torch.Tensor:
    """Block-diagonal causal mask [1, 1, N, S] of a packed batch (N = sum(query_lens),
    S = sum(context_lens); ``context_lens`` defaults to ``query_lens``: all fresh prefills).

    Query j of sequence i is the key at index ``context_lens[i] - query_lens[i] + j`` of its own
    sequence and sees that sequence's keys up to it (only the last ``window`` with a window).
    A decode token (query_len 1) sees its whole context: its row is one full block row.
    """
    context_lens = query_lens if context_lens is None else context_lens
    q_pos = packed_positions(query_lens, context_lens, device)[0]  # [N]
    k_pos = _packed_range([0] * len(context_lens), context_lens, device)  # [S]
    mask = segment_mask(sequence_ids(query_lens, device), q_pos,
                        sequence_ids(context_lens, device), k_pos, window)  # [N, S]
    return mask[None, None]  # [1, 1, N, S]


def mask_text(mask: torch.Tensor, row: int = 0, on: str = "1", off: str = ".") -> str:
    """A [T, S] mask (or row ``row`` of a [B, 1, T, S] one) as text, one line per query."""
    m = mask[row, 0] if mask.dim() == 4 else mask  # [T, S]
    return "\n".join("".join(on if x else off for x in row) for row in m.tolist())
