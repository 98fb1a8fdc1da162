"""The all-reduces of a TP decode step on N GPUs, checked before any long benchmark relies on them.

    python tools/gpu/allreduce_smoke.py [--ranks 2] [--timeout 90]

``--ranks 1`` on a one-GPU machine runs every back end's code path (buffers, rendezvous, capture)
with nothing to sum across: it finds an API that this PyTorch lacks, not an all-reduce's latency.

For each back end (NCCL through torch.distributed, and the one-shot through symmetric memory):
sums rank + 1 over the ranks eagerly and replayed from a CUDA graph, compares with
1 + 2 + ... + N, and times a replayed 8 KB all-reduce (bf16, [1, 4096]: batch 1 of the 8B shape).
Also prints what the one-shot depends on: peer access between the GPUs, the multicast switches,
the symmetric-memory back end. A back end that fails is reported and the other still runs; the
launcher's timeout ends a hang (tools/gpu/preflight.sh runs this first).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from workbench.engine.cudagraph import capture_graph
from workbench.parallel.allreduce import ALLREDUCES, make_reduce, reduce_latency_s
from workbench.parallel.launch import launch


def _check(ctx) -> dict:
    group, dev, world = dist.group.WORLD, ctx.device, ctx.world_size
    want = world * (world + 1) / 2
    out = {}
    for kind in ALLREDUCES:
        try:
            reduce = make_reduce(kind, group, 4096, torch.bfloat16, dev)  # "symm" checks its sum
            x = torch.full((1, 4096), float(ctx.rank + 1), dtype=torch.bfloat16, device=dev)
            eager = bool((reduce(x.clone()) == want).all())
            source = x.clone()
            graph, summed = capture_graph(lambda: reduce(source), warmup=1)
            try:
                source.copy_(x)
                graph.replay()
                torch.cuda.synchronize(dev)
                replayed = bool((summed == want).all())
            finally:
                graph.reset()
            us = reduce_latency_s(reduce, x.clone(), ctx.cpu_group, iters=50, graph=True) * 1e6
            out[kind] = {"eager_ok": eager, "graph_ok": replayed, "graph_us": round(us, 1)}
        except Exception as e:  # noqa: BLE001 - reported; the other back end still runs
            out[kind] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks", type=int, default=min(2, torch.cuda.device_count()))
    parser.add_argument("--timeout", type=float, default=90.0)
    args = parser.parse_args()
    n = torch.cuda.device_count()
    print(f"{n} GPUs; peer access from GPU 0:",
          [torch.cuda.can_device_access_peer(0, j) for j in range(1, n)])
    for var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST"):
        print(f"{var}={os.environ.get(var, '(unset: the launcher sets it off)')}")
    try:
        import torch.distributed._symmetric_memory as symm_mem

        print("symmetric memory back end:", symm_mem.get_backend(torch.device("cuda", 0)))
    except Exception as e:  # noqa: BLE001
        print("symmetric memory back end: unknown,", type(e).__name__, str(e)[:200])
    if args.ranks < 1 or args.ranks > n:
        raise SystemExit(f"--ranks must be 1 .. {n} (the GPUs here)")
    if args.ranks == 1:
        print("one rank: the code paths only (no peer to sum with; the latencies are not all-reduces')")
    for rank, result in enumerate(launch(_check, args.ranks, device="cuda", timeout_s=args.timeout)):
        print(f"rank {rank}: {result}")


if __name__ == "__main__":
    main()
