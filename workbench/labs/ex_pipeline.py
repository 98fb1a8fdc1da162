"""Lab 05 (pipeline parallelism): the GPipe timetable, and the bubble measured from a timeline.

The references are the library's own: :func:`~workbench.parallel.pipeline.gpipe_timetable` (each
stage's forward pass runs its row of it) and :func:`~workbench.parallel.pipeline.measured_bubble`
(what ``bench pp`` and the timeline figure report). Both are plug-in points, and the launcher
installs the parent's overrides on every rank, so the lab runs a real two-stage pipeline with the
student's timetable and measures its bubble with the student's function. Taught in notebook 05.
"""

from __future__ import annotations

import random

import workbench.parallel.pipeline  # noqa: F401 - registers the plug-in points
from workbench.labs.check import Exercise, describe, register
from workbench.parallel.pipeline import StageEvent
from workbench.plug import library


def _table_case(rng: random.Random) -> dict:
    return {"p": rng.randint(1, 6), "m": rng.randint(1, 8)}


def compare_timetables(got, expected) -> str | None:
    """Slot by slot; the pairs of a slot may come in any order (they run at the same time)."""
    if not isinstance(got, (list, tuple)):
        return f"expected a list of time slots, got {describe(got)}"
    if len(got) != len(expected):
        return f"{len(got)} time slots, expected {len(expected)}"
    for t, (slot, want) in enumerate(zip(got, expected)):
        try:
            pairs = sorted(tuple(pair) for pair in slot)
        except TypeError:
            return f"slot {t}: expected a list of (stage, micro_batch) pairs, got {describe(slot)}"
        if pairs != sorted(want):
            return f"slot {t} holds {pairs}, expected {sorted(want)}"
    return None


def _events_case(rng: random.Random) -> dict:
    """A timeline of 1-2 forward passes of p stages over m micro-batches, with a gap between
    passes: each stage starts micro-batch j when the stage before finished it and it is free."""
    p, m, steps = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 2)
    events, t0 = [], round(rng.uniform(0, 5), 1)
    for step in range(steps):
        done = [t0] * m  # when micro-batch j is ready for the next stage
        for s in range(p):
            free = t0
            for j in range(m):
                start = round(max(done[j], free) + rng.choice([0, 0, 0.1, 0.2]), 1)
                end = round(start + rng.uniform(0.2, 2.0), 1)
                events.append(StageEvent(s, step, j, start, end))
                done[j] = free = end
        t0 = round(max(e.end for e in events) + rng.uniform(0.5, 3.0), 1)  # idle between passes
    rng.shuffle(events)  # ranks report in any order
    return {"events": events, "p": p}


TIMETABLE = register(Exercise(
    name="pipeline.timetable",
    title="GPipe's forward fill-drain timetable",
    reference=library("pipeline.timetable"),
    cases=_table_case,
    edge_cases=({"p": 1, "m": 1}, {"p": 1, "m": 4}, {"p": 4, "m": 1}, {"p": 2, "m": 2},
                {"p": 3, "m": 4}),
    hints=(
        "Stage s cannot start micro-batch j before stage s - 1 has finished it, and runs one "
        "micro-batch at a time, so stage s runs micro-batch j in slot s + j.",
        "There are m + p - 1 slots: the last stage finishes the last micro-batch in slot "
        "(p - 1) + (m - 1). Slot t holds (s, t - s) for every stage s with 0 <= t - s < m.",
        "return [[(s, t - s) for s in range(p) if 0 <= t - s < m] for t in range(m + p - 1)]",
    ),
    compare=compare_timetables,
    plug="pipeline.timetable",
    notebook="05_pipeline_parallelism",
))

BUBBLE = register(Exercise(
    name="pipeline.bubble",
    title="idle share of the stages, measured from a timeline",
    reference=library("pipeline.bubble"),
    cases=_events_case,
    edge_cases=(
        {"events": [StageEvent(0, 0, 0, 1.0, 2.0)], "p": 1},
        {"events": [StageEvent(0, 0, 0, 0.0, 1.0), StageEvent(1, 0, 0, 1.0, 2.0)], "p": 2},
        {"events": [StageEvent(0, 0, 0, 0.0, 1.0), StageEvent(0, 0, 1, 1.0, 2.0),
                    StageEvent(1, 0, 0, 1.0, 2.0), StageEvent(1, 0, 1, 2.0, 3.0)], "p": 2},
        {"events": [StageEvent(0, 0, 0, 0.0, 1.0), StageEvent(1, 0, 0, 1.0, 2.0),
                    StageEvent(0, 1, 0, 10.0, 11.0), StageEvent(1, 1, 0, 11.0, 12.0)], "p": 2},
    ),
    hints=(
        "Treat every forward pass (event.step) on its own: its span runs from the earliest start "
        "to the latest end of its events; the idle time between two passes does not count.",
        "Over all passes, the stages could have worked p * (sum of the spans) seconds, and were "
        "busy sum(event.end - event.start) of them. The bubble is the idle share.",
        "busy = sum(e.end - e.start for e in events); span = sum over steps of (max end - min "
        "start); return 1 - busy / (p * span).",
    ),
    plug="pipeline.bubble",
    notebook="05_pipeline_parallelism",
))


def pp_generation(prompts: list[list[int]], pp: int = 2, micro_batches: int = 4,
                  max_new_tokens: int = 6, timeout_s: float = 120.0) -> dict:
    """Greedy generation of the bundled model on ``pp`` spawned CPU stages (gloo), the batch split
    into ``micro_batches``, then the same requests on rank 0 alone (the reference). Overrides
    active here reach the ranks. Returns both runs' tokens, every stage's timeline and layers."""
    from workbench.engine import Request
    from workbench.parallel import GenerateJob, ParallelConfig, generate_parallel

    requests = tuple(Request(tuple(p), max_new_tokens, id=i) for i, p in enumerate(prompts))
    jobs = [GenerateJob("bundled", requests, ParallelConfig(pp=pp, micro_batches=micro_batches),
                        "static", batch_size=len(requests)),
            GenerateJob("bundled", requests, ParallelConfig(), "static", batch_size=len(requests))]
    split, whole = generate_parallel(jobs, "cpu", timeout_s)
    return {"tokens": [t.output_ids for t in split["run"].traces],
            "one_device": [t.output_ids for t in whole["run"].traces],
            "events": [e for r in split["ranks"] for e in r["events"]],
            "layers": [r["layers"] for r in split["ranks"]]}
