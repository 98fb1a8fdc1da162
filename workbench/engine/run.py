"""The record of one engine run: every request's trace and what each batch slot did at each step."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from workbench.engine.requests import RequestTrace


@dataclass
class EngineRun:
    """Traces in request order, plus the slot timeline that the batching figures draw.

    ``timeline[step][slot]`` is the id of the request that slot worked for at that step, or None
    when the slot sat idle (a finished row of a static batch, an empty continuous slot).
    """

    traces: list[RequestTrace]
    timeline: list[list[int | None]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def outputs(self) -> list[RequestTrace]:
        """Alias: each trace carries ``output_ids`` and ``finish_reason``."""
        return self.traces

    @property
    def slot_steps(self) -> int:
        return sum(len(row) for row in self.timeline)

    @property
    def busy_slot_steps(self) -> int:
        return sum(rid is not None for row in self.timeline for rid in row)

    @property
    def utilization(self) -> float:
        """Fraction of slot-steps that produced a token (or prefill) for a live request."""
        return self.busy_slot_steps / max(1, self.slot_steps)


class Clock:
    """Seconds since the run started; ``wait_until`` sleeps until a request's arrival time."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.start

    def wait_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)
