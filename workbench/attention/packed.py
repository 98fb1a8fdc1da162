"""Two ways to put ragged sequences into one forward pass: padding and packing.

* **Padded** ([B, P]): every row is stretched to the longest sequence P with pad tokens that a
  mask hides (:func:`padded_batch`). Decoders pad on the *left*, so that every row's newest token
  sits in the last column and the next token of every row goes into the same new column.
* **Packed / varlen** ([1, N], N = the sum of the new tokens): sequences are concatenated in one
  row, with :func:`~workbench.attention.masks.packed_positions` restarting the positions and
  :func:`~workbench.attention.masks.packed_causal_mask` keeping each sequence to its own keys
  (:func:`packed_batch`). A prefill chunk of a new request can then sit next to one decode token
  of each running request: the layout of continuous batching (vLLM, SGLang, Orca).

:class:`PackedKVCache` is the dense reference for a packed batch with a KV cache: it keeps each
sequence's keys and values and lays them out sequence after sequence, so that one [1, 1, N, S]
mask applies. Engines do the same attention without a dense mask (slots or pages, varlen kernels).
:func:`batch_waste` counts what each layout computes for given lengths. Taught in notebook 01.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from workbench.attention.masks import (cu_seqlens, packed_causal_mask, packed_positions,
                                       padded_causal_mask, padded_sliding_window_mask,
                                       sliding_window_mask)
from workbench.errors import WorkbenchError
from workbench.kv.base import KVCache
from workbench.model.batch import ForwardBatch
from workbench.model.llama import LlamaModel

__all__ = ["PackedKVCache", "batch_waste", "last_token_indices", "packed_batch", "padded_batch",
           "reference_logits", "split_packed", "time_layouts"]


def padded_batch(prompts: Sequence[Sequence[int]], pad_id: int = 0, side: str = "left",
                 window: int | None = None,
                 device: torch.device | str = "cpu") -> tuple[ForwardBatch, torch.Tensor]:
    """A [B, P] prefill batch of token-id lists padded to the longest, and ``valid`` [B, P].

    Positions count real tokens only (a left-padded row's first real token is at 0). The mask
    hides the pads (and keys outside a sliding ``window``, if given).
    """
    if side not in ("left", "right"):
        raise WorkbenchError(f"side must be 'left' or 'right', got {side!r}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise WorkbenchError("padded_batch needs at least one prompt and no empty prompt")
    P = max(map(len, prompts))
    rows, flags = [], []
    for p in prompts:
        pad, real = [pad_id] * (P - len(p)), list(p)
        rows.append(pad + real if side == "left" else real + pad)
        flags.append([False] * len(pad) + [True] * len(real) if side == "left"
                     else [True] * len(real) + [False] * len(pad))
    input_ids = torch.tensor(rows, device=device)  # [B, P]
    valid = torch.tensor(flags, device=device)  # [B, P]
    positions = (valid.cumsum(1) - 1).clamp(min=0)  # [B, P]
    mask = (padded_causal_mask(valid, P) if window is None
            else padded_sliding_window_mask(valid, P, window))  # [B, 1, P, P]
    return ForwardBatch(input_ids, positions, mask), valid


def packed_batch(new_tokens: Sequence[Sequence[int]], context_lens: Sequence[int] | None = None,
                 window: int | None = None, device: torch.device | str = "cpu") -> ForwardBatch:
    """One row [1, N] holding every sequence's new tokens, with packed positions and mask.

    ``context_lens[i]`` is sequence i's length after this step (cached tokens + new ones);
    it defaults to the new tokens alone (fresh prefills, no KV cache needed).
    """
    query_lens = [len(t) for t in new_tokens]
    ids = torch.tensor([[tok for seq in new_tokens for tok in seq]], device=device)  # [1, N]
    return ForwardBatch(input_ids=ids,
                        positions=packed_positions(query_lens, context_lens, device),
                        mask=packed_causal_mask(query_lens, context_lens, window, device))


def last_token_indices(query_lens: Sequence[int],
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """[n] columns of each sequence's last new token in a packed row: ``cu_seqlens[1:] - 1``."""
    return cu_seqlens(query_lens, device)[1:].long() - 1


def split_packed(x: torch.Tensor, query_lens: Sequence[int]) -> list[torch.Tensor]:
    """Split a packed [1, N, ...] tensor (logits, hidden states) into [q_i, ...] per sequence."""
    return list(x[0].split(list(query_lens)))


@torch.inference_mode()
def reference_logits(model: LlamaModel, ids: Sequence[int],
                     window: int | None = None) -> torch.Tensor:
    """Logits [T, vocab] of one sequence *alone*: one unpadded row, positions 0..T-1, causal
    attention (or within a sliding ``window``). What every batched layout must reproduce."""
    batch = ForwardBatch.prefill(torch.tensor([list(ids)], device=model.device))
    if window is not None:
        batch.mask = sliding_window_mask(len(ids), window=window, device=model.device)[None, None]
    return model(batch)[0]


@torch.inference_mode()
def time_layouts(model: LlamaModel, prompts: Sequence[Sequence[int]], repeats: int = 5,
                 warmup: int = 1) -> dict[str, float]:
    """Median seconds of one prefill forward pass of ``prompts``, left-padded ([B, P]) and packed
    ([1, N] with a dense mask); both compute the logits of each prompt's last token only."""
    from workbench.hardware import _median_seconds

    padded, _ = padded_batch(prompts, device=model.device)
    packed = packed_batch(prompts, device=model.device)
    last = last_token_indices([len(p) for p in prompts], model.device)

    def run_packed() -> torch.Tensor:
        x = model.run_layers(model.embed(packed), packed, None)  # [1, N, hidden]
        return model.head(x[:, last])  # [1, n, vocab]

    return {"padded_s": _median_seconds(lambda: model(padded, last_only=True), model.device,
                                        repeats, warmup),
            "packed_s": _median_seconds(run_packed, model.device, repeats, warmup)}


def batch_waste(lengths: Sequence[int]) -> dict[str, float | int]:
    """What a batch of ``lengths`` prefills computes when padded, when packed with a dense mask,
    and when packed with a varlen kernel that skips the off-diagonal blocks.

    Tokens decide the linear layers (projections, MLP: most FLOPs of a short prompt); attention
    scores decide softmax(QK^T)V. ``needed_scores`` are the causal pairs, sum l (l + 1) / 2.
    """
    lengths = list(lengths)
    B, P, N = len(lengths), max(lengths), sum(lengths)
    out: dict[str, float | int] = {
        "sequences": B, "longest": P,
        "padded_tokens": B * P, "packed_tokens": N,
        "padded_scores": B * P * P,  # every row attends over P columns, pads included
        "packed_dense_scores": N * N,  # one dense [N, N] mask: mostly masked-out blocks
        "varlen_scores": sum(n * n for n in lengths),  # only the diagonal blocks
        "needed_scores": sum(n * (n + 1) // 2 for n in lengths),
    }
    out["padding_token_waste"] = 1 - N / (B * P)  # fraction of padded tokens that are pads
    return out


class PackedKVCache(KVCache):
    """Per-sequence keys/values, returned sequence after sequence in the packed key layout.

    Before each forward pass, :meth:`schedule` names the sequences of the packed row and their new
    token counts, in row order; it returns their context lengths for :func:`packed_batch`::

        ctx = kv.schedule(["a", "b"], [5, 1])  # a: 5-token prefill, b: 1 decode token
        logits = model(packed_batch([a_ids, [b_next]], ctx), kv)

    Concatenating every sequence's whole past each step is the naive part: slot and paged
    storages read the keys in place instead.
    """

    def __init__(self, num_layers: int) -> None:
        self.k: list[dict[Hashable, torch.Tensor]] = [{} for _ in range(num_layers)]  # [Hkv, L, d]
        self.v: list[dict[Hashable, torch.Tensor]] = [{} for _ in range(num_layers)]
        self.lengths: dict[Hashable, int] = {}
        self.plan: list[tuple[Hashable, int]] = []

    def schedule(self, seq_ids: Sequence[Hashable], query_lens: Sequence[int]) -> list[int]:
        """Set the next step's sequences (row order) and new tokens; return context lengths."""
        if len(seq_ids) != len(query_lens) or len(set(seq_ids)) != len(seq_ids):
            raise WorkbenchError("schedule needs distinct sequence ids, one query length each")
        self.plan = list(zip(seq_ids, query_lens))
        return [self.lengths.get(s, 0) + n for s, n in self.plan]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        lens = [n for _, n in self.plan]
        if k.shape[0] != 1 or k.shape[2] != sum(lens):
            raise WorkbenchError(f"packed step of {k.shape[2]} tokens in {k.shape[0]} rows does "
                                 f"not match the schedule {self.plan}")
        keys, values = [], []
        for (seq, _), k_new, v_new in zip(self.plan, k[0].split(lens, 1), v[0].split(lens, 1)):
            if seq in self.k[layer]:  # [Hkv, L, d] + [Hkv, n, d] -> [Hkv, L + n, d]
                k_new = torch.cat([self.k[layer][seq], k_new], dim=1)
                v_new = torch.cat([self.v[layer][seq], v_new], dim=1)
            self.k[layer][seq], self.v[layer][seq] = k_new, v_new
            keys.append(k_new)
            values.append(v_new)
        return torch.cat(keys, 1)[None], torch.cat(values, 1)[None]  # [1, Hkv, S, d]

    def advance(self, batch: ForwardBatch) -> None:
        for seq, n in self.plan:
            self.lengths[seq] = self.lengths.get(seq, 0) + n
        self.plan = []

    def release(self, seq: Hashable) -> None:
        """Forget a finished sequence."""
        for store in (*self.k, *self.v):
            store.pop(seq, None)
        self.lengths.pop(seq, None)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in (*self.k, *self.v)
                   for t in store.values())
