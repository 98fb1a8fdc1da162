"""GPU time of one decode step, per implementation, batch and context (CUDA graphs, CUDA events).

    python tools/profile_decode.py --model preset:llama-3.2-1b --json out.json

Variants: the model's plain forward over paged storage (gather + SDPA), the fused step
(workbench.engine.fastpath) compiled with gather attention, with the Triton paged kernel, with the
Triton kernel that also applies RoPE and writes the new key and value ("triton-rope"), the Triton
kernel without torch.compile, and triton-rope compiled in Inductor's max-autotune mode (the GEMMs
inside the compiled pieces timed as Triton templates against cuBLAS), and triton-rope with the products
as skinny Triton kernels holding the residual add, RMSNorm and SwiGLU ("fused-triton-linears",
workbench.engine.skinny: five kernels a layer). Each is captured in a CUDA
graph per shape and replayed; the median replay time is set against the bandwidth floor (weights +
KV bytes read per step).
A torch.profiler table of the fastest variant (``--profile-batches``, at the longest context) says
where the rest goes.
"""

import argparse
import json
import torch
from torch.profiler import ProfilerActivity, profile

from workbench.engine import skinny
from workbench.engine.cudagraph import capture_graph, replay_ms
from workbench.engine.fastpath import FusedDecoder
from workbench.hardware import detect, measure_roofline
from workbench.kv.paged import PagedKVCache, kv_bytes_per_token
from workbench.model.batch import ForwardBatch, PackedLayout
from workbench.model.loading import load_model

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="preset:llama-3.2-1b")
parser.add_argument("--batches", default="1,2,8,32,128,256")
parser.add_argument("--contexts", default="128,512")
parser.add_argument("--block-size", type=int, default=16)
parser.add_argument("--variants", default="all", help="comma-separated names, or all")
parser.add_argument("--profile-batches", default="1", help="batches profiled (longest context)")
parser.add_argument("--json", required=True)
args = parser.parse_args()

device = torch.device("cuda")
model = load_model(args.model, device, torch.bfloat16)
batches = [int(b) for b in args.batches.split(",")]
contexts = [int(c) for c in args.contexts.split(",")]
bs = args.block_size
max_blocks = max(contexts) // bs
kv = PagedKVCache(model.config, max(batches) * max_blocks + 1, bs, device, torch.bfloat16)
for pool in kv.k + kv.v:
    pool.normal_(0, 0.5)
roof = measure_roofline(device)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
per_token = kv_bytes_per_token(model.config, torch.bfloat16)

# FusedDecoder's options of each fused variant; "plain" is the model's own forward. Only the variants
# asked for are built: each holds its own fused copy of the weights (~9 GB for the 8B shape).
VARIANTS = {
    "plain": None,
    "fused-compiled-gather": dict(compile=True, attention="gather"),  # SDPA eager
    "fused-compiled-triton": dict(compile=True, attention="triton"),
    "fused-compiled-triton-rope": dict(compile=True, attention="triton-rope"),
    "fused-eager-triton": dict(compile=False, attention="triton"),
    # Inductor times its Triton GEMM templates against cuBLAS (and may fuse the glue into them)
    "fused-autotune-triton-rope": dict(compile="max-autotune-no-cudagraphs", attention="triton-rope"),
    # the products as skinny Triton kernels with the glue inside (workbench.engine.skinny)
    "fused-triton-linears": dict(compile=True, attention="triton-rope", linear="triton"),
    # o_proj, down and the LM head as plain skinny kernels where timed faster than cuBLAS
    "fused-fastest-linears": dict(compile=True, attention="triton-rope", linear="fastest"),
}
names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
unknown = [n for n in names if n not in VARIANTS]
if unknown:
    parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
variants = {n: None if VARIANTS[n] is None else FusedDecoder(model, kv, **VARIANTS[n]) for n in names}


def inputs(b: int, ctx: int):
    nb = ctx // bs
    tables = torch.arange(b * nb, device=device).view(b, nb)
    lens = torch.full((b,), ctx, device=device)
    pos = lens - 1
    slots = tables[:, -1] * bs + (ctx - 1) % bs
    ids = torch.randint(0, model.config.vocab_size, (b,), device=device)
    return ids, pos, slots, tables, lens


def step_fn(name: str, b: int, ctx: int):
    ids, pos, slots, tables, lens = inputs(b, ctx)
    fused = variants[name]
    if fused is not None:
        return lambda: fused(ids, pos, slots, tables, lens)
    layout = PackedLayout(slots=list(range(b)), query_lens=[1] * b, context_lens=[ctx] * b,
                          num_decodes=b, slot_mapping=slots, slots_t=slots, context_lens_t=lens,
                          block_tables=tables, decode_blocks=tables.shape[1])
    batch = ForwardBatch(input_ids=ids[None], positions=pos[None], layout=layout)
    return lambda: model(batch, kv)


@torch.inference_mode()
def graph_ms(fn, replays: int = 30) -> float:
    graph, _ = capture_graph(fn, warmup=3)
    ms = replay_ms(graph, replays)
    del graph
    return ms


rows = []
for ctx in contexts:
    for b in batches:
        floor_ms = (weights + b * ctx * per_token) / roof.bandwidth * 1e3
        for name in variants:
            try:
                ms = graph_ms(step_fn(name, b, ctx))
            except Exception as err:  # noqa: BLE001 - report and go on with the others
                print(f"{name} b={b} ctx={ctx}: {type(err).__name__}: {str(err)[:200]}")
                continue
            rows.append({"variant": name, "batch": b, "context": ctx, "step_ms": ms,
                         "floor_ms": floor_ms, "fraction_of_floor": floor_ms / ms,
                         "tok_s": b / ms * 1e3})
            print(f"ctx {ctx:4d} b {b:3d} {name:<24} {ms:7.3f} ms  floor {floor_ms:6.3f} ms "
                  f"({floor_ms / ms:5.1%})  {b / ms * 1e3:9.0f} tok/s", flush=True)

longest = [r for r in rows if r["context"] == max(contexts)]
total = {name: sum(r["step_ms"] for r in longest if r["variant"] == name)
         for name in {r["variant"] for r in longest}}
best = min(total, key=total.get) if total else next(iter(variants))  # fastest over the batches
print(f"profiling {best}")
tables = {}
for b in (int(x) for x in args.profile_batches.split(",")):
    with torch.inference_mode():
        fn = step_fn(best, b, max(contexts))  # the pools hold max(contexts) per row
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
    tables[f"profile_batch{b}"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=20)
    print(f"batch {b}, 5 steps:\n{tables[f'profile_batch{b}']}")
report = {"hardware": detect(device).stamp(), "model": args.model, "dtype": "bfloat16",
          "bandwidth_GB_s": roof.bandwidth / 1e9, "weight_bytes": weights,
          "kv_bytes_per_token": per_token, "rows": rows, "profiled_variant": best, **tables,
          # linear="fastest": per (device, dtype, rows, N, K), whether the skinny kernel won
          "skinny_faster_than_cublas": {str(k[2:]): v for k, v in skinny._choices.items()}}
for key, won in report["skinny_faster_than_cublas"].items():
    print(f"skinny vs cuBLAS, (rows, N, K) {key}: {'skinny' if won else 'cuBLAS'}")
with open(args.json, "w") as f:
    json.dump(report, f, indent=1, default=str)
