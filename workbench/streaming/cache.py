"""StreamingLLM's rolling KV cache: ``sinks`` first tokens + the most recent ``window`` tokens.

Positions are assigned *within the cache*, not in the stream. With k sinks and a window of w::

    sink i                                 -> position i                  (i < k)
    window keys, oldest to newest          -> positions k, k + 1, ..., k + w - 1
    a query                                -> the position of its own key (the newest)

so no position ever exceeds k + w - 1 (inside the trained context when k + w <= it), a query is
still at the true distance from every window key, and the sinks sit just before the window.

**Design choice: keys are cached before RoPE and rotated at attention time** (what the paper's
code does), rather than cached rotated and re-rotated by one position at each eviction (what
transformers' former ``SinkCache`` did). A key stays in the window for w steps: re-rotating it
each step rounds it w times (a thousand times at w = 1,020), which bfloat16 cannot afford, while
rotating the raw key once per step at its current position is exactly what the plain model does
to a key at that position. The price is one elementwise pass over the cache per layer and step,
the same order as reading the cache for attention. The model hands raw q and k to a storage whose
``rotates_keys`` is True (``Attention.forward``).

Storage per layer: raw keys and values [B, Hkv, k + w, d]; slots 0..k-1 hold the sinks and slots
k..k+w-1 are a ring over the window, so evicting the oldest token is writing over its slot.

Two attention paths, equal in exact arithmetic (the tests check it):

* **one new token** (decoding): rotate every held key at its slot's position, the query at the
  newest position, one SDPA over the held slots;
* **T new tokens** (scoring a chunk, a prompt): each query sees the sinks and its own last w
  tokens. Its distance to window key j is P - j (P its stream index) and to sink i it is
  ``min(P, k + w - 1) - i``, so the query is rotated twice: once for the sink columns, once for
  the window columns, and the two score blocks share one softmax.

Taught in notebook ``08_streaming_llm``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.attention.sdpa import sdpa
from workbench.errors import WorkbenchError
from workbench.kv.base import KVCache
from workbench.model.batch import ForwardBatch
from workbench.model.config import ModelConfig
from workbench.model.rope import apply_rope, inverse_frequencies, rope_cos_sin
from workbench.plug import pluggable


@dataclass(frozen=True)
class StreamingConfig:
    """k attention sinks (the paper uses 4) and a window of the w most recent tokens."""

    sinks: int = 4
    window: int = 1020

    def __post_init__(self) -> None:
        for name, low in (("sinks", 0), ("window", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise WorkbenchError(f"streaming cache: {name} must be an integer >= {low}, "
                                     f"got {value!r}")

    @property
    def capacity(self) -> int:
        """Tokens the cache holds at most (and the largest position + 1): sinks + window."""
        return self.sinks + self.window


def kept_tokens(seen: int, sinks: int, window: int) -> list[int]:
    """Stream indices held after ``seen`` tokens, in position order: the first ``sinks`` tokens
    (fewer while the stream is shorter), then the last ``window`` tokens after them. Every other
    token has been evicted; nothing is held twice. Lab 08."""
    return list(range(min(seen, sinks))) + list(range(max(sinks, seen - window), seen))


@pluggable("sinks.positions")  # lab 08: a student's positions can run in the decoding cache
def slot_positions(seen: int, sinks: int, window: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Cache positions [min(seen, sinks + window)] of the slots, in slot order, after ``seen`` tokens.

    Slots 0..k-1 hold the sinks at positions 0..k-1. Slots k..k+w-1 are a ring: stream token
    ``P >= k`` sits in slot ``k + (P - k) % w``. Before the cache is full slot s holds token s
    at position s; once full, the window's tokens take positions k .. C - 1 (C = k + w) by age, the
    newest (token ``seen - 1``) at C - 1: a slot whose token is ``age`` steps older than the newest
    is at position ``C - 1 - age``. RoPE rotates each held key at its slot's position every decode
    step (notebook 08).
    """
    C = sinks + window
    slots = torch.arange(min(seen, C), device=device)  # [S]
    if seen <= C:  # nothing evicted yet: slot s holds token s at position s
        return slots
    newest = sinks + (seen - 1 - sinks) % window  # the slot the newest token was written to
    age = (newest - slots[sinks:]) % window  # [w] 0 for the newest token
    return torch.cat([slots[:sinks], C - 1 - age])  # [C]


