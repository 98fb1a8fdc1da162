"""``bench offload``: block vs row-by-row schedules and Accelerate under one fast-memory budget.

Order of work: check every policy against the budget (errors before any work), calibrate the cost
model on this machine (micro-benchmarks, then its compute terms fitted to short probe runs of a
4-layer copy of the model), build the offloaded model, time our policies (each GPU batch size warmed up
first), then free our model's device memory entirely before Accelerate runs, so that each system's
peak is its own. Accelerate gets ``max_memory`` = budget minus an estimate of its KV cache,
activations and logits at each batch size; a probe run measures the peak and, when it exceeds the
budget, ``max_memory`` is lowered by the excess and the same CPU weights are dispatched again
(:func:`workbench.offload.bench.accelerate_baseline`).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import tempfile
import time
from pathlib import Path

import torch

from workbench.bench.run import bench_device, write_report
from workbench.errors import WorkbenchError


def add_parser(bench_sub) -> None:
    b = bench_sub.add_parser("offload", help="offloading: block vs row schedule vs Accelerate")
    b.add_argument("--model", default="bundled", help="'bundled', a checkpoint dir or preset:NAME")
    b.add_argument("--device", default="auto")
    b.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on CUDA, float32 on a CPU")
    b.add_argument("--budget", default="4GiB", help="fast-memory budget, e.g. 4GiB, 64MiB")
    b.add_argument("--disk-dir", type=Path, default=None, help="folder of the disk tier")
    b.add_argument("--weights", default="auto",
                   help="weights split 'gpu,cpu,disk' percentages, or auto (the most on the gpu "
                        "tier with which every fixed batching fits)")
    b.add_argument("--kv", default="100,0,0", help="KV cache split 'gpu,cpu,disk'")
    b.add_argument("--kv-cpu-batchings", default="",
                   help="batchings that also run with the KV cache wholly in CPU RAM (0,100,0; "
                        "attention on the GPU unless --cpu-attention), in the same run")
    b.add_argument("--cpu-attention", action="store_true")
    b.add_argument("--compress-weights", action="store_true", help="4-bit weights off the gpu tier")
    b.add_argument("--batchings", default="1x1,8x1,8x4",
                   help="comma-separated BxN: N batches of B rows (effective batch B*N); Bxmax: "
                        "as many batches of B as the planner fits in the budget")
    b.add_argument("--schedules", default="block,row")
    b.add_argument("--row-batchings", default="all",
                   help="batchings the row schedule also runs ('all': every one with N > 1)")
    b.add_argument("--prompt-len", type=int, default=32)
    b.add_argument("--gen-len", type=int, default=8)
    b.add_argument("--accelerate-batches", default="1,8",
                   help="batch sizes for Accelerate's generate ('none' to skip)")
    b.add_argument("--init-device", default=None, help="where presets' random weights are drawn")
    b.add_argument("--smoke", action="store_true", help="quick calibration")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--json", required=True, type=Path, help="where to write the results")
    b.add_argument("--no-progress", action="store_true")


def _split(text: str, what: str):
    from workbench.offload.policy import Split

    try:
        g, c, d = (float(x) for x in text.split(","))
    except ValueError:
        raise WorkbenchError(f"--{what}: write three percentages 'gpu,cpu,disk', got {text!r}") from None
    return Split(g, c, d, what=what)


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise WorkbenchError(f"{flag}: write comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise WorkbenchError(f"{flag}: sizes must be >= 1, got {text!r}")
    return values


def run(args: argparse.Namespace) -> dict:
    from workbench.hardware import detect
    from workbench.model.loading import PRESET_PREFIX, load_model
    from workbench.model.presets import preset_config
    from workbench.offload.bench import Batching, bars, run_policies
    from workbench.offload.calibrate import calibrate_with_probes, measure_h2d
    from workbench.offload.memory import check_policy, max_num_batches, plan_memory
    from workbench.offload.policy import Budget, Policy, Split, check_disk_dir, parse_bytes
    from workbench.offload.schedule import OffloadedModel

    clock, phases = time.perf_counter(), {}

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[name] = round(now - clock, 2)
        clock = now

    device = bench_device(args)
    dtype = ((torch.bfloat16 if device.type == "cuda" else torch.float32) if args.dtype == "auto"
             else getattr(torch, args.dtype))
    for name in ("prompt_len", "gen_len"):
        if getattr(args, name) < (2 if name == "gen_len" else 1):
            raise WorkbenchError(f"--{name.replace('_', '-')} is too small: {getattr(args, name)}")
    batchings = [Batching.parse(t) for t in args.batchings.split(",")]
    schedules = args.schedules.split(",")
    for s in schedules:
        if s not in ("block", "row"):
            raise WorkbenchError(f"--schedules: unknown schedule {s!r} (block, row)")
    row_set = (None if args.row_batchings == "all"
               else {Batching.parse(t) for t in args.row_batchings.split(",")})
    acc_batches = ([] if args.accelerate_batches == "none"
                   else _ints(args.accelerate_batches, "--accelerate-batches"))
    budget = Budget(parse_bytes(args.budget),
                    args.disk_dir or Path(tempfile.mkdtemp(prefix="workbench-offload-")))
    is_preset = str(args.model).startswith(PRESET_PREFIX)
    model = None
    if is_preset:
        config = preset_config(str(args.model).removeprefix(PRESET_PREFIX))
    else:
        model = load_model(args.model, "cpu", dtype)
        config = model.config
    kv = _split(args.kv, "kv")
    planned = [(b, kv) for b in batchings] + [  # (batching, KV split) pairs
        (Batching.parse(t), Split(0, 100, 0, what="kv"))
        for t in args.kv_cpu_batchings.split(",") if t.strip()]
    P, G = args.prompt_len, args.gen_len

    def policy(weights: Split, b: Batching, schedule: str = "block", kv: Split = kv) -> Policy:
        return Policy(weights=weights, kv=kv, gpu_batch_size=b.gpu_batch_size,
                      num_gpu_batches=max(1, b.num_gpu_batches), schedule=schedule,
                      cpu_attention=args.cpu_attention, compress_weights=args.compress_weights)

    def fits(p: Policy) -> bool:
        return plan_memory(p, config, dtype, device.type, P, G).fast_total <= budget.fast_bytes

    weights = _choose_weights(args.weights, device, lambda w: all(
        fits(policy(w, b, kv=s)) for b, s in planned))  # Bxmax counts as Bx1 here
    resolved = []
    for b, s in planned:
        if not b.num_gpu_batches:
            n = max_num_batches(policy(weights, b, kv=s), config, dtype, device.type,
                                budget.fast_bytes, P, G)
            if n < 1:
                raise WorkbenchError(f"batching {b.label}: not one batch of {b.gpu_batch_size} "
                                     f"fits the budget with weights {weights.label}")
            b = Batching(b.gpu_batch_size, n)
        resolved.append((b, s))
    for b, s in resolved:  # a clear error before any work if something does not fit
        check_policy(policy(weights, b, kv=s), config, dtype, budget, device.type, P, G)
    check_disk_dir(budget.disk_dir)  # the calibration reads files there, whatever the policy
    phase("plan_s")
    cal, cal_details = calibrate_with_probes(config, dtype, device, budget.disk_dir, weights,
                                             quick=args.smoke)
    pageable = measure_h2d(device, pinned=False) if device.type == "cuda" else None
    gc.collect()
    left = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    phase("calibrate_s")
    init = args.init_device or (device.type if is_preset else "cpu")
    first, first_kv = resolved[0]
    om = OffloadedModel.build(model if model is not None else config,
                              policy(weights, first, kv=first_kv), budget, device, P, G,
                              dtype=dtype, init_device=init)
    model = None  # the store holds the weights now
    phase("build_s")
    streamed = sum(om.store.streamed_bytes(u)[1 if device.type == "cuda" else 0]
                   for u in range(len(om.store.units)))
    policies = [policy(weights, b, s, kv_split) for b, kv_split in resolved for s in schedules
                if s == "block" or (b.num_gpu_batches > 1
                                    and (row_set is None or b in row_set
                                         or Batching(b.gpu_batch_size, 0) in row_set))]
    rows = run_policies(om, policies, cal, P, G, streamed, progress=not args.no_progress)
    weight_bytes = om.weight_bytes
    phase("ours_s")
    hf = None
    if acc_batches and not args.compress_weights:
        from workbench.baselines.accelerate import hf_from_store

        hf = hf_from_store(om.store)  # a CPU copy of the same weights
    om.close()
    del om  # our device memory goes back before Accelerate runs: each peak is its own
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    accelerate = ({"skipped": "compressed weights"} if args.compress_weights and acc_batches
                  else {})
    if hf is not None:
        from workbench.offload.bench import accelerate_baseline

        rows_acc, accelerate = accelerate_baseline(hf, config, dtype, acc_batches, P, G, device,
                                                   budget, cal, weight_bytes)
        rows += rows_acc
        phase("accelerate_s")
    calibration = {**cal.to_dict(), "disk_GB_s": cal.disk_Bps / 1e9,
                   "h2d_pinned_GB_s": cal.h2d_Bps / 1e9 if device.type == "cuda" else None,
                   "h2d_pageable_GB_s": pageable / 1e9 if pageable else None,
                   "layer_fixed_ms": cal.layer_fixed_s * 1e3,
                   "layer_TFLOP_s": cal.layer_flop_rate(config) / 1e12}
    report = {"benchmark": "offload", "hardware": detect(device).stamp(), "model": args.model,
              "dtype": str(dtype).removeprefix("torch."), "date": datetime.date.today().isoformat(),
              "workload": {"prompt_len": P, "gen_len": G, "prompts": "random token ids",
                           "greedy": True, "ignore_eos": True},
              "budget_bytes": budget.fast_bytes, "weights_split": weights.label,
              "weight_bytes": weight_bytes, "streamed_bytes_per_step": streamed,
              "calibration": calibration, "calibration_details": cal_details,
              "device_bytes_after_calibration": left,
              "accelerate": accelerate, "results": rows}
    report["bars"] = bars(rows)
    report["cost_model_refit"] = _refit(report)
    phase("report_s")
    report["phases_s"] = phases
    write_report(report, args.json)
    _print(report)
    return report


def _refit(report: dict) -> dict | None:
    """The cost model fitted to this run's own rows (in-sample and leave-one-out; labelled so)."""
    from workbench.offload.report import refit

    if len([r for r in report["results"] if r["system"].startswith("workbench/")]) < 3:
        return None
    try:
        return {"note": "in-sample: fitted to these rows; the bar uses the a-priori predictions",
                **refit(report)}
    except Exception as err:  # an analysis of the rows: it must never cost the run's JSON
        return {"error": f"{type(err).__name__}: {err}"}


