"""Lab 02 (continuous batching): the scheduler's admission step.

The reference is :func:`workbench.engine.scheduler.admit`, which :class:`~workbench.engine.scheduler.
Scheduler` calls every step to decide which waiting requests join the running batch under the slot
and token budgets; it is a plug-in point, so the lab serves requests with the student's admission
step. Taught in notebook 02.
"""

from __future__ import annotations

import random

import workbench.engine.scheduler  # noqa: F401 - registers the plug-in point
from workbench.labs.check import Exercise, register
from workbench.plug import library


def _admit_case(rng: random.Random) -> dict:
    waiting = [rng.choice([rng.randint(1, 6), rng.randint(1, 24)]) for _ in range(rng.randint(0, 6))]
    return {"prompt_lens": waiting, "free_slots": rng.randint(0, 5),
            "token_budget": rng.choice([0, rng.randint(1, 12), rng.randint(1, 48)]),
            "chunked_prefill": rng.random() < 0.5}


ADMIT = register(Exercise(
    name="batching.admit",
    title="admission step: which waiting requests join, with how many prompt tokens",
    reference=library("batching.admit"),
    cases=_admit_case,
    edge_cases=(
        {"prompt_lens": [], "free_slots": 4, "token_budget": 64, "chunked_prefill": False},
        {"prompt_lens": [5, 3], "free_slots": 0, "token_budget": 64, "chunked_prefill": False},
        {"prompt_lens": [5, 3], "free_slots": 4, "token_budget": 0, "chunked_prefill": True},
        {"prompt_lens": [4, 4, 4], "free_slots": 2, "token_budget": 64, "chunked_prefill": False},
        {"prompt_lens": [6, 2], "free_slots": 4, "token_budget": 6, "chunked_prefill": False},
        {"prompt_lens": [9, 2], "free_slots": 4, "token_budget": 6, "chunked_prefill": False},
        {"prompt_lens": [9, 2], "free_slots": 4, "token_budget": 6, "chunked_prefill": True},
        {"prompt_lens": [3, 9, 2], "free_slots": 4, "token_budget": 8, "chunked_prefill": True},
    ),
    hints=(
        "Walk the queue oldest first. Each admitted request takes one slot and min(prompt_len, "
        "budget left) tokens; stop when no slot is free or the budget is spent (<= 0).",
        "First come, first served: without chunked prefill, a prompt that does not fit whole in "
        "the budget left stops admission. Do not skip it to admit a smaller one behind it.",
        "With chunked prefill a prompt may start with a partial chunk (the budget left), and "
        "then the budget is 0. Return the list of token counts of the admitted requests.",
    ),
    plug="batching.admit",
    notebook="02_static_vs_continuous_batching",
))
