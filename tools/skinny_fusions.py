"""Which fusion makes a skinny product slow: each normed product of the 8B shape (qkv, gate_up,
lm_head) timed with the residual add and RMSNorm in the kernel or not, against cuBLAS, at batch 1
and 32, bf16, L2 defeated by weight copies, each from a CUDA graph. A diagnostic for
workbench.engine.skinny (tools/skinny_gemm.py times the products as the decode step uses them).

    python tools/skinny_fusions.py --json OUT.json [--tp 1] [--ops qkv,gate_up,lm_head] [--batches 1,32]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from workbench.engine.cudagraph import graph_call_us
from workbench.engine.skinny import _tuned, skinny_linear
from workbench.hardware import detect, measure_roofline
from workbench.model.presets import preset_config
from workbench.parallel.plan import shard_config

parser = argparse.ArgumentParser()
parser.add_argument("--ops", default="qkv,gate_up,lm_head")
parser.add_argument("--batches", default="1,32")
parser.add_argument("--tp", type=int, default=1,
                    help="time one TP rank's shard: 1/tp of the heads, KV heads and MLP width")
parser.add_argument("--replays", type=int, default=20)
parser.add_argument("--json", required=True)
args = parser.parse_args()
device, dtype = torch.device("cuda"), torch.bfloat16
c = shard_config(preset_config("llama-3.1-8b"), args.tp)  # one TP rank's shard (whole at --tp 1)
h, i = c.hidden_size, c.intermediate_size
OPS = {"qkv": ((c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim, False),
       "gate_up": (2 * i, True), "lm_head": (c.vocab_size, False)}
roof = measure_roofline(device)
g = torch.Generator(device=device).manual_seed(0)


def per_call_us(fn, copies: int) -> float:
    """Microseconds per call of fn(j) over j = 0 .. copies - 1, all of them in one CUDA graph."""
    return graph_call_us(fn, copies, args.replays)[0]


rows = []
for name in args.ops.split(","):
    n, swiglu = OPS[name]
    nbytes = n * h * 2
    copies = max(2, -(-256 * 2**20 // nbytes))
    weights = [(torch.randn(n, h, generator=g, device=device) / h ** 0.5).to(dtype)
               for _ in range(copies)]
    norm = (1 + 0.1 * torch.randn(h, generator=g, device=device)).to(dtype)
    for b in (int(x) for x in args.batches.split(",")):
        x = torch.randn(b, h, generator=g, device=device).to(dtype)
        add = torch.randn(b, h, generator=g, device=device).to(dtype)
        row = {"op": name, "batch": b, "floor_us": nbytes / roof.bandwidth * 1e6,
               "cublas_us": per_call_us(lambda j: F.linear(x, weights[j]), copies)}
        for label, kw in (("plain", {}), ("add", {"add": add}), ("norm", {"norm": norm}),
                          ("add+norm", {"add": add, "norm": norm})):
            row[f"{label}_us"] = per_call_us(
                lambda j: skinny_linear(x, weights[j], swiglu=swiglu, **kw), copies)
        rows.append(row)
        print(" ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in row.items()), flush=True)
report = {"hardware": detect(device).stamp(), "tp": args.tp, "rows": rows,
          "skinny_configs": {str(k): str(v) for k, v in _tuned.cache.items()}}
with open(args.json, "w") as f:
    json.dump(report, f, indent=1)
for k, v in report["skinny_configs"].items():
    print(k, v)