def _choose_weights(text: str, device: torch.device, fits):
    from workbench.offload.policy import Split

    if text != "auto":
        return _split(text, "weights")
    for g in range(100, -1, -5):  # the most on the fast tier that fits every batching
        w = Split(g, 100 - g, 0, what="weights") if device.type == "cuda" else \
            Split(g, 0, 100 - g, what="weights")
        if fits(w):
            return w
    raise WorkbenchError("no weights split fits the budget for these batchings: raise --budget "
                         "or use smaller batchings")


def _print(report: dict) -> None:
    print(f"offload bench: {report['model']} {report['dtype']} on {report['hardware']['device']}, "
          f"budget {report['budget_bytes'] / 2**30:.2f} GiB, weights {report['weights_split']}")
    for r in report["results"]:
        pred = r.get("predicted_decode_step_s")
        peak = r.get("peak_fast_bytes")
        print(f"{r['system']:<16} {r.get('policy', ''):<34} decode {r['decode_tok_s']:9.2f} tok/s  "
              f"bound {r['bound_tok_s']:9.2f} ({r['fraction_of_bound']:6.1%})"
              + (f"  step pred/meas {pred * 1e3:7.1f}/{r['decode_step_median_s'] * 1e3:7.1f} ms"
                 if pred is not None else "")
              + (f"  peak {peak / 2**30:.2f} GiB" if peak else "")
              + (f" (plan {r['planned_fast_bytes'] / 2**30:.2f})" if "planned_fast_bytes" in r
                 else ""))
    for k, v in report["bars"].items():
        print(f"  {k}: {v}")
    refitted = report.get("cost_model_refit") or {}
    if refitted.get("max_abs_fitted_error") is not None:
        print(f"  cost model refit on these rows (in-sample): max |error| "
              f"{refitted['max_abs_fitted_error']:.1%}, stalled: {refitted['stalled']}")
    print(f"  phases (s): {report.get('phases_s')}")
