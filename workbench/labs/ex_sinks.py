"""Lab 08 (attention sinks, StreamingLLM): which tokens the rolling cache keeps, and where.

References: :func:`workbench.streaming.cache.kept_tokens` (the eviction rule: sinks + the recent
window; what ``SinkKVCache.token_indices`` reports) and :func:`workbench.streaming.cache.
slot_positions` (the position of each ring slot once tokens have been evicted, which the decoding
cache rotates its keys by every step: a plug-in point). Taught in notebook 08.
"""

from __future__ import annotations

import random

import workbench.streaming.cache  # noqa: F401 - registers the plug-in point
from workbench.labs.check import Exercise, register
from workbench.plug import library
from workbench.streaming.cache import kept_tokens


def _stream_case(rng: random.Random) -> dict:
    sinks, window = rng.choice([0, 1, 4, rng.randint(0, 5)]), rng.randint(1, 8)
    capacity = sinks + window
    seen = rng.choice([rng.randint(0, capacity), rng.randint(capacity, 4 * capacity)])
    return {"seen": seen, "sinks": sinks, "window": window}


_EDGES = ({"seen": 0, "sinks": 4, "window": 4}, {"seen": 2, "sinks": 4, "window": 4},
          {"seen": 8, "sinks": 4, "window": 4}, {"seen": 9, "sinks": 4, "window": 4},
          {"seen": 13, "sinks": 0, "window": 5}, {"seen": 6, "sinks": 2, "window": 1})

KEPT = register(Exercise(
    name="sinks.kept",
    title="which stream tokens a sinks + window cache holds",
    reference=kept_tokens,
    cases=_stream_case,
    edge_cases=_EDGES,
    hints=(
        "After `seen` tokens (stream indices 0 .. seen - 1) the cache holds the first `sinks` "
        "tokens and the last `window` ones; return their indices in increasing order.",
        "Early in the stream there are fewer than `sinks` tokens, and the window must not hold "
        "a sink a second time: the window starts at max(sinks, seen - window).",
        "list(range(min(seen, sinks))) + list(range(max(sinks, seen - window), seen)).",
    ),
    notebook="08_streaming_llm",
))

POSITIONS = register(Exercise(
    name="sinks.positions",
    title="position of each cache slot after eviction (ring buffer)",
    reference=library("sinks.positions"),
    cases=_stream_case,
    edge_cases=_EDGES,
    hints=(
        "Before the cache is full (seen <= sinks + window) slot s holds token s at position s: "
        "return torch.arange(seen).",
        "Once full, sink slots keep positions 0 .. sinks - 1. Window token P >= sinks sits in "
        "slot sinks + (P - sinks) % window; the newest one (P = seen - 1) gets position "
        "sinks + window - 1, the one before it one less, and so on.",
        "For each window slot, age = (newest_slot - slot) % window; its position is "
        "sinks + window - 1 - age. Return an int64 tensor of sinks + window positions in slot order.",
    ),
    plug="sinks.positions",
    notebook="08_streaming_llm",
))
