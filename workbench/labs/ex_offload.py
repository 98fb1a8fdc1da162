"""Lab 06 (offloading): the row and block schedules' load order, and the cost of a step.

The references are the library's own: :func:`~workbench.offload.schedule.schedule_order` (the
executor loads and computes the units in exactly that order) and
:func:`~workbench.offload.cost.step_time` (how the cost model composes per-unit loads and
computes into a step). Both are plug-in points: the lab runs the real :class:`OffloadedModel` on
the student's order, and predicts its step times with the student's cost. Taught in notebook 06.
"""

from __future__ import annotations

import random
import statistics
import tempfile

import workbench.offload.cost  # noqa: F401 - registers the plug-in points
import workbench.offload.schedule  # noqa: F401
from workbench.labs.check import Exercise, compare_values, register
from workbench.plug import library


def _order_case(rng: random.Random) -> dict:
    return {"schedule": rng.choice(["row", "block"]), "num_units": rng.randint(1, 8),
            "num_batches": rng.randint(1, 5)}


def _cost_case(rng: random.Random) -> dict:
    units = rng.randint(1, 6)
    scale = rng.choice([1e-3, 1e-2, 1e-1])  # loads and computes of the same order, or not
    loads = [round(rng.uniform(0, 2) * scale * rng.choice([0.1, 1, 10]), 6) for _ in range(units)]
    comps = [round(rng.uniform(0.1, 2) * scale, 6) for _ in range(units)]
    return {"loads": loads, "comps": comps, "num_batches": rng.randint(1, 8),
            "schedule": rng.choice(["row", "block"]), "overlap": rng.choice([0.0, 1.0, 0.5, 0.8])}


def _close(got, expected) -> str | None:
    """Seconds: equal to a relative 1e-6 (the formula has no rounding worth more)."""
    return compare_values(got, expected, atol=1e-12, rtol=1e-6)


SCHEDULE = register(Exercise(
    name="offload.schedule",
    title="the load order of the row-by-row and block schedules",
    reference=library("offload.schedule"),
    cases=_order_case,
    edge_cases=({"schedule": "row", "num_units": 3, "num_batches": 1},
                {"schedule": "block", "num_units": 3, "num_batches": 1},
                {"schedule": "row", "num_units": 2, "num_batches": 3},
                {"schedule": "block", "num_units": 2, "num_batches": 3},
                {"schedule": "block", "num_units": 1, "num_batches": 4}),
    hints=(
        "Each entry (unit, batches) means: load this unit's weights once, then compute it on each "
        "of these batches. Row: every batch goes through all the units before the next batch "
        "starts. Block: every unit serves all the batches before the next unit is loaded.",
        "Row has num_batches * num_units entries, each with one batch: batch 0 through units "
        "0 .. U-1, then batch 1 ... Block has num_units entries, each with every batch.",
        "row: [(u, [k]) for k in range(num_batches) for u in range(num_units)]; "
        "block: [(u, list(range(num_batches))) for u in range(num_units)].",
    ),
    plug="offload.schedule",
    notebook="06_offloading",
))

STEP_TIME = register(Exercise(
    name="offload.step_time",
    title="the cost model's time of one step over the units",
    reference=library("offload.step_time"),
    cases=_cost_case,
    edge_cases=(
        {"loads": [1.0], "comps": [0.25], "num_batches": 2, "schedule": "block", "overlap": 1.0},
        {"loads": [1.0], "comps": [0.25], "num_batches": 2, "schedule": "row", "overlap": 1.0},
        {"loads": [1.0, 0.5], "comps": [0.25, 0.5], "num_batches": 4, "schedule": "block",
         "overlap": 0.0},
        {"loads": [0.0, 0.0], "comps": [0.1, 0.2], "num_batches": 3, "schedule": "row",
         "overlap": 0.5},
    ),
    hints=(
        "A load and the compute beside it overlap: with perfect overlap (f = 1) the pair costs "
        "max(load, compute), without (f = 0) load + compute. In between: "
        "max(l, c) + (1 - f) * min(l, c).",
        "Block loads unit j once and computes it on all n batches: pair load_j with n * comp_j. "
        "Row loads unit j again for every batch: n times the pair (load_j, comp_j).",
        "o = lambda l, c: max(l, c) + (1 - f) * min(l, c); block: sum(o(l, n * c)); row: "
        "n * sum(o(l, c)), over zip(loads, comps).",
    ),
    compare=_close,
    plug="offload.step_time",
    notebook="06_offloading",
))


def offload_runs(model, prompts: list[list[int]], batch_size: int, max_new_tokens: int,
                 disk_dir: str | None = None) -> dict:
    """Greedy generation with every weight on the disk tier, once per schedule (traced), with
    ``len(prompts) / batch_size`` batches; the executor follows ``schedule_order`` (or a
    plugged-in replacement). Returns each schedule's run."""
    from workbench.offload import Budget, OffloadedModel, Policy, Split

    n = len(prompts) // batch_size
    policy = lambda schedule: Policy(weights=Split(0, 0, 100, what="weights"),  # noqa: E731
                                     gpu_batch_size=batch_size, num_gpu_batches=n,
                                     schedule=schedule)
    with tempfile.TemporaryDirectory(prefix="lab06-", dir=disk_dir) as disk:
        om = OffloadedModel.build(model, policy("block"), Budget(1 << 40, disk), "cpu",
                                  max(map(len, prompts)), max_new_tokens)
        try:
            return {s: om.generate(prompts, max_new_tokens, policy(s), trace=True)
                    for s in ("block", "row")}
        finally:
            om.close()


def unit_times(run) -> tuple[list[str], list[float], list[float]]:
    """From a traced run's decode steps: every unit's median load time and median compute time
    per batch (a block schedule's compute span serves every batch), units in model order."""
    first_decode = run.step_s[0]  # the prefill step comes first
    n = run.policy.num_gpu_batches if run.policy.schedule == "block" else 1
    spans: dict[tuple[str, str], list[float]] = {}
    for s in run.timeline:
        if s.start_s >= first_decode:
            spans.setdefault((s.lane, s.label), []).append(s.end_s - s.start_s)
    names = list(dict.fromkeys(s.label for s in run.timeline if s.lane == "compute"))
    loads = [statistics.median(spans.get(("disk", u), [0.0])) for u in names]
    comps = [statistics.median(spans[("compute", u)]) / n for u in names]
    return names, loads, comps
