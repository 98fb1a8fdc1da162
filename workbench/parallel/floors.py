"""One row of ``bench tp`` / ``bench pp``: a measured decode step against its floor.

:func:`decode_row` turns what every rank of a grid recorded (its weight and KV bytes, layers,
all-reduce latencies, stage events, replayed variants) into the row the JSON, the notebooks and the
checks read. The floor (:mod:`workbench.parallel.measure` states it)::

    TP stage:  (weight bytes + KV bytes read per GPU) / bandwidth + 2 x layers x all-reduce latency
    PP:        (m + p - 1) x the slowest stage's floor for one micro-batch of B/m rows

``floor_ms`` counts the all-reduces at their eager latency; replayed steps are also set against
a stricter floor with the all-reduce replayed from a CUDA graph (NCCL's: ``graph_ar``, the one-shot
through symmetric memory: ``symm``). A rank alone (``bench tp --alone``) runs no all-reduce, so its
floor has none. With a vocabulary-parallel head (``bench tp --vocab-parallel``) a rank's weight bytes
hold 1/tp of the LM head; the embedding's all-reduce and the logits' all-gather that it adds stay
out of the floor (it counts only what every TP step needs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench.parallel.in_flight import as_one_pass, bubble_formula_in_flight, schedule_bubble_in_flight
from workbench.parallel.pipeline import bubble_formula, measured_bubble, run_bubble, schedule_bubble
from workbench.parallel.plan import ParallelConfig

if TYPE_CHECKING:
    from workbench.parallel.measure import DecodeBench

__all__ = ["decode_row"]


def decode_row(par: ParallelConfig, B: int, step_s: float, ranks: list[dict], bandwidth: float,
               bench: DecodeBench) -> dict:
    """One result row: the measured step (``step_s``, seconds), its floor, the communication
    share, the bubble, and what each rank's record in ``ranks`` adds (replayed variants, the
    in-flight pass, a profile, a variant's error)."""
    m = min(par.micro_batches, B)
    ar_s = max(r["ar_s"] for r in ranks)
    reduces = par.tp > 1 and not bench.alone  # a rank alone has no all-reduce to run

    def floor_with(ar: float) -> float:
        """The slowest rank's weight and KV bytes over the bandwidth, + 2 all-reduces a layer."""
        return max((r["weight_bytes"] + r["kv_bytes"]) / bandwidth
                   + (2 * r["layers"] * ar if reduces else 0.0) for r in ranks)

    stage_floor = floor_with(ar_s)
    floor = stage_floor * (m + par.pp - 1) if par.pp > 1 else stage_floor
    ar_count = 2 * max(r["layers"] for r in ranks) * par.pp * (m if par.pp > 1 else 1)
    comm = ar_count * ar_s if reduces else 0.0
    row = {"system": f"workbench/{par}" + (" rank alone" if bench.alone else ""), "tp": par.tp,
           "pp": par.pp, "micro_batches": m, **({"alone": True} if bench.alone else {}),
           **({"vocab_parallel": True} if par.vocab_parallel else {}),
           "batch": B, "context_len": bench.context_len, "step_ms": step_s * 1e3,
           "output_tok_s": B / step_s, "floor_ms": floor * 1e3, "step_over_floor": step_s / floor,
           "weight_bytes_per_gpu": max(r["weight_bytes"] for r in ranks),
           "allreduce_us": ar_s * 1e6, "allreduces_per_step": ar_count if reduces else 0,
           "comm_ms_estimate": comm * 1e3, "comm_share_estimate": comm / step_s,
           "bandwidth_GB_s": bandwidth / 1e9}
    events = [e for r in ranks for e in r["events"]]
    if events:
        row |= {"bubble_measured": measured_bubble(events, par.pp),
                "bubble_run": run_bubble(events, par.pp),  # with the gaps between steps
                "bubble_schedule": schedule_bubble(events, par.pp),
                "bubble_formula": bubble_formula(par.pp, m), "events": events}
    last = next(r for r in ranks if r["stage"] == par.pp - 1 and r["tp_rank"] == 0)  # has logits
    # Stricter floors for the replayed steps, the all-reduces at their latency from a CUDA graph:
    # NCCL's ("graph_ar"), the one-shot's ("symm"). floor_ms keeps the eager all-reduce's.
    floors = {"graph_ar": floor} if not reduces else {}  # no all-reduce: one floor
    for name, key in (("graph_ar", "ar_graph_s"), ("symm", "ar_symm_graph_s")):
        if key in last:
            ar = max(r[key] for r in ranks)
            floors[name] = floor_with(ar)
            row |= {f"allreduce_{name}_us": ar * 1e6, f"floor_{name}_ms": floors[name] * 1e3}
    for key in ("graph", "fast", "fast_symm", "fast_fused"):
        if f"{key}_step_ms" in last:
            step_ms = last[f"{key}_step_ms"]
            row |= {k: last[k] for k in (f"{key}_step_ms", f"{key}_max_abs_logit_diff",
                                         f"{key}_token_agreement")}
            row[f"{key}_over_floor"] = step_ms / 1e3 / floor
            for name in ("symm",) if key in ("fast_symm", "fast_fused") else ("graph_ar",):
                if name in floors:
                    row[f"{key}_over_floor_{name}"] = step_ms / 1e3 / floors[name]
    if "in_flight_s" in last:  # micro-batches in flight across steps: m stage-slots a step
        seconds = max(r["in_flight_s"] for r in ranks)
        row |= {"in_flight_step_ms": seconds * 1e3, "in_flight_output_tok_s": B / seconds,
                "in_flight_speedup": step_s / seconds,
                "in_flight_floor_ms": stage_floor * max(m, par.pp) * 1e3,
                "in_flight_bubble_formula": bubble_formula_in_flight(par.pp, m, bench.steps)}
        if events:  # the in-flight timetable with the fill-drain run's stage times: same run, no noise
            row["in_flight_bubble_schedule_same_times"] = schedule_bubble_in_flight(
                as_one_pass(events), par.pp, m)
        flight = [e for r in ranks for e in r["in_flight_events"]]
        if flight:
            row |= {"in_flight_bubble_measured": measured_bubble(flight, par.pp),
                    "in_flight_bubble_schedule": schedule_bubble_in_flight(flight, par.pp, m),
                    "in_flight_events": flight}
    row |= {k: v for k, v in last.items() if k.endswith("_error")}  # a replayed variant that failed
    if "profile_table" in last:  # rank 0's (TP rank 0 of the last stage)
        row |= {k: last[k] for k in ("profile_table", "allreduce_calls_per_step")}
    graph_events = [e for r in ranks for e in r.get("graph_events", [])]
    if graph_events:  # the same bubble, every micro-batch replayed from a CUDA graph
        row |= {"graph_bubble_measured": measured_bubble(graph_events, par.pp),
                "graph_bubble_schedule": schedule_bubble(graph_events, par.pp)}
    return row
