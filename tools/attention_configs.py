"""Launch choices of the fused RoPE + KV-write + paged-attention kernel (workbench.kv.paged_triton.
rope_paged_decode) on the 8B shape: splits x tile x num_warps x num_stages, each timed per layer
from a CUDA graph over as many layers' pools as the model has (so that, as in a decode step, no
layer's keys and values are still in L2), against the default choice and against the time to read
the keys and values once at the measured bandwidth. Each config's output is checked against the
default's. A diagnostic for issue 5's batch-32 step (the kernel took about 11 us a layer where its
keys and values take about 4 us to read; bench/results/decode-profile-attention-*_h200_*.json).
Time it at the context of the step that matters: ``bench tp --context-len 128 --steps 20`` times its
fused step with 152 tokens a row (10 blocks of 16), where a tile that fits 128 tokens exactly lost
(bench/results/tp1-attention-tile-*_h200_2026-12-05.json).

    python tools/attention_configs.py --json OUT.json [--tp 1] [--batches 1,32] [--context 128]
        [--splits 1,2,4,8] [--tiles 16,32,64] [--warps 2,4,8] [--stages 1,2,3] [--max-seconds 240]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from workbench.engine.cudagraph import graph_call_us
from workbench.hardware import detect, measure_roofline
from workbench.kv.paged_triton import num_splits, rope_paged_decode
from workbench.model.presets import preset_config
from workbench.parallel.plan import shard_config

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="llama-3.1-8b", help="a preset's name")
parser.add_argument("--batches", default="1,32")
parser.add_argument("--tp", type=int, default=1,
                    help="time one TP rank's shard: 1/tp of the heads, KV heads and MLP width")
parser.add_argument("--context", type=int, default=128, help="tokens per sequence after the step")
parser.add_argument("--block-size", type=int, default=16)
parser.add_argument("--splits", default="1,2,4,8")
parser.add_argument("--tiles", default="16,32,64")
parser.add_argument("--warps", default="2,4,8")
parser.add_argument("--stages", default="1,2,3")
parser.add_argument("--replays", type=int, default=20)
parser.add_argument("--max-seconds", type=float, default=240,
                    help="stop trying configs after this long (the rows so far are written)")
parser.add_argument("--json", required=True)
args = parser.parse_args()


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


device, dtype = torch.device("cuda"), torch.bfloat16
c = shard_config(preset_config(args.model), args.tp)  # one TP rank's shard (whole at --tp 1)
H, Hkv, D, layers = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_hidden_layers
bs = args.block_size
nb = -(-args.context // bs)  # blocks per sequence
roof = measure_roofline(device)
g = torch.Generator(device=device).manual_seed(0)
start = time.perf_counter()


def case(B: int):
    """Every layer's pools, tables, the step's qkv rows and angles for batch B."""
    blocks = B * nb + 1
    pools = [(torch.randn(blocks, bs, Hkv, D, generator=g, device=device).to(dtype),
              torch.randn(blocks, bs, Hkv, D, generator=g, device=device).to(dtype))
             for _ in range(layers)]
    tables = torch.arange(B * nb, device=device, dtype=torch.int32).view(B, nb)
    lens = torch.full((B,), args.context, device=device, dtype=torch.int32)
    pos = (lens - 1).long()
    slots = (tables[torch.arange(B, device=device), pos // bs].long() * bs + pos % bs)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, generator=g, device=device).to(dtype)
    angles = torch.rand(B, D // 2, generator=g, device=device) * 6.3
    cos, sin = (f(torch.cat((angles, angles), -1)).to(dtype) for f in (torch.cos, torch.sin))
    return pools, tables, lens, slots, qkv, cos, sin


def per_layer_us(B, data, **launch) -> tuple[float, torch.Tensor]:
    """Microseconds a layer of one graph that runs the kernel once per layer; the first layer's
    output."""
    pools, tables, lens, slots, qkv, cos, sin = data

    def layer(j):
        k, v = pools[j]
        return rope_paged_decode(qkv, cos, sin, k, v, slots, tables, lens, H, **launch)

    us, outs = graph_call_us(layer, layers, args.replays)
    return us, outs[0].clone()


rows, done = [], True
for B in ints(args.batches):
    if not done:  # --max-seconds reached: no batch's default timed without its configs
        break
    data = case(B)
    kv_read_us = B * (args.context - 1) * Hkv * D * 2 * 2 / roof.bandwidth * 1e6
    tile0 = 64 if D <= 64 else 32
    default_splits = num_splits(B, Hkv, -(-nb * bs // tile0), direct=True)
    base_us, want = per_layer_us(B, data)
    print(f"batch {B}: default (splits {default_splits}, tile {tile0}, Triton's warps and stages) "
          f"{base_us:.2f} us a layer; keys and values read once: {kv_read_us:.2f} us")
    rows.append({"batch": B, "default": True, "splits": default_splits, "tile": tile0,
                 "us_per_layer": base_us, "kv_read_us": kv_read_us})
    for splits, tile, warps, stages in itertools.product(ints(args.splits), ints(args.tiles),
                                                         ints(args.warps), ints(args.stages)):
        if time.perf_counter() - start > args.max_seconds:
            done = False
            break
        if (splits - 1) * tile >= nb * bs:  # more splits than tiles: some would be empty
            continue
        row = {"batch": B, "splits": splits, "tile": tile, "num_warps": warps, "num_stages": stages}
        try:
            us, got = per_layer_us(B, data, splits=splits, tile=tile, num_warps=warps,
                                   num_stages=stages)
        except Exception as err:  # noqa: BLE001 - a config the GPU cannot run (shared memory)
            row["error"] = f"{type(err).__name__}: {str(err)[:160]}"
            rows.append(row)
            continue
        row.update(us_per_layer=us, kv_read_us=kv_read_us, over_default=us / base_us,
                   max_abs_diff=(got.float() - want.float()).abs().max().item())
        rows.append(row)
    timed = [r for r in rows if r["batch"] == B and "over_default" in r]
    for r in sorted(timed, key=lambda r: r["us_per_layer"])[:5]:
        print(f"  splits {r['splits']} tile {r['tile']} warps {r['num_warps']} stages "
              f"{r['num_stages']}: {r['us_per_layer']:.2f} us ({r['over_default']:.2f}x default, "
              f"max |diff| {r['max_abs_diff']:.3g})")
    del data
    torch.cuda.empty_cache()

report = {"hardware": detect(device).stamp(), "model": f"preset:{args.model}", "tp": args.tp, "dtype": "bfloat16",
          "context": args.context, "block_size": bs, "bandwidth_GB_s": roof.bandwidth / 1e9,
          "complete": done, "rows": rows}
with open(args.json, "w") as f:
    json.dump(report, f, indent=1)
print(f"{len(rows)} rows in {time.perf_counter() - start:.0f} s -> {args.json}"
      + ("" if done else " (stopped at --max-seconds)"))
