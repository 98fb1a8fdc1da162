"""Serving metrics, named as vLLM's ``benchmark_serving`` names them (notebook ``02_batching``).

For one request with arrival ``t_a``, output token times ``t_1 .. t_n`` and finish ``t_f``:

* TTFT = ``t_1 - t_a``: time to first token (queueing + prefill);
* TPOT = ``(t_f - t_1) / (n - 1)``: time per output token after the first (``n >= 2`` only);
* ITL = ``t_{k+1} - t_k``: every inter-token gap, pooled over all requests;
* E2EL = ``t_f - t_a``: end-to-end latency.

Each is summarised as ``mean_<m>_ms``, ``median_<m>_ms``, ``std_<m>_ms``, ``p90_<m>_ms`` and
``p99_<m>_ms`` (``np.percentile``, linear interpolation, as vLLM). Only completed requests
(finish reason ``"eos"`` or ``"length"``) count, in the latencies and in the throughputs:
``output_throughput`` (alias ``output_tok_s``) is useful generated tokens per second of
``duration_s``, ``total_token_throughput`` adds their prompt tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from workbench.engine.requests import RequestTrace
from workbench.errors import WorkbenchError

COMPLETED = ("eos", "length")  # finish reasons of a request that ran to its end
METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = (90, 99)

SlotRows = Sequence[Sequence[int | None]]  # per step, per batch slot: request id or None (idle)


def is_completed(trace: RequestTrace) -> bool:
    """True when the request ran to EOS or to its length limit."""
    return trace.finish_reason in COMPLETED


def _finish(trace: RequestTrace) -> float | None:
    """When the request ended: ``finish_s``, else its last token's time, else None."""
    if trace.finish_s is not None:
        return trace.finish_s
    return trace.token_times[-1] if trace.token_times else None


def request_latencies(traces: Sequence[RequestTrace], metric: str) -> np.ndarray:
    """The values of ``metric`` (``"ttft"``, ``"tpot"``, ``"itl"`` or ``"e2el"``) in milliseconds,
    one per completed request that has it (every gap for ``"itl"``), in trace order."""
    if metric not in METRICS:
        raise WorkbenchError(f"unknown latency metric {metric!r}: expected one of {METRICS}")
    values: list[float] = []
    for t in traces:
        if not is_completed(t):
            continue
        times, end = t.token_times, _finish(t)
        if metric == "ttft" and times:
            values.append(times[0] - t.arrival_s)
        elif metric == "tpot" and len(times) >= 2:
            values.append((end - times[0]) / (len(times) - 1))
        elif metric == "itl":
            values.extend(np.diff(times).tolist())
        elif metric == "e2el" and end is not None:
            values.append(end - t.arrival_s)
    return np.asarray(values, dtype=np.float64) * 1000.0


def _stats(values_ms: np.ndarray, metric: str) -> dict[str, float | None]:
    """mean/median/std/p90/p99 of ``values_ms`` under vLLM's key names (None when empty)."""
    keys = [f"mean_{metric}_ms", f"median_{metric}_ms", f"std_{metric}_ms"]
    keys += [f"p{p}_{metric}_ms" for p in PERCENTILES]
    if values_ms.size == 0:
        return dict.fromkeys(keys)
    numbers = [values_ms.mean(), np.median(values_ms), values_ms.std()]
    numbers += [np.percentile(values_ms, p) for p in PERCENTILES]
    return {k: float(v) for k, v in zip(keys, numbers)}


def summarize(traces: Sequence[RequestTrace], duration_s: float) -> dict[str, Any]:
    """Counts, throughputs and latency statistics of one run that lasted ``duration_s`` seconds.

    Keys: ``duration_s``, ``num_requests``, ``completed``, ``rejected``, ``cancelled``,
    ``total_input_tokens``, ``total_output_tokens`` (completed requests only),
    ``request_throughput`` (completed req/s), ``output_throughput`` = ``output_tok_s``,
    ``total_token_throughput`` (tok/s), then ``{mean,median,std,p90,p99}_{ttft,tpot,itl,e2el}_ms``
    (None when no request has that metric). An empty run gives zeros and Nones.
    """
    if not isinstance(duration_s, (int, float)) or math.isnan(duration_s) or duration_s < 0:
        raise WorkbenchError(f"duration_s must be a number >= 0, got {duration_s!r}")
    done = [t for t in traces if is_completed(t)]
    if done and duration_s == 0:
        raise WorkbenchError("duration_s is 0 but requests completed: pass the run's wall time")
    n_in = sum(t.prompt_len for t in done)
    n_out = sum(len(t.output_ids) for t in done)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    out: dict[str, Any] = {
        "duration_s": float(duration_s),
        "num_requests": len(traces),
        "completed": len(done),
        "rejected": sum(t.finish_reason == "rejected" for t in traces),
        "cancelled": sum(t.finish_reason == "cancelled" for t in traces),
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "request_throughput": per_s(len(done)),
        "output_throughput": per_s(n_out),
        "output_tok_s": per_s(n_out),
        "total_token_throughput": per_s(n_in + n_out),
    }
    for metric in METRICS:
        out |= _stats(request_latencies(done, metric), metric)
    return out


def slot_utilization(busy_slot_steps: int, slot_steps: int) -> float:
    """Share of batch slot-steps that did useful work: ``busy / total`` (0.0 when total is 0).

    Static batching leaves a slot idle from the moment its request ends until the whole batch
    ends; continuous batching refills it at the next step, which is where its speed-up comes from.
    """
    for what, v in (("busy_slot_steps", busy_slot_steps), ("slot_steps", slot_steps)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise WorkbenchError(f"{what} must be an integer >= 0, got {v!r}")
    if busy_slot_steps > slot_steps:
        raise WorkbenchError(f"busy_slot_steps ({busy_slot_steps}) exceeds slot_steps "
                             f"({slot_steps})")
    return busy_slot_steps / slot_steps if slot_steps else 0.0


def timeline_utilization(slot_rows: SlotRows) -> float:
    """:func:`slot_utilization` of a timeline (per step, per slot: request id or None)."""
    busy = sum(r is not None for step in slot_rows for r in step)
    return slot_utilization(busy, sum(len(step) for step in slot_rows))


def queue_lengths(traces: Sequence[RequestTrace], times: Sequence[float]) -> np.ndarray:
    """How many requests wait at each of ``times``: arrived (``arrival_s <= t``) but not yet
    scheduled (``t < scheduled_s``; a request never scheduled leaves the queue at ``finish_s``,
    or never)."""
    times_arr = np.asarray(times, dtype=np.float64)
    counts = np.zeros(times_arr.shape, dtype=np.int64)
    for tr in traces:
        leave = tr.scheduled_s if tr.scheduled_s is not None else tr.finish_s
        leave = math.inf if leave is None else leave
        counts += (times_arr >= tr.arrival_s) & (times_arr < leave)
    return counts
