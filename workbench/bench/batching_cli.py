"""``bench batching``: static vs continuous batching, ours beside transformers', one workload."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
from pathlib import Path

import torch

from workbench.bench.run import bench_device, write_report
from workbench.errors import WorkbenchError


def add_parser(bench_sub) -> None:
    b = bench_sub.add_parser("batching", help="static vs continuous, ours and transformers'")
    b.add_argument("--model", default="bundled")
    b.add_argument("--workload", default="natural",
                   help="natural, poisson, anyscale, design-anchor (see workbench.workloads)")
    b.add_argument("--num-requests", type=int, default=None)
    b.add_argument("--caps", default=None,
                   help="comma-separated output caps: sweep the Anyscale workload over them")
    b.add_argument("--device", default="auto")
    b.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    b.add_argument("--systems", default=None, help="comma-separated subset of the systems")
    b.add_argument("--batch-size", type=int, default=32, help="static batch size")
    b.add_argument("--max-num-seqs", type=int, default=32)
    b.add_argument("--max-num-batched-tokens", type=int, default=2048)
    b.add_argument("--chunked-prefill", action="store_true")
    b.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own choice)")
    b.add_argument("--repeats", type=int, default=1,
                   help="serve the requests this many times per system, in rounds, and keep each "
                        "system's fastest run (a shared machine's slow spells only add time)")
    b.add_argument("--json", required=True, type=Path, help="where to write the results")
    b.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> dict:
    from workbench.bench.batching import SYSTEMS, BatchingBench, bench_batching
    from workbench.hardware import detect, measure_roofline
    from workbench.model.loading import load_model, load_tokenizer
    from workbench.workloads import anyscale, make_requests, workload

    if args.repeats < 1:
        raise WorkbenchError(f"--repeats must be >= 1, got {args.repeats}")
    device = bench_device(args)
    dtype = getattr(torch, args.dtype)
    systems = tuple(args.systems.split(",")) if args.systems else SYSTEMS
    bench = BatchingBench(systems=systems, batch_size=args.batch_size,
                          max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          chunked_prefill=args.chunked_prefill)
    model = load_model(args.model, device, dtype)
    tokenizer = load_tokenizer(args.model)
    hf_model = None
    if any(s.startswith("transformers/") for s in systems):
        from workbench.baselines.hf import load_hf_model

        hf_model = load_hf_model(args.model, device, dtype)
    context = model.config.max_position_embeddings
    overrides = {} if args.num_requests is None else {"num_requests": args.num_requests}
    caps = [int(c) for c in args.caps.split(",")] if args.caps else [None]
    roofline = measure_roofline(device)
    report = {"benchmark": "batching", "hardware": detect(device).stamp(), "model": args.model,
              "dtype": args.dtype, "repeats": args.repeats,
              "date": datetime.date.today().isoformat(),
              "config": dataclasses.asdict(bench),
              "roofline": {"bandwidth_GB_s": roofline.bandwidth / 1e9,
                           "peak_TFLOP_s": roofline.peak_flops / 1e12},
              "workload": [], "results": []}
    for cap in caps:
        spec = (anyscale(cap, context, **overrides) if cap is not None
                else workload(args.workload, **overrides))
        requests = make_requests(spec, tokenizer, model.config.vocab_size, context)
        report["workload"].append(_describe(spec, requests))
        for row in bench_batching(model, hf_model, requests, bench, roofline,
                                  progress=not args.no_progress, repeats=args.repeats):
            report["results"].append({"workload": spec.name, "cap": cap, **row})
    if len(caps) == 1:
        report["workload"] = report["workload"][0]
    write_report(report, args.json)
    for row in report["results"]:
        print(f"{row['workload']:<16} {row['system']:<26} {row['output_tok_s']:9.1f} useful tok/s"
              f"  median TTFT {row.get('median_ttft_ms') or 0:8.1f} ms")
    return report


def _describe(spec, requests) -> dict:
    plain = {k: (repr(v) if dataclasses.is_dataclass(v) else v)
             for k, v in dataclasses.asdict(spec).items()}
    prompt = [len(r.prompt_ids) for r in requests]
    return plain | {"mean_prompt_len": sum(prompt) / max(1, len(prompt)),
                    "mean_max_new_tokens": sum(r.max_new_tokens for r in requests)
                    / max(1, len(requests))}
