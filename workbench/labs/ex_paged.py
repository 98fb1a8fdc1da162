"""Lab 03 (paged KV cache): the block-table lookup and the portable paged read.

References: :func:`workbench.kv.blocks.slot_mapping` (token position -> slot of the block pool; the
continuous engine writes every new key and value there, a plug-in point) and
:func:`workbench.kv.paged.gather_blocks` (a sequence's blocks copied out into a dense tensor, the
portable attention path; it runs inside CUDA graphs and compiled code, so it is checked but not
plugged). Taught in notebook 03.
"""

from __future__ import annotations

import random

import torch

import workbench.kv.blocks  # noqa: F401 - registers the plug-in point
from workbench.kv.paged import gather_blocks
from workbench.labs.check import Exercise, register
from workbench.plug import library


def _slots_case(rng: random.Random) -> dict:
    block_size = rng.choice([1, 2, 4, 8, rng.randint(1, 16)])
    start = rng.choice([0, rng.randint(0, 40), block_size * rng.randint(0, 4)])
    num_tokens = rng.choice([1, rng.randint(0, 12)])
    needed = -(-(start + num_tokens) // block_size)  # blocks the sequence holds
    table = rng.sample(range(64), needed + rng.randint(0, 1))  # distinct blocks, any order
    return {"block_table": table, "start": start, "num_tokens": num_tokens,
            "block_size": block_size}


def _gather_case(rng: random.Random) -> dict:
    num_blocks, block_size = rng.randint(1, 8), rng.randint(1, 4)
    heads, dim = rng.randint(1, 3), rng.randint(1, 4)
    rows, cols = rng.randint(1, 3), rng.randint(1, 4)
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    pool = torch.randn(num_blocks, block_size, heads, dim, generator=gen)
    tables = torch.randint(0, num_blocks, (rows, cols), generator=gen)
    return {"pool": pool, "tables": tables}


SLOTS = register(Exercise(
    name="paged.slots",
    title="block-table lookup: the pool slots of a sequence's new tokens",
    reference=library("paged.slots"),
    cases=_slots_case,
    edge_cases=(
        {"block_table": [7], "start": 0, "num_tokens": 0, "block_size": 4},
        {"block_table": [7], "start": 0, "num_tokens": 1, "block_size": 4},
        {"block_table": [3, 0], "start": 3, "num_tokens": 2, "block_size": 4},
        {"block_table": [5, 2], "start": 4, "num_tokens": 4, "block_size": 4},
        {"block_table": [9, 4, 6], "start": 0, "num_tokens": 3, "block_size": 1},
        {"block_table": [2, 8, 1], "start": 0, "num_tokens": 12, "block_size": 4},
    ),
    hints=(
        "Token t of the sequence is in its block number t // block_size, at offset "
        "t % block_size within that block.",
        "The block table maps the sequence's block number to a physical block of the pool; the "
        "pool has block_size slots per block, so physical block b starts at slot b * block_size.",
        "Return [block_table[t // block_size] * block_size + t % block_size for t in "
        "range(start, start + num_tokens)] (an empty list when num_tokens is 0).",
    ),
    plug="paged.slots",
    notebook="03_paged_attention",
))

GATHER = register(Exercise(
    name="paged.gather",
    title="portable paged read: blocks of each block table as one dense tensor",
    reference=gather_blocks,
    cases=_gather_case,
    edge_cases=(
        {"pool": torch.arange(8.0).reshape(4, 2, 1, 1), "tables": torch.tensor([[2, 0]])},
        {"pool": torch.arange(24.0).reshape(3, 2, 2, 2), "tables": torch.tensor([[1], [1]])},
    ),
    hints=(
        "pool[tables] indexes the pool with the whole [B, nb] table at once: "
        "[B, nb, block_size, Hkv, d], the blocks of each row in table order.",
        "Merge the block and offset dimensions into one token dimension of nb * block_size "
        "(they are adjacent, so a reshape keeps the token order), then put heads before tokens.",
        "pool[tables].reshape(B, nb * block_size, Hkv, d).transpose(1, 2): reshaping straight to "
        "[B, Hkv, S, d] mixes heads and tokens.",
    ),
    notebook="03_paged_attention",
))
