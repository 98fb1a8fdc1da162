"""Each matrix product of a decode step alone: cuBLAS with compiled glue vs the skinny Triton kernel.

For the products of one Llama layer and the head (the 8B shape by default), at each batch, times
from CUDA graph replays:

- ``cublas``: F.linear alone (the GEMM as the fast path runs it, split-K reduction included);
- ``cublas+glue``: the fast path's piece, compiled: residual add + RMSNorm + F.linear (+ SiLU x up);
- ``skinny``: :func:`workbench.engine.skinny.skinny_linear`, autotuned, the same glue inside;

each against the time to read its weight at the measured copy bandwidth. Every graph calls the
product on enough distinct copies of the weight (>= 256 MB) that none is served from L2, as in a
decode step where each layer's weights are read once.

    python tools/skinny_gemm.py --json skinny.json [--preset llama-3.1-8b] [--tp 1] [--batches 1,32]

``--device cpu`` is a dry run of the script itself (under ``TRITON_INTERPRET=1``, e.g. with
``--preset smollm2-135m --ops qkv,o_proj,gate_up,down --batches 1,3``): eager timing, no CUDA graphs, glue not compiled, two weight copies; its
times say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from workbench.engine.cudagraph import graph_call_us
from workbench.engine.skinny import _tuned, reference, skinny_linear
from workbench.hardware import detect, measure_roofline
from workbench.model.presets import preset_config
from workbench.parallel.plan import shard_config

parser = argparse.ArgumentParser()
parser.add_argument("--preset", default="llama-3.1-8b", help="the shape: a preset's name")
parser.add_argument("--batches", default="1,32")
parser.add_argument("--tp", type=int, default=1,
                    help="time one TP rank's shard: 1/tp of the heads, KV heads and MLP width")
parser.add_argument("--replays", type=int, default=20)
parser.add_argument("--ops", default="qkv,o_proj,gate_up,down,lm_head", help="products timed")
parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
parser.add_argument("--json", required=True)
args = parser.parse_args()
if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    parser.error("--device cpu runs the kernel in Triton's interpreter: set TRITON_INTERPRET=1")

device = torch.device(args.device)
gpu = device.type == "cuda"
dtype = torch.bfloat16 if gpu else torch.float32  # the interpreter computes bf16 wrongly
c = shard_config(preset_config(args.preset), args.tp)  # one TP rank's shard (whole at --tp 1)
h, i, d = c.hidden_size, c.intermediate_size, c.head_dim
qkv_rows = (c.num_attention_heads + 2 * c.num_key_value_heads) * d
# name: (weight rows, K, add + norm, swiglu)
OPS = {"qkv": (qkv_rows, h, True, False), "o_proj": (h, c.num_attention_heads * d, False, False),
       "gate_up": (2 * i, h, True, True), "down": (h, i, False, False),
       "lm_head": (c.vocab_size, h, True, False)}
roof = measure_roofline(device, quick=not gpu)
g = torch.Generator(device=device).manual_seed(0)


torch._dynamo.config.recompile_limit = 64  # one version per (product, batch): 10 by default
# the compiled-glue way (workbench.engine.fastpath): add, norm, product, SiLU x up
compiled = torch.compile(reference, dynamic=False, fullgraph=True) if gpu else reference


@torch.inference_mode()
def per_call_us(fn, copies: int) -> float:
    """Microseconds per call of fn(j) over j = 0 .. copies - 1, from a CUDA graph (on the CPU dry
    run: one eager pass after a warm-up one)."""
    if not gpu:
        fn(0)
        start = time.perf_counter()
        for j in range(copies):
            fn(j)
        return (time.perf_counter() - start) * 1e6 / copies

    return graph_call_us(fn, copies, args.replays)[0]


rows = []
unknown = set(args.ops.split(",")) - set(OPS)
if unknown:
    parser.error(f"unknown ops {sorted(unknown)}; choose from {', '.join(OPS)}")
for name, (n, k, normed, swiglu) in ((op, OPS[op]) for op in args.ops.split(",")):
    nbytes = n * k * torch.finfo(dtype).bits // 8
    copies = max(2, -(-256 * 2**20 // nbytes)) if gpu else 2
    weights = [(torch.randn(n, k, generator=g, device=device) / k ** 0.5).to(dtype)
               for _ in range(copies)]
    norm = (1 + 0.1 * torch.randn(k, generator=g, device=device)).to(dtype) if normed else None
    floor_us = nbytes / roof.bandwidth * 1e6
    for b in (int(x) for x in args.batches.split(",")):
        x = torch.randn(b, k, generator=g, device=device).to(dtype)
        add = torch.randn(b, k, generator=g, device=device).to(dtype) if normed else None
        ways = {
            "cublas": lambda j: F.linear(x, weights[j]),
            "cublas+glue": lambda j: compiled(x, weights[j], add=add, norm=norm, swiglu=swiglu),
            "skinny": lambda j: skinny_linear(x, weights[j], add=add, norm=norm, swiglu=swiglu),
        }
        row = {"op": name, "batch": b, "weight_shape": [n, k], "weight_bytes": nbytes,
               "copies": copies, "floor_us": floor_us}
        for way, fn in ways.items():
            us = per_call_us(fn, copies)
            row[f"{way}_us"], row[f"{way}_over_floor"] = us, us / floor_us
            row[f"{way}_TB_s"] = nbytes / us / 1e6
        with torch.inference_mode():
            got = ways["skinny"](0)
            want = ways["cublas+glue"](0)
        got, want = (got[0], want[0]) if normed else (got, want)
        row["max_abs_diff_vs_glue"] = float((got.float() - want.float()).abs().max())
        row["max_abs_glue"] = float(want.float().abs().max())
        rows.append(row)
        print(f"{name:8s} b {b:3d}  floor {floor_us:7.1f} us   cublas {row['cublas_us']:7.1f} "
              f"({row['cublas_TB_s']:.2f} TB/s)  +glue {row['cublas+glue_us']:7.1f}  skinny "
              f"{row['skinny_us']:7.1f} ({row['skinny_TB_s']:.2f} TB/s, x{row['skinny_over_floor']:.2f})"
              f"  diff {row['max_abs_diff_vs_glue']:.3g}", flush=True)
totals = {}
for b in {r["batch"] for r in rows}:  # one layer's four products, as a decode step sees them
    layer = [r for r in rows if r["batch"] == b and r["op"] != "lm_head"]
    totals[str(b)] = {way: sum(r[f"{way}_us"] for r in layer)
                      for way in ("cublas", "cublas+glue", "skinny")} | {
                          "floor_us": sum(r["floor_us"] for r in layer)}
    print(f"batch {b}: a layer's products {totals[str(b)]}")
report = {"hardware": detect(device).stamp(), "preset": args.preset, "tp": args.tp, "dtype": str(dtype),
          "bandwidth_GB_s": roof.bandwidth / 1e9, "rows": rows, "layer_totals_us": totals,
          # the autotuner's choice per key (M, N, K, BM, ADD, NORM, SWIGLU, dtypes...)
          "skinny_configs": {str(key): str(cfg) for key, cfg in _tuned.cache.items()}}
with open(args.json, "w") as f:
    json.dump(report, f, indent=1)
