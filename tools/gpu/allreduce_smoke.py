"""The all-reduces of a TP decode step on N GPUs, checked before any long benchmark relies on them.

    python tools/gpu/allreduce_smoke.py [--ranks 2] [--timeout 90]

``--ranks 1`` on a one-GPU machine runs every back end's code path (buffers, rendezvous, capture)
with nothing to sum across: it finds an API that this PyTorch lacks, not an all-reduce's latency.

For each back end (NCCL through torch.distributed, and the one-shot through symmetric memory):
sums rank + 1 over the ranks eagerly and replayed from a CUDA graph, compares with
1 + 2 + ... + N, and times a replayed 8 KB all-reduce (bf16, [1, 4096]: batch 1 of the 8B shape).
Then the same for the all-reduce fused with the residual add and RMSNorm ("fused"), timed at
batch 1 and 32.
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
    try:
        out["fused"] = _check_fused(ctx, group, want)
    except Exception as e:  # noqa: BLE001 - reported like the others
        out["fused"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def _check_fused(ctx, group, want: float) -> dict:
    """The all-reduce fused with the residual add and RMSNorm (workbench.parallel.allreduce_norm):
    its own check at construction (eager), then two calls replayed from a CUDA graph - one per
    buffer - each summing rank + 1 into a zero residual; and its replayed latency per call at
    batch 1 and 32 (the kernel alone: barrier, sum over the ranks, add, norm)."""
    from workbench.parallel.allreduce_norm import AllReduceAddNorm

    dev = ctx.device
    fused = AllReduceAddNorm(group, 32, 4096, torch.bfloat16, dev)  # checks its sum eagerly
    ones = torch.ones(4096, dtype=torch.bfloat16, device=dev)
    residuals = [torch.zeros(1, 4096, dtype=torch.bfloat16, device=dev) for _ in range(2)]

    def two_calls():
        fused.begin()
        for residual in residuals:
            residual.zero_()
            fused.partial(1).fill_(ctx.rank + 1)
            fused(residual, ones, 1e-5)

    graph, _ = capture_graph(two_calls, warmup=1)
    try:
        for residual in residuals:
            residual.fill_(-1)
        graph.replay()
        torch.cuda.synchronize(dev)
        replayed = all(bool((r == want).all()) for r in residuals)
    finally:
        graph.reset()
    result = {"eager_ok": True, "graph_ok": replayed}
    for rows in (1, 32):
        residual = torch.zeros(rows, 4096, dtype=torch.bfloat16, device=dev)
        call = lambda x: fused(x, ones, 1e-5)[1]  # noqa: E731 - whatever the buffers hold
        us = reduce_latency_s(call, residual, ctx.cpu_group, iters=50, graph=True) * 1e6
        result[f"graph_us_b{rows}"] = round(us, 1)
    return result


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