class SinkKVCache(KVCache):
    """A fixed-size KV cache for an endless stream: ``sinks`` + the last ``window`` tokens.

    ``StreamingConfig(sinks=0, window=w)`` is plain window attention (the baseline that breaks
    down once the first tokens are evicted). Every row of a batch advances together.
    """

    rotates_keys = True  # the model hands over q and k before RoPE

    def __init__(self, config: ModelConfig, streaming: StreamingConfig, batch_size: int = 1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        if streaming.capacity > config.max_position_embeddings:
            raise WorkbenchError(
                f"streaming cache: sinks + window = {streaming.capacity} exceeds the model's "
                f"context of {config.max_position_embeddings} positions; positions in the cache "
                f"would leave the trained range")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise WorkbenchError(f"streaming cache: batch_size must be >= 1, got {batch_size!r}")
        self.sinks, self.window = streaming.sinks, streaming.window
        self.capacity = streaming.capacity
        shape = (batch_size, config.num_key_value_heads, self.capacity, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype)  # raw keys, before RoPE
                  for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype)
                  for _ in range(config.num_hidden_layers)]
        self.inv_freq = inverse_frequencies(config).to(device)
        positions = torch.arange(self.capacity, device=device)[None]  # [1, C]
        self._cos, self._sin = rope_cos_sin(self.inv_freq, positions, dtype)  # [1, C, d] each
        self._slots = torch.arange(self.capacity, device=device)  # [C]
        self.seen = 0  # stream tokens fed so far
        self._rope: tuple | None = None  # this step's (seen, cos/sin of keys and query)
        self._seen_t: torch.Tensor | None = None  # the same count on the device (graph mode)

    def graph_mode(self) -> None:
        """From now on the slot written and the keys' positions come from a device copy of ``seen``:
        with a full cache a decode step is a fixed kernel sequence, capturable in a CUDA graph.
        A replay advances the device count only: the caller adds to ``seen`` per replay."""
        if self.seen < self.capacity:
            raise WorkbenchError(f"graph mode needs a full cache ({self.capacity} tokens), "
                                 f"{self.seen} seen")
        self._seen_t = torch.tensor(self.seen, device=self._slots.device)

    # ------------------------------------------------------------------ bookkeeping

    def slot_of(self, index: int) -> int:
        """The slot that holds stream token ``index`` (while it is held)."""
        k = self.sinks
        return index if index < k else k + (index - k) % self.window

    def _device_slot(self) -> torch.Tensor:
        """Graph mode: :meth:`slot_of` the token being written, from the device count."""
        return self.sinks + (self._seen_t - self.sinks) % self.window

    def token_indices(self) -> list[int]:
        """Stream indices of the held tokens in position order: sinks, then the window."""
        return kept_tokens(self.seen, self.sinks, self.window)

    def next_positions(self, num_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Cache positions [1, T] of the next T tokens' queries: ``min(P, capacity - 1)``."""
        stream = torch.arange(self.seen, self.seen + num_tokens, device=device)
        return stream.clamp(max=self.capacity - 1)[None]

    def next_batch(self, input_ids: torch.Tensor) -> ForwardBatch:
        """The :class:`ForwardBatch` that feeds ``input_ids`` [B, T] to the model with this cache.

        Its positions are the queries' cache positions (the cache applies RoPE itself; they are
        made on the device, so a step never waits for a host-to-device copy)."""
        positions = self.next_positions(input_ids.shape[1], input_ids.device)  # [1, T]
        return ForwardBatch(input_ids=input_ids, positions=positions.expand(input_ids.shape[0], -1))

    # ------------------------------------------------------------------ one new token

    def _decode_rope(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos/sin [1, S, d] of the held slots' positions and [1, 1, d] of the query (memoized
        per step: every layer uses the same)."""
        if self._rope is not None and self._rope[0] == self.seen:
            return self._rope[1:]
        P, C = self.seen, self.capacity  # token P is being written now
        if self._seen_t is not None:  # slot_positions(P + 1, ...) from the device count
            k, w = self.sinks, self.window
            age = (self._device_slot() - self._slots[k:]) % w  # [w] 0 for token P's slot
            pos = torch.cat([self._slots[:k], C - 1 - age])  # [C]
            cos_k, sin_k = self._cos[:, pos], self._sin[:, pos]  # [1, C, d]
            cos_q, sin_q = self._cos[:, C - 1:], self._sin[:, C - 1:]
        elif P < C:  # nothing evicted yet: slot s holds token s at position s
            cos_k, sin_k = self._cos[:, :P + 1], self._sin[:, :P + 1]
            cos_q, sin_q = self._cos[:, P:P + 1], self._sin[:, P:P + 1]
        else:  # full: the newest token is at position C - 1, the one before it at C - 2, ...
            pos = slot_positions(P + 1, self.sinks, self.window, self._slots.device)  # [C]
            cos_k, sin_k = self._cos[:, pos], self._sin[:, pos]  # [1, C, d]
            cos_q, sin_q = self._cos[:, C - 1:], self._sin[:, C - 1:]
        tables = tuple(t.to(dtype) for t in (cos_k, sin_k, cos_q, sin_q))
        self._rope = (self.seen, *tables)
        return tables

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """One new token: write its raw k/v [B, Hkv, 1, d] over the oldest window token; return
        the held keys rotated at their positions and the values, [B, Hkv, S, d] in slot order."""
        if k.shape[2] != 1:
            raise ValueError("SinkKVCache.update takes one token; attend() handles chunks")
        if self._seen_t is not None:  # graph mode: the slot from the device count
            slot = self._device_slot().view(1)
            self.k[layer].index_copy_(2, slot, k)
            self.v[layer].index_copy_(2, slot, v)
        else:
            slot = self.slot_of(self.seen)
            self.k[layer][:, :, slot] = k[:, :, 0]
            self.v[layer][:, :, slot] = v[:, :, 0]
        held = min(self.seen + 1, self.capacity)
        cos_k, sin_k, _, _ = self._decode_rope(k.dtype)
        keys = apply_rope(self.k[layer][:, :, :held], cos_k, sin_k)  # [B, Hkv, S, d]
        return keys, self.v[layer][:, :, :held]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> torch.Tensor:
        """Raw q [B, H, T, d], k/v [B, Hkv, T, d] of the next T stream tokens -> [B, H, T, d]."""
        if q.shape[2] > 1:
            return self._attend_chunk(layer, q, k, v)
        keys, values = self.update(layer, k, v, batch)
        _, _, cos_q, sin_q = self._decode_rope(q.dtype)
        return sdpa(apply_rope(q, cos_q, sin_q), keys, values)  # one query sees every held key

    # ------------------------------------------------------------------ T new tokens

    def _attend_chunk(self, layer: int, q: torch.Tensor, k_new: torch.Tensor,
                      v_new: torch.Tensor) -> torch.Tensor:
        """T stream tokens at once, raw q [B, H, T, d], k/v [B, Hkv, T, d] -> [B, H, T, d].

        Keys: the sinks, then the window's held tokens and the new ones in stream order; each
        query sees sinks up to itself and the last ``window`` tokens up to itself. Scores are
        computed explicitly, as two blocks with differently rotated queries and one softmax.
        """
        B, H, T, d = q.shape
        kv_heads, ks, w, C, n = k_new.shape[1], self.sinks, self.window, self.capacity, self.seen
        dev = q.device
        P = torch.arange(n, n + T, device=dev)  # [T] stream index of each query
        # keys in stream order: held sinks + new sinks, then held window + new window tokens
        new_sinks = max(0, min(ks, n + T) - n)  # new tokens that become sinks
        held_win = torch.arange(min(n, max(ks, n - w)), n, device=dev)  # [Sw0] held window tokens
        slots = ks + (held_win - ks) % w
        k_sink = torch.cat([self.k[layer][:, :, :min(n, ks)], k_new[:, :, :new_sinks]], dim=2)
        v_sink = torch.cat([self.v[layer][:, :, :min(n, ks)], v_new[:, :, :new_sinks]], dim=2)
        k_win = torch.cat([self.k[layer][:, :, slots], k_new[:, :, new_sinks:]], dim=2)
        v_win = torch.cat([self.v[layer][:, :, slots], v_new[:, :, new_sinks:]], dim=2)
        sink_idx = torch.arange(k_sink.shape[2], device=dev)  # [Ss]
        win_idx = torch.cat([held_win, P[new_sinks:]])  # [Sw]
        self._store(layer, k_new, v_new)  # after the gathers above: it overwrites old slots

        # distances: window key j at P - j (shift both by `base` to keep angles small),
        # sink i at min(P, C - 1) - i
        oldest = max(ks, n - w) if n > ks else n + new_sinks  # oldest window key (if any)
        base = max(0, oldest - ks)
        q_sink = self._rotate(q, P.clamp(max=C - 1))
        q_win = self._rotate(q, P - base)
        k_sink = self._rotate(k_sink, sink_idx)
        k_win = self._rotate(k_win, win_idx - base)
        sink_mask = sink_idx[None, :] <= P[:, None]  # [T, Ss]
        win_mask = (win_idx[None, :] <= P[:, None]) & (win_idx[None, :] > P[:, None] - w)  # [T, Sw]

        G = H // kv_heads  # query heads per kv head; head h reads kv head h // G
        q_sink = q_sink.view(B, kv_heads, G, T, d).float()
        q_win = q_win.view(B, kv_heads, G, T, d).float()
        scores = torch.cat([q_sink @ k_sink[:, :, None].float().transpose(-1, -2),
                            q_win @ k_win[:, :, None].float().transpose(-1, -2)],
                           dim=-1) / math.sqrt(d)  # [B, Hkv, G, T, Ss + Sw]
        mask = torch.cat([sink_mask, win_mask], dim=1)  # [T, Ss + Sw]
        probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        values = torch.cat([v_sink, v_win], dim=2)[:, :, None].float()  # [B, Hkv, 1, S, d]
        out = (probs @ values).to(q.dtype)  # [B, Hkv, G, T, d]
        return out.reshape(B, H, T, d)

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE of x [B, heads, S, d] at ``positions`` [S]."""
        cos, sin = rope_cos_sin(self.inv_freq, positions[None], x.dtype)  # [1, S, d]
        return apply_rope(x, cos, sin)

    def _store(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Write the raw k/v of tokens seen..seen+T-1 that stay held: new sinks, and the last
        ``window`` of the others."""
        n, T, ks = self.seen, k_new.shape[2], self.sinks
        new_sinks = max(0, min(ks, n + T) - n)
        if new_sinks:
            self.k[layer][:, :, n:n + new_sinks] = k_new[:, :, :new_sinks]
            self.v[layer][:, :, n:n + new_sinks] = v_new[:, :, :new_sinks]
        first = max(n + new_sinks, n + T - self.window)  # oldest new token that stays
        if first < n + T:
            idx = torch.arange(first, n + T, device=k_new.device)
            slots = ks + (idx - ks) % self.window
            self.k[layer][:, :, slots] = k_new[:, :, first - n:]
            self.v[layer][:, :, slots] = v_new[:, :, first - n:]

    # ------------------------------------------------------------------ KVCache

    def advance(self, batch: ForwardBatch) -> None:
        self.seen += batch.input_ids.shape[1]
        if self._seen_t is not None:
            self._seen_t += batch.input_ids.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
