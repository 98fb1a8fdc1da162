"""``bench paged``: paged vs contiguous KV storage, eager vs CUDA graphs (see bench/paged.py)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
from pathlib import Path

import torch

from workbench.bench.run import bench_device, write_report
from workbench.errors import WorkbenchError


def add_parser(bench_sub) -> None:
    b = bench_sub.add_parser("paged", help="paged vs contiguous KV, CUDA graphs, batch-1 decode, "
                                           "KV budget sweep")
    b.add_argument("--model", default="bundled")
    b.add_argument("--workload", default="design-anchor",
                   help="natural, poisson, anyscale, design-anchor (see workbench.workloads)")
    b.add_argument("--num-requests", type=int, default=None)
    b.add_argument("--device", default="auto")
    b.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    b.add_argument("--systems", default=None, help="comma-separated subset of the systems")
    b.add_argument("--max-num-seqs", type=int, default=256)
    b.add_argument("--max-num-batched-tokens", type=int, default=8192)
    b.add_argument("--block-size", type=int, default=16)
    b.add_argument("--batch1-tokens", type=int, default=256,
                   help="tokens decoded in the batch-1 test (0: skip it)")
    b.add_argument("--budgets", default="",
                   help="comma-separated KV budgets in GiB for the sweep (empty: skip it)")
    b.add_argument("--repeats", type=int, default=1,
                   help="runs per budget and policy in the sweep, the policies taking turns; "
                        "each one's fastest is reported")
    b.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    b.add_argument("--json", required=True, type=Path, help="where to write the results")
    b.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> dict:
    from workbench.bench.paged import (SYSTEMS, PagedBench, bench_batch1, bench_budgets,
                                       bench_throughput)
    from workbench.bench.batching_cli import _describe
    from workbench.hardware import detect, measure_roofline
    from workbench.model.loading import load_model, load_tokenizer
    from workbench.workloads import make_requests, workload

    if args.repeats < 1:
        raise WorkbenchError(f"--repeats must be >= 1, got {args.repeats}")
    device = bench_device(args)
    try:
        budgets = [float(x) for x in args.budgets.split(",") if x.strip()]
    except ValueError:
        raise WorkbenchError(f"--budgets must be numbers in GiB, got {args.budgets!r}") from None
    systems = tuple(args.systems.split(",")) if args.systems else SYSTEMS
    bench = PagedBench(systems, args.max_num_seqs, args.max_num_batched_tokens, args.block_size)
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model, device, dtype)
    tokenizer = load_tokenizer(args.model)
    hf_model = None
    if "transformers/continuous" in systems or args.batch1_tokens:
        from workbench.baselines.hf import load_hf_model

        hf_model = load_hf_model(args.model, device, dtype)
    overrides = {} if args.num_requests is None else {"num_requests": args.num_requests}
    spec = workload(args.workload, **overrides)
    context = model.config.max_position_embeddings
    requests = make_requests(spec, tokenizer, model.config.vocab_size, context)
    roofline = measure_roofline(device)
    progress = not args.no_progress
    report = {"benchmark": "paged", "hardware": detect(device).stamp(), "model": args.model,
              "dtype": args.dtype, "date": datetime.date.today().isoformat(),
              "config": dataclasses.asdict(bench), "workload": _describe(spec, requests),
              "roofline": {"bandwidth_GB_s": roofline.bandwidth / 1e9,
                           "peak_TFLOP_s": roofline.peak_flops / 1e12}}
    report["results"] = bench_throughput(model, hf_model, requests, bench, roofline, progress)
    for row in report["results"]:
        floor = f"  {row['fraction_of_floor']:6.1%} of floor" if "fraction_of_floor" in row else ""
        print(f"{row['system']:<26} {row['output_tok_s']:9.1f} useful tok/s{floor}")
    if args.batch1_tokens:
        prompt = requests[0].prompt_ids
        report["batch1"] = bench_batch1(model, hf_model, prompt, args.batch1_tokens, bench,
                                        roofline)
        for row in report["batch1"]:
            print(f"batch 1 {row['system']:<24} {row['decode_tok_s']:8.1f} tok/s = "
                  f"{row['fraction_of_limit']:6.1%} of {row['limit_tok_s']:.0f}")
    if budgets:
        report["repeats"] = args.repeats
        report["budgets"] = bench_budgets(model, requests, bench, budgets, progress, args.repeats)
        for row in report["budgets"]:
            print(f"{row['budget_gib']:5.2f} GiB {row['policy']:<24} peak batch "
                  f"{row['peak_running']:4d} real {row['real_fraction']:6.1%} "
                  f"{row['output_tok_s']:9.1f} tok/s")
    write_report(report, args.json)
    return report
