"""A measured engine run against the predictor, step by step (notebook ``09_serving_capstone``).

The continuous engine records every step (``ContinuousEngine.kv_history``): when it ended, how
many sequences decoded, how many prompt tokens it prefilled, how many keys attention read and the
host time spent scheduling and packing. Each step's measured time is the gap between two step ends
(so it includes that host work, as a served request sees it); its floor is
:func:`workbench.whatif.predict.step_cost` for the same shape. A decode step of ``B`` sequences
that read ``K`` keys in all is ``(B, 1, K / B - 1)``: ``B`` rows, one new token each, after ``K / B
- 1`` cached tokens on average (step cost is linear in the context). A prefill of ``n`` tokens
is taken as ``round(n / prompt_len)`` prompts of ``prompt_len`` tokens (the record keeps the total
only); prompts start from an empty cache (no chunked prefill, prefix cache or preemption).
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from workbench.errors import WorkbenchError
from workbench.whatif.predict import Scenario, step_cost

__all__ = ["by_batch", "compare_steps", "step_records"]


def step_records(history: list[dict]) -> list[dict]:
    """One dict per step of an engine run: ``kind`` ("decode", "prefill" or "mixed"), ``decodes``,
    ``prefill_tokens``, ``cached`` (mean cached tokens of the decoding rows), ``measured_s`` (since
    the previous step ended) and ``host_s``."""
    if not history:
        raise WorkbenchError("the run recorded no steps (ContinuousEngine.kv_history is empty)")
    rows, previous = [], 0.0
    for i, h in enumerate(history):
        decodes, prefill = h["decodes"], h["prefill_tokens"]
        # keys read by the decoding rows: all keys read minus the prefill part (new tokens only,
        # since prompts start with an empty cache here)
        decode_keys = h["context"] - prefill
        kind = "mixed" if decodes and prefill else ("decode" if decodes else "prefill")
        rows.append({"step": i, "kind": kind, "decodes": decodes, "prefill_tokens": prefill,
                     "cached": decode_keys / decodes - 1 if decodes else 0.0,
                     "measured_s": h["t"] - previous, "host_s": h["host_s"]})
        previous = h["t"]
    return rows


def _parts(row: dict, prompt_len: int) -> list[tuple[int, float, float]]:
    parts = []
    if row["decodes"]:
        parts.append((row["decodes"], 1, max(row["cached"], 0.0)))
    if row["prefill_tokens"]:
        prompts = max(1, round(row["prefill_tokens"] / prompt_len))
        parts.append((prompts, row["prefill_tokens"] / prompts, 0.0))
    return parts


def compare_steps(s: Scenario, history: list[dict], prompt_len: int) -> list[dict]:
    """:func:`step_records` with each step's floor on ``s``'s device (``predicted_s``, ``bound``)
    and ``ratio`` = measured / predicted (>= 1 when the floor is a floor)."""
    if prompt_len < 1:
        raise WorkbenchError(f"prompt_len must be >= 1, got {prompt_len}")
    out = []
    for row in step_records(history):
        cost = step_cost(s, _parts(row, prompt_len))
        out.append(row | {"predicted_s": cost.seconds, "bound": cost.bound,
                          "ratio": row["measured_s"] / cost.seconds})
    return out


def by_batch(rows: list[dict], kind: str = "decode") -> list[dict]:
    """Steps of ``kind`` grouped by batch size: how many, median measured and predicted seconds,
    median host seconds, median ratio."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        if row["kind"] == kind:
            groups[row["decodes"]].append(row)
    return [{"batch": b, "steps": len(g),
             "measured_s": statistics.median(r["measured_s"] for r in g),
             "predicted_s": statistics.median(r["predicted_s"] for r in g),
             "host_s": statistics.median(r["host_s"] for r in g),
             "ratio": statistics.median(r["ratio"] for r in g)}
            for b, g in sorted(groups.items())]
