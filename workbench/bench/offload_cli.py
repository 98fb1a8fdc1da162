"""``bench offload``: block vs row-by-row schedules and Accelerate under one fast-memory budget."""

from __future__ import annotations

import argparse
import datetime
import tempfile
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
                   help="weights split 'gpu,cpu,disk' percentages, or auto (most on gpu that fits)")
    b.add_argument("--kv", default="100,0,0", help="KV cache split 'gpu,cpu,disk'")
    b.add_argument("--cpu-attention", action="store_true")
    b.add_argument("--compress-weights", action="store_true", help="4-bit weights off the gpu tier")
    b.add_argument("--batchings", default="1x1,8x1,8x4",
                   help="comma-separated BxN: N batches of B rows (effective batch B*N)")
    b.add_argument("--schedules", default="block,row")
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


def run(args: argparse.Namespace) -> dict:
    from workbench.hardware import detect
    from workbench.model.loading import PRESET_PREFIX, load_model
    from workbench.model.presets import preset_config
    from workbench.offload.bench import Batching, bars, random_prompts, run_policies
    from workbench.offload.cost import calibrate, measure_h2d
    from workbench.offload.policy import Budget, Policy, Split, check_policy, parse_bytes, plan_memory
    from workbench.offload.schedule import OffloadedModel

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
    acc_batches = ([] if args.accelerate_batches == "none"
                   else [int(x) for x in args.accelerate_batches.split(",")])
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
    P, G = args.prompt_len, args.gen_len

    def policy(weights: Split, b: Batching, schedule: str = "block") -> Policy:
        return Policy(weights=weights, kv=kv, gpu_batch_size=b.gpu_batch_size,
                      num_gpu_batches=b.num_gpu_batches, schedule=schedule,
                      cpu_attention=args.cpu_attention, compress_weights=args.compress_weights)

    weights = _choose_weights(args.weights, device, lambda w: all(
        plan_memory(policy(w, b), config, dtype, device.type, P, G).fast_total <= budget.fast_bytes
        for b in batchings))
    for b in batchings:  # a clear error before any work if something does not fit
        check_policy(policy(weights, b), config, dtype, budget, device.type, P, G)
    cal = calibrate(config, dtype, device, budget.disk_dir, quick=args.smoke)
    init = args.init_device or (device.type if is_preset else "cpu")
    om = OffloadedModel.build(model if model is not None else config, policy(weights, batchings[0]),
                              budget, device, P, G, dtype=dtype, init_device=init)
    model = None  # the store holds the weights now
    om.generate(random_prompts(batchings[0].gpu_batch_size * batchings[0].num_gpu_batches, P,
                               config.vocab_size, seed=99), 2)  # warm-up
    streamed = sum(om.store.streamed_bytes(u)[1 if device.type == "cuda" else 0]
                   for u in range(len(om.store.units)))
    policies = [policy(weights, b, s) for b in batchings for s in schedules
                if s == "block" or b.num_gpu_batches > 1]
    rows = run_policies(om, policies, cal, P, G, streamed, progress=not args.no_progress)
    accelerate = {}
    if acc_batches:
        rows_acc, accelerate = _accelerate(om, acc_batches, P, G, device, budget, cal, args)
        rows += rows_acc
    om.close()
    report = {"benchmark": "offload", "hardware": detect(device).stamp(), "model": args.model,
              "dtype": str(dtype).removeprefix("torch."), "date": datetime.date.today().isoformat(),
              "workload": {"prompt_len": P, "gen_len": G, "prompts": "random token ids",
                           "greedy": True, "ignore_eos": True},
              "budget_bytes": budget.fast_bytes, "weights_split": weights.label,
              "weight_bytes": om.weight_bytes, "streamed_bytes_per_step": streamed,
              "calibration": {"disk_GB_s": cal.disk_Bps / 1e9,
                              "h2d_pinned_GB_s": cal.h2d_Bps / 1e9 if device.type == "cuda" else None,
                              "h2d_pageable_GB_s": (measure_h2d(device, pinned=False) / 1e9
                                                    if device.type == "cuda" else None),
                              "layer_fixed_ms": cal.layer_fixed_s * 1e3,
                              "layer_TFLOP_s": cal.layer_flop_rate(config) / 1e12},
              "accelerate": accelerate, "results": rows}
    report["bars"] = bars(rows)
    write_report(report, args.json)
    _print(report)
    return report


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


def _accelerate(om, batches, P, G, device, budget, cal, args):
    from workbench.baselines.accelerate import dispatch, hf_from_store, placement_summary
    from workbench.offload.bench import accelerate_rows
    from workbench.offload.policy import Policy, Split, plan_memory

    if om.policy.compress_weights:
        return [], {"skipped": "compressed weights"}
    # Accelerate keeps the KV cache on the device: reserve room for it and for the temporaries
    full = Policy(weights=Split(0, 100, 0), gpu_batch_size=max(batches))
    plan = plan_memory(full, om.config, om.store.dtype, device.type, P, G)
    reserve = plan.kv + plan.activations + plan.workspace
    fast = budget.fast_bytes - reserve
    hf = hf_from_store(om.store)
    folder = Path(budget.disk_dir) / "accelerate"
    hf, device_map = dispatch(hf, device, fast, folder)
    evict = folder if "disk" in device_map.values() else None  # cold disk reads, as ours
    from workbench.baselines.accelerate import run_accelerate
    from workbench.offload.bench import random_prompts

    run_accelerate(hf, random_prompts(1, P, om.config.vocab_size, seed=98), 2, device)  # warm-up
    rows = accelerate_rows(hf, batches, P, G, om.config.vocab_size, device, budget.fast_bytes,
                           om.weight_bytes, cal, progress=not args.no_progress, evict=evict)
    info = {"max_memory_weights_bytes": fast, "reserved_for_kv_and_temporaries_bytes": reserve,
            "layers": placement_summary(device_map, om.config.num_hidden_layers)}
    del hf
    return rows, info


def _print(report: dict) -> None:
    print(f"offload bench: {report['model']} {report['dtype']} on {report['hardware']['device']}, "
          f"budget {report['budget_bytes'] / 2**30:.2f} GiB, weights {report['weights_split']}")
    for r in report["results"]:
        pred = r.get("predicted_decode_step_s")
        print(f"{r['system']:<16} {r.get('policy', ''):<44} decode {r['decode_tok_s']:9.2f} tok/s  "
              f"bound {r['bound_tok_s']:9.2f}  ({r['fraction_of_bound']:6.1%})"
              + (f"  step pred/meas {pred * 1e3:8.1f}/{r['decode_step_s'] * 1e3:8.1f} ms"
                 if pred is not None else ""))
    for k, v in report["bars"].items():
        print(f"  {k}: {v}")
