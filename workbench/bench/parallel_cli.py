"""``bench tp`` and ``bench pp``: decode step time on TP / PP grids of real ranks, against the floor.

    workbench bench tp --json OUT.json [--model M] [--tp 1,2,4] [--batch-sizes 1,32] [--cuda-graphs] [--fast [--fast-attention A] [--fast-linear L]] [--symm-mem] [--fused-allreduce] [--profile] [--alone]
    workbench bench pp --json OUT.json [--model M] [--pp 1,2,4] [--micro-batches 1,2,4,8] [--cuda-graphs] [--in-flight]

One job per world size (gloo on CPU, NCCL on GPUs, spawned by :func:`workbench.parallel.launch`:
:func:`workbench.parallel.measure.time_grids`) times its grids in turn, each with every rank of its
job. See :mod:`workbench.parallel.measure` for the floor. ``--alone`` runs every TP grid as one
process holding rank 0's shard with no peers (no all-reduce): on one GPU, what each rank of TP 2 or 4
computes.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

from workbench.bench.run import write_report
from workbench.errors import WorkbenchError


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise WorkbenchError(f"--{name} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise WorkbenchError(f"--{name} values must be >= 1, got {text!r}")
    return values


def add_parser(bench_sub) -> None:
    """Adds both ``tp`` and ``pp`` (the registry lists this module under each name)."""
    if "tp" in bench_sub.choices:
        return
    for name, help_text in (("tp", "tensor parallel decode step vs floor"),
                            ("pp", "pipeline parallel decode step, bubble vs (p-1)/(m+p-1)")):
        b = bench_sub.add_parser(name, help=help_text)
        b.add_argument("--model", default="bundled")
        b.add_argument("--cuda-graphs", action="store_true",
                       help="also replay the decode step from CUDA graphs (GPU; on a pipeline one "
                            "graph per stage and micro-batch, hand-overs eager between them)")
        if name == "tp":
            b.add_argument("--tp", default="1,2", help="comma-separated TP sizes")
            b.add_argument("--fast", action="store_true",
                           help="also the engine's fast path in a CUDA graph (GPU): fused weights, "
                                "torch.compile'd glue, Triton paged attention")
            b.add_argument("--fast-attention", default="auto",
                           choices=("auto", "triton", "triton-rope", "gather"),
                           help="the fast path's attention (auto: triton-rope on GPUs, which does "
                                "RoPE and the KV write in the attention kernel)")
            b.add_argument("--fast-linear", default="auto",
                           choices=("auto", "torch", "triton", "fastest"),
                           help="the fast path's matrix products: torch (cuBLAS, compiled glue "
                                "around it), triton (one kernel per product with the residual "
                                "add, RMSNorm and SwiGLU inside; needs triton-rope) or fastest "
                                "(torch, but o_proj, down and the LM head as skinny kernels where "
                                "timed faster than cuBLAS); auto: torch")
            b.add_argument("--symm-mem", action="store_true",
                           help="also the fast path with the one-shot all-reduce through symmetric "
                                "memory (GPU, TP > 1; workbench.parallel.allreduce)")
            b.add_argument("--fused-allreduce", action="store_true",
                           help="also the fast path with the one-shot all-reduce fused into the "
                                "residual add and the next RMSNorm, the products writing into "
                                "its buffers (GPU, TP > 1; workbench.parallel.allreduce_norm)")
            b.add_argument("--alone", action="store_true",
                           help="every TP grid as one process holding TP rank 0's shard, its "
                                "all-reduces left out: one GPU times what each rank computes "
                                "(not a TP step: no communication); with --symm-mem (--fused-allreduce) also with the "
                                "one-shot (fused) all-reduce over the rank alone (its kernels' cost, no "
                                "peer: a lower bound of the TP step)")
            b.add_argument("--vocab-parallel", action="store_true",
                           help="TP > 1 also splits the embedding and the LM head by vocabulary "
                                "rows (one all-reduce after the lookup, the logits all-gathered): "
                                "each rank reads 1/tp of the head instead of all of it")
            b.add_argument("--profile", action="store_true",
                           help="a torch.profiler table of rank 0's fastest step per row (GPU: "
                                "kernels by device time; CPU: operators), in the JSON as "
                                "profile_table")
        else:
            b.add_argument("--pp", default="1,2", help="comma-separated PP sizes")
            b.add_argument("--micro-batches", default="1,2,4", help="comma-separated m")
            b.add_argument("--in-flight", action="store_true",
                           help="also decode with the micro-batches in flight across steps (each "
                                "re-enters stage 0 when its token is back), its bubble vs "
                                "1 - steps m / (steps max(m,p) + min(m,p) - 1)")
        b.add_argument("--batch-sizes", default="1,8")
        b.add_argument("--context-len", type=int, default=64)
        b.add_argument("--steps", type=int, default=16)
        b.add_argument("--warmup", type=int, default=3)
        b.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        b.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
        b.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole job")
        b.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
        b.add_argument("--json", required=True, type=Path, help="where to write the results")


def run(args: argparse.Namespace) -> dict:
    import torch

    from workbench.hardware import detect, resolve_device
    from workbench.parallel import ParallelConfig
    from workbench.parallel.measure import DecodeBench

    device = resolve_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda"
                                                      else "float32")
    if args.context_len < 1 or args.steps < 1 or args.warmup < 0:
        raise WorkbenchError("--context-len and --steps must be >= 1, --warmup >= 0")
    batches = _ints(args.batch_sizes, "batch-sizes")
    graphs = args.cuda_graphs or any(getattr(args, k, False)
                                     for k in ("fast", "symm_mem", "fused_allreduce"))
    if graphs and device.type != "cuda":
        print("--cuda-graphs / --fast / --symm-mem / --fused-allreduce replay CUDA graphs, which "
              "need a GPU: timing the eager step only")
    if args.bench_name == "tp":
        grids = tuple(ParallelConfig(tp=t, vocab_parallel=args.vocab_parallel and t > 1)
                      for t in _ints(args.tp, "tp"))
    else:
        ms = _ints(args.micro_batches, "micro-batches")
        grids = tuple(ParallelConfig(pp=p, micro_batches=m) for p in _ints(args.pp, "pp")
                      for m in (ms if p > 1 else (1,)))
    from workbench.parallel.engine import config_of
    from workbench.parallel.plan import balanced_stages, check_tp

    config = config_of(args.model)
    for g in grids:  # bad sizes fail here, in one line, before any rank starts
        check_tp(config, g.tp)
        balanced_stages(config, g.pp)
    alone = getattr(args, "alone", False)
    world = 1 if alone else max(g.world_size for g in grids)
    if device.type == "cuda" and world > torch.cuda.device_count():
        raise WorkbenchError(f"{world} ranks need {world} GPUs; this machine has "
                             f"{torch.cuda.device_count()}")
    from workbench.parallel.measure import time_grids

    bench = DecodeBench(args.model, grids, batches, args.context_len, args.steps, args.warmup,
                        dtype, cuda_graphs=args.cuda_graphs,
                        fast=getattr(args, "fast", False), symm_mem=getattr(args, "symm_mem", False),
                        fused_allreduce=getattr(args, "fused_allreduce", False),
                        fast_attention=getattr(args, "fast_attention", "auto"),
                        fast_linear=getattr(args, "fast_linear", "auto"),
                        in_flight=getattr(args, "in_flight", False),
                        profile=getattr(args, "profile", False), alone=alone)
    rows = time_grids(bench, device.type, args.timeout, args.threads)  # one job per world size
    for row in rows:
        row.pop("events", None)
        row.pop("in_flight_events", None)
    report = {"benchmark": args.bench_name, "hardware": detect(device).stamp() | {
                  "num_devices_used": world, "backend": "nccl" if device.type == "cuda" else "gloo"},
              "model": args.model, "dtype": dtype, "date": datetime.date.today().isoformat(),
              **({"alone": "each grid's TP rank 0 in one process, all-reduces left out"}
                 if alone else {}),
              **({"vocab_parallel": "TP > 1: embedding and LM head split by vocabulary rows"}
                 if getattr(args, "vocab_parallel", False) else {}),
              "workload": {"batch_sizes": list(batches), "context_len": args.context_len,
                           "steps": args.steps, "warmup": args.warmup},
              **({"fast_attention": args.fast_attention, "fast_linear": args.fast_linear}
                 if getattr(args, "fast", False) and device.type == "cuda" else {}),
              "results": rows, "checks": _checks(rows)}
    write_report(report, args.json)
    for r in rows:
        extra = (f"  bubble {r['bubble_measured']:.2f} (timetable with these stage times "
                 f"{r['bubble_schedule']:.2f}) vs {r['bubble_formula']:.2f}"
                 if "bubble_measured" in r else "")
        graph = "".join(f"  {k} {r[f'{k}_step_ms']:.2f} ms (x{r[f'{k}_over_floor']:.2f}"
                        + "".join(f", x{r[f'{k}_over_floor_{f}']:.2f} with the {f} floor"
                                  for f in ("graph_ar", "symm") if f"{k}_over_floor_{f}" in r)
                        + ")" for k in ("graph", "fast", "fast_symm", "fast_fused")
                        if f"{k}_step_ms" in r)
        if "in_flight_step_ms" in r:
            graph += f"  in flight {r['in_flight_step_ms']:.2f} ms (x{r['in_flight_speedup']:.2f} faster"
            graph += (f", bubble {r['in_flight_bubble_measured']:.2f} (timetable "
                      f"{r['in_flight_bubble_schedule']:.2f}) vs {r['in_flight_bubble_formula']:.2f})"
                      if "in_flight_bubble_measured" in r else ")")
        if "graph_bubble_measured" in r:
            graph += (f" bubble {r['graph_bubble_measured']:.2f} "
                      f"(timetable {r['graph_bubble_schedule']:.2f})")
        print(f"{r['system']:<22} B={r['batch']:<3} step {r['step_ms']:8.2f} ms  floor "
              f"{r['floor_ms']:7.2f} ms  x{r['step_over_floor']:.2f}{extra}{graph}")
        for k in sorted(k for k in r if k.endswith("_error")):
            print(f"    {k[:-len('_error')]} failed (the other results stand): {r[k]}")
        if "profile_table" in r:
            print(r["profile_table"])
    return report


def _checks(rows: list[dict]) -> dict:
    """The issue's bars, computed from the rows (reported, not enforced)."""
    out: dict = {}
    by = {(r["tp"], r["pp"], r["micro_batches"], r["batch"]): r for r in rows}
    alone = "_alone" if any(r.get("alone") for r in rows) else ""  # compute only: not TP's bar
    for B in sorted({r["batch"] for r in rows}):
        base = by.get((1, 1, 1, B))
        for tp in (2, 4):
            if base and (tp, 1, 1, B) in by:
                out[f"tp{tp}{alone}_speedup_b{B}"] = base["step_ms"] / by[(tp, 1, 1, B)]["step_ms"]
                for k, k1 in (("graph", "graph"), ("fast", "fast"), ("fast_symm", "fast"),
                              ("fast_fused", "fast")):
                    # the same ratio for the replayed steps (TP 1 has no all-reduce to replace)
                    if f"{k1}_step_ms" in base and f"{k}_step_ms" in by[(tp, 1, 1, B)]:
                        out[f"tp{tp}{alone}_{k}_speedup_b{B}"] = (base[f"{k1}_step_ms"]
                                                          / by[(tp, 1, 1, B)][f"{k}_step_ms"])
    out["max_step_over_floor"] = max(r["step_over_floor"] for r in rows)
    ratios = ("graph_over_floor", "fast_over_floor", "fast_symm_over_floor",  # eager all-reduce
              "fast_fused_over_floor",
              "graph_over_floor_graph_ar", "fast_over_floor_graph_ar",  # replayed all-reduces
              "fast_symm_over_floor_symm", "fast_fused_over_floor_symm")
    for k in ratios:
        if any(k in r for r in rows):
            out[f"max_{k}"] = max(r.get(k, 0.0) for r in rows)
    bubbles = [abs(r["bubble_measured"] - r["bubble_formula"]) for r in rows
               if "bubble_measured" in r]
    if bubbles:
        out["max_bubble_abs_error"] = max(bubbles)
        # the part of that gap that unequal stages explain (the rest: hand-overs)
        out["max_schedule_bubble_abs_error"] = max(abs(r["bubble_schedule"] - r["bubble_formula"])
                                                   for r in rows if "bubble_schedule" in r)
    flight = [abs(r["in_flight_bubble_measured"] - r["in_flight_bubble_formula"]) for r in rows
              if "in_flight_bubble_measured" in r]
    if flight:  # micro-batches in flight across steps, against their own formula
        out["max_in_flight_bubble_abs_error"] = max(flight)
    graph_bubbles = [abs(r["graph_bubble_measured"] - r["bubble_formula"]) for r in rows
                     if "graph_bubble_measured" in r]
    if graph_bubbles:  # the same gap with every micro-batch replayed from a CUDA graph
        out["max_graph_bubble_abs_error"] = max(graph_bubbles)
    return out
