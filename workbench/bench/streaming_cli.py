"""``bench streaming``: dense, window, recomputation and attention sinks on one long stream.

Perplexity over the stream for each method (``workbench.streaming.score``) and the time per new
token in steady state (rolling caches full, dense at the end of the stream), with the ratios the
StreamingLLM bars name and the roofline's estimate of the speed-up. ``--time-only`` skips the
perplexities (for random-weight presets, whose perplexity means nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
from pathlib import Path

import torch

from workbench.bench.run import write_report
from workbench.errors import WorkbenchError


def add_parser(bench_sub) -> None:
    b = bench_sub.add_parser("streaming", help="StreamingLLM: four ways to score an endless stream")
    b.add_argument("--model", default="bundled")
    b.add_argument("--num-tokens", type=int, default=20000, help="length of the held-out stream")
    b.add_argument("--window", type=int, default=1024, help="keys each query sees (KV budget)")
    b.add_argument("--sinks", type=int, default=4, help="of the window, first tokens kept")
    b.add_argument("--chunk", type=int, default=1,
                   help="tokens per forward pass when scoring (1: token by token)")
    b.add_argument("--recompute-every", type=int, default=1,
                   help="evaluate recomputation at every N-th position only (it costs window x)")
    b.add_argument("--dense-max-tokens", type=int, default=None,
                   help="dense attention scores at most this many tokens (memory)")
    b.add_argument("--methods", default="dense,window,recompute,sinks")
    b.add_argument("--time-steps", type=int, default=16, help="decode steps timed per method")
    b.add_argument("--rounds", type=int, default=2,
                   help="timing rounds, methods alternating; each method keeps its best round")
    b.add_argument("--time-only", action="store_true", help="only the time per token")
    b.add_argument("--cuda-graphs", action="store_true",
                   help="also time the rolling caches' decode step replayed from a CUDA graph (GPU)")
    b.add_argument("--device", default="auto")
    b.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    b.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    b.add_argument("--json", required=True, type=Path, help="where to write the results")
    b.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> dict:
    from workbench.hardware import detect, measure_roofline, resolve_device
    from workbench.model.loading import load_model, load_tokenizer
    from workbench.streaming.cost import roofline_speedup
    from workbench.streaming.score import (LABELS, METHODS, StreamEval, long_stream,
                                           score_stream, time_per_token)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise WorkbenchError(f"--methods: unknown {unknown or 'empty list'}; choose from "
                             f"{', '.join(METHODS)}")
    if args.threads is not None:
        if args.threads < 1:
            raise WorkbenchError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.time_steps < 1 or args.rounds < 1:
        raise WorkbenchError(f"--time-steps and --rounds must be >= 1, got {args.time_steps} "
                             f"and {args.rounds}")
    spec = StreamEval(window=args.window, sinks=args.sinks, chunk=args.chunk,
                      recompute_every=args.recompute_every, dense_max_tokens=args.dense_max_tokens)
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, device, dtype)
    context = model.config.max_position_embeddings
    if args.window > context:
        raise WorkbenchError(f"--window {args.window} exceeds the model's context of {context}")
    warmup = 2
    need = args.window + warmup + args.time_steps
    if args.num_tokens < need:
        raise WorkbenchError(f"--num-tokens must be at least window + {warmup + args.time_steps}"
                             f" = {need} to time the full caches, got {args.num_tokens}")
    tokenizer = None if args.time_only else load_tokenizer(args.model)
    if tokenizer is None and not args.time_only:
        raise WorkbenchError(f"{args.model} has no tokenizer: perplexity needs real text; "
                             "use --time-only for a timing run")
    ids = long_stream(tokenizer, args.num_tokens, model.config.vocab_size)
    roofline = measure_roofline(device)
    elem = torch.tensor([], dtype=dtype).element_size()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # others running slow us
    report = {"benchmark": "streaming", "hardware": detect(device).stamp() | {"load_average": load},
              "model": args.model,
              "dtype": args.dtype, "date": datetime.date.today().isoformat(),
              "workload": {"stream": "held-out stdlib code" if tokenizer else "random ids",
                           "num_tokens": len(ids), "context": context,
                           **dataclasses.asdict(spec), "time_steps": args.time_steps,
                           "rounds": args.rounds},
              "roofline": {"bandwidth_GB_s": roofline.bandwidth / 1e9,
                           "peak_TFLOP_s": roofline.peak_flops / 1e12,
                           "speedup_recompute_vs_cache":
                               roofline_speedup(model.config, args.window, roofline, elem)},
              "results": []}
    dense_n = min(len(ids), args.dense_max_tokens or len(ids))
    best = {method: math.inf for method in methods}
    graphed = ([m for m in methods if m in ("window", "sinks")]
               if args.cuda_graphs and device.type == "cuda" else [])
    best_graph = {method: math.inf for method in graphed}
    for _ in range(args.rounds):  # alternate the methods: a busy spell slows them all alike
        for method in methods:
            timing_ids = ids[:dense_n] if method == "dense" else ids
            best[method] = min(best[method], time_per_token(
                model, timing_ids, method, spec, steps=args.time_steps, warmup=warmup))
            if method in graphed:
                best_graph[method] = min(best_graph[method], time_per_token(
                    model, ids, method, spec, steps=args.time_steps, warmup=warmup,
                    cuda_graphs=True))
    scores = {}
    for method in methods:
        seconds = best[method]
        row = {"system": f"workbench/{method}", "method": method, "label": LABELS[method],
               "ms_per_token": seconds * 1e3, "output_tok_s": 1 / seconds,
               "timed_at_history": dense_n if method == "dense" else args.window}
        if method in best_graph:
            row["ms_per_token_cuda_graph"] = best_graph[method] * 1e3
        if not args.time_only:
            score = scores[method] = score_stream(model, ids, method, spec,
                                                  progress=not args.no_progress)
            row |= {"ppl": score.ppl(), "ppl_first_context": score.ppl(0, context),
                    "ppl_beyond_context": score.ppl(context),
                    "positions_evaluated": row_positions(score),
                    "scoring_seconds": score.seconds,
                    "scoring_ms_per_token": 1e3 * score.seconds / max(1, row_positions(score)),
                    "forward_tokens": score.forward_tokens, "kv_tokens": score.kv_tokens}
        report["results"].append(row)
        print(f"{method:<10} {row['ms_per_token']:9.3f} ms/token"
              + (f" ({row['ms_per_token_cuda_graph']:.3f} from a CUDA graph)"
                 if "ms_per_token_cuda_graph" in row else "")
              + ("" if args.time_only else f"  ppl {row['ppl']:9.3f}"))
    report["comparison"] = _compare(report["results"], scores, context)
    write_report(report, args.json)
    for key, value in report["comparison"].items():
        print(f"{key}: {value}")
    return report


def row_positions(score) -> int:
    """How many positions a method scored."""
    return int(score.evaluated.sum())


def _compare(rows: list[dict], scores: dict, context: int) -> dict:
    """Ratios of the StreamingLLM bars, on the positions every compared method evaluated."""
    from workbench.streaming.score import VISIBLY_WORSE, window_over_sinks

    by = {row["method"]: row for row in rows}
    out: dict = {}
    if "sinks" in by and "recompute" in by:
        out["speedup_sinks_vs_recompute"] = (by["recompute"]["ms_per_token"]
                                             / by["sinks"]["ms_per_token"])
        if "ms_per_token_cuda_graph" in by["sinks"]:  # the rolling cache's step replayed
            out["speedup_sinks_cuda_graph_vs_recompute"] = (
                by["recompute"]["ms_per_token"] / by["sinks"]["ms_per_token_cuda_graph"])
    if "recompute" in scores:
        where = scores["recompute"].evaluated
        ref = scores["recompute"].ppl(where=where)
        out["ppl_on_recompute_positions"] = {m: s.ppl(where=where) for m, s in scores.items()}
        for m in ("sinks", "window", "dense"):
            if m in scores:
                out[f"ppl_{m}_over_recompute"] = scores[m].ppl(where=where) / ref
        if "sinks" in scores:
            out["bar_sinks_within_10pct_of_recompute"] = bool(
                abs(out["ppl_sinks_over_recompute"] - 1) <= 0.10)
    if "sinks" in scores and "window" in scores:  # after the first window: evictions began
        window = by["sinks"]["kv_tokens"]
        out["ppl_window_over_sinks_after_first_window"] = window_over_sinks(
            scores["window"], scores["sinks"], window)
        out["window_degrades_visibly"] = bool(out["ppl_window_over_sinks_after_first_window"] > VISIBLY_WORSE)
    if "speedup_sinks_vs_recompute" in out:
        out["bar_sinks_10x_faster_than_recompute"] = bool(out["speedup_sinks_vs_recompute"] >= 10)
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in out.items()}
