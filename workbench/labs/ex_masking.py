"""Lab 01 (attention masks): the causal mask with a KV cache, the padded mask, the packed mask.

The references are the masks the engines build (:mod:`workbench.attention.masks`): the continuous
engine's chunked prefill uses :func:`causal_mask` with a cache offset, static batching
:func:`padded_causal_mask`, the packed (varlen) reference path :func:`packed_causal_mask`. All three
are plug-in points, so the lab runs the engine with the student's mask. Taught in notebook 01.
"""

from __future__ import annotations

import random

import torch

import workbench.attention.masks  # noqa: F401 - registers the plug-in points
from workbench.labs.check import Exercise, register
from workbench.plug import library


def _causal_case(rng: random.Random) -> dict:
    T = rng.randint(1, 8)
    return {"T": T, "S": T + rng.choice([0, 0, rng.randint(1, 10)])}


def _padded_case(rng: random.Random) -> dict:
    B, S = rng.randint(1, 4), rng.randint(1, 9)
    rows = []
    for _ in range(B):
        real = rng.randint(1, S)  # every row holds at least one real token
        pads = [False] * (S - real)
        rows.append(pads + [True] * real if rng.random() < 0.7 else [True] * real + pads)
    T = S if rng.random() < 0.6 else rng.randint(1, S)
    return {"valid": torch.tensor(rows), "T": T}


def _packed_case(rng: random.Random) -> dict:
    n = rng.randint(1, 4)
    context = [rng.randint(1, 8) for _ in range(n)]
    case: dict = {"query_lens": [rng.randint(1, c) for c in context]}
    if rng.random() < 0.7:
        case["context_lens"] = context
    else:
        case["query_lens"] = context  # fresh prefills: context_lens left out
    if rng.random() < 0.35:
        case["window"] = rng.randint(1, 6)
    return case


CAUSAL = register(Exercise(
    name="masks.causal",
    title="causal mask for T new queries over S cached keys",
    reference=library("masks.causal"),
    cases=_causal_case,
    edge_cases=({"T": 1, "S": 1}, {"T": 4, "S": 4}, {"T": 1, "S": 6}, {"T": 3, "S": 7},
                {"T": 5, "S": None}),
    hints=(
        "The T queries are the LAST T of the S keys: query t is key number S - T + t.",
        "Query t may see key j when j <= S - T + t. Compare a column of query indices with a row "
        "of key indices: torch.arange(S - T, S)[:, None] and torch.arange(S)[None, :].",
        "S=None means S=T. The result is (torch.arange(S)[None, :] <= "
        "torch.arange(S - T, S)[:, None]), a [T, S] bool tensor on `device`.",
    ),
    plug="masks.causal",
    notebook="01_attention_masking",
))

PADDED = register(Exercise(
    name="masks.padded",
    title="causal mask of a padded batch, pad columns hidden",
    reference=library("masks.padded"),
    cases=_padded_case,
    edge_cases=({"valid": torch.tensor([[True]]), "T": 1},
                {"valid": torch.tensor([[False, False, True], [True, True, True]]), "T": 3},
                {"valid": torch.tensor([[True, True, False, False]]), "T": 4},
                {"valid": torch.tensor([[False, True, True, True]]), "T": 1}),
    hints=(
        "Start from the causal mask of T queries over S = valid.shape[1] keys, then hide every "
        "key column whose `valid` is False. The result is [B, 1, T, S].",
        "A pad query before the row's first real token (left padding) would then see no key at "
        "all, and softmax over nothing gives NaN: let each pad query (its own column S - T + t is "
        "not valid) see itself, whatever else it sees.",
        "mask = causal[None] & valid[:, None, :] gives [B, T, S]; then for the pad queries set "
        "mask[b, t, S - T + t] = True, and return mask[:, None].",
    ),
    plug="masks.padded",
    notebook="01_attention_masking",
))

PACKED = register(Exercise(
    name="masks.packed",
    title="block-diagonal causal mask of a packed batch",
    reference=library("masks.packed"),
    cases=_packed_case,
    edge_cases=({"query_lens": [1]}, {"query_lens": [3, 1, 2]},
                {"query_lens": [1, 1], "context_lens": [4, 2]},
                {"query_lens": [2, 3], "context_lens": [5, 3]},
                {"query_lens": [4], "window": 2}),
    hints=(
        "Label every query row and every key column with (sequence, position). Sequence i has "
        "query_lens[i] queries, at positions context_lens[i] - query_lens[i] .. context_lens[i] - 1, "
        "and context_lens[i] keys, at positions 0 .. context_lens[i] - 1.",
        "A query may see a key when both belong to the same sequence and pos(key) <= pos(query); "
        "with a window, also pos(query) - pos(key) < window.",
        "Build the labels with torch.repeat_interleave(torch.arange(n), torch.tensor(lens)), "
        "compare a column of query labels with a row of key labels, and return mask[None, None] "
        "([1, 1, N, S]).",
    ),
    plug="masks.packed",
    notebook="01_attention_masking",
))
