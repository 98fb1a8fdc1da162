"""``bench agree``: TP / PP grids in bf16 against one device, within twice bf16's own error.

    workbench bench agree --json OUT.json [--model bundled] [--grids TP2,TP4,PP2,TP2xPP2] [--micro-batches 2] [--dtype bfloat16]

Scores the same sequences teacher-forced on one device (fp32 and ``--dtype``) and on every grid
(one job of ranks per world size: gloo on CPU, NCCL on GPUs); a grid passes when its largest logit
difference from one device is at most twice one device's own largest difference from fp32. See
:mod:`workbench.parallel.agreement` for why that bound. Not a speed benchmark: its JSON is the
bf16 evidence of issue 5's correctness bar, with the hardware named.
"""

from __future__ import annotations

import argparse
import datetime
import re
from pathlib import Path

from workbench.bench.run import write_report
from workbench.errors import WorkbenchError

GRID = re.compile(r"^(?:TP(\d+))?x?(?:PP(\d+))?(\+vocab)?$", re.IGNORECASE)


def parse_grids(text: str, micro_batches: int):
    """``"TP2,PP2,TP2xPP2,TP2+vocab"`` -> ParallelConfigs (PP grids with ``micro_batches``)."""
    from workbench.parallel import ParallelConfig

    grids = []
    for name in (t.strip() for t in text.split(",") if t.strip()):
        match = GRID.match(name)
        if not match or not (match[1] or match[2]):
            raise WorkbenchError(f"--grids: {name!r} is not TP<n>, PP<n>, TP<n>xPP<n> (+vocab)")
        tp, pp = int(match[1] or 1), int(match[2] or 1)
        grids.append(ParallelConfig(tp=tp, pp=pp, micro_batches=micro_batches if pp > 1 else 1,
                                    vocab_parallel=bool(match[3])))
    if not grids:
        raise WorkbenchError("--grids is empty")
    return tuple(grids)


def add_parser(bench_sub) -> None:
    b = bench_sub.add_parser("agree", help="bf16 logits of TP / PP grids vs one device")
    b.add_argument("--model", default="bundled",
                   help="a checkpoint directory or 'bundled' (not a preset: its ranks' random "
                        "shards are not one model)")
    b.add_argument("--grids", default="TP2,PP2,TP2xPP2",
                   help="comma-separated grids: TP<n>, PP<n>, TP<n>xPP<n>, with +vocab for a "
                        "vocabulary-parallel head")
    b.add_argument("--micro-batches", type=int, default=2, help="m of the PP grids")
    b.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    b.add_argument("--rows", type=int, default=4, help="sequences scored")
    b.add_argument("--prompt-len", type=int, default=4)
    b.add_argument("--new-tokens", type=int, default=28,
                   help="greedy tokens of the fp32 model appended to each prompt")
    b.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    b.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"),
                   help="auto: NCCL on GPUs (a GPU per rank), gloo on CPU; gloo on GPUs lets ranks "
                        "share GPUs (TP grids without +vocab: gloo's GPU collectives are "
                        "all-reduce and broadcast)")
    b.add_argument("--timeout", type=float, default=300.0, help="seconds for each job of ranks")
    b.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    b.add_argument("--json", required=True, type=Path, help="where to write the results")


def run(args: argparse.Namespace) -> dict:
    import torch

    from workbench.hardware import detect, resolve_device
    from workbench.parallel.agreement import AgreementCheck, check_agreement

    if args.micro_batches < 1:
        raise WorkbenchError(f"--micro-batches must be >= 1, got {args.micro_batches}")
    device = resolve_device(args.device)
    grids = parse_grids(args.grids, args.micro_batches)
    world = max(g.world_size for g in grids)
    backend = args.backend if args.backend != "auto" else (
        "nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda" and world > torch.cuda.device_count() and backend == "nccl":
        raise WorkbenchError(f"{world} ranks need {world} GPUs; this machine has "
                             f"{torch.cuda.device_count()} (--backend gloo lets ranks share GPUs)")
    check = AgreementCheck(args.model, grids, args.dtype, args.rows, args.prompt_len,
                           args.new_tokens)
    out = check_agreement(check, device.type, args.timeout, args.threads, backend)
    rows = [{"system": f"workbench/{r['grid']}"} | r for r in out["rows"]]
    report = {"benchmark": "agree", "hardware": detect(device).stamp() | {
                  "num_devices_used": min(world, max(1, torch.cuda.device_count()))
                  if device.type == "cuda" else world, "ranks": world, "backend": backend},
              "model": args.model, "dtype": args.dtype, "date": datetime.date.today().isoformat(),
              "workload": {"rows": args.rows, "prompt_len": args.prompt_len,
                           "new_tokens": args.new_tokens, "sequences": out["sequences"]},
              "results": rows,
              "checks": {"all_within_tolerance": all(r["within_tolerance"] for r in rows),
                         "max_diff_over_tolerance": max(r["max_abs_diff_vs_one_device"]
                                                        / r["tolerance"] for r in rows)}}
    write_report(report, args.json)
    print(f"one device, {args.dtype} vs fp32: max |logit diff| "
          f"{rows[0]['one_device_max_abs_diff_vs_fp32']:.4f} -> tolerance "
          f"{rows[0]['tolerance']:.4f} (logit std {rows[0]['logit_std']:.2f})")
    for r in rows:
        print(f"{r['grid']:<24} vs one device {r['max_abs_diff_vs_one_device']:.4f}  vs fp32 "
              f"{r['max_abs_diff_vs_fp32']:.4f}  top-1 {r['top1_agreement']:.3f} of "
              f"{r['positions']}  {'within' if r['within_tolerance'] else 'OUTSIDE'} tolerance")
    return report
