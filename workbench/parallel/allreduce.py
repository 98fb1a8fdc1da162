"""The all-reduce of a tensor-parallel decode step, two ways: NCCL, or one-shot through symmetric memory.

A TP decode step sums two partial outputs per layer over the ranks (after attention's output
projection and after the MLP's down projection): 64 all-reduces per token for a 32-layer model,
each of only ``batch x hidden`` values (8 KB at batch 1, 256 KB at batch 32 in bf16). At that size an
all-reduce is all latency: NCCL's took 38-57 us eager and about 19 us replayed from a CUDA graph on
H200s (2026-11-27), so 64 of them cost more than reading a quarter of an 8B model's weights.

The *one-shot* all-reduce (vLLM's custom all-reduce, PyTorch's ``symm_mem.one_shot_all_reduce``)
trades bandwidth for latency. Every rank keeps a buffer that every other GPU of the host can read
directly (*symmetric memory*: the same allocation mapped into each peer's address space, over
NVLink). A step copies its partial sum into its buffer; one kernel then waits at a barrier until
every rank has written, reads all ``world`` buffers, adds them and writes the sum, and passes a
second barrier so that no rank overwrites its buffer while a peer still reads it::

    rank r:  buffer_r <- partial_r ; barrier ; out = buffer_0 + ... + buffer_(w-1) ; barrier

(one kernel where PyTorch has ``one_shot_all_reduce_copy_out``, which copies the partial sum in
itself; else a copy, then the kernel)

One kernel, no ring of steps, each rank reading ``world x`` the message: right for small messages,
wrong for large ones (NCCL's ring moves ``2 (w-1)/w x`` the message per rank). Only peer loads are
used - NVLink multicast (``multimem``) stays off (:func:`workbench.parallel.launch.init_distributed`
sets ``TORCH_SYMM_MEM_DISABLE_MULTICAST`` in every rank).

GPU only (symmetric memory is CUDA's); :func:`make_reduce` raises a clear error elsewhere. Used by
``bench tp --symm-mem`` (:mod:`workbench.parallel.measure`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from workbench.errors import WorkbenchError

__all__ = ["ALLREDUCES", "check_rank_sum", "make_reduce", "reduce_latency_s",
           "symmetric_buffer"]

ALLREDUCES = ("dist", "symm")


def symmetric_buffer(group, numel: int, dtype: torch.dtype, device: torch.device):
    """``(buffer, handle)``: ``numel`` values of this rank that every GPU of ``group`` can read
    (symmetric memory), and the handle with the peers' addresses (``buffer_ptrs``,
    ``signal_pad_ptrs``). A collective call: every rank of ``group`` makes it."""
    import torch.distributed._symmetric_memory as symm_mem

    if torch.torch_version.TorchVersion(torch.__version__) < (2, 11):
        symm_mem.enable_symm_mem_for_group(group.group_name)  # needed before 2.11, deprecated since
    buffer = symm_mem.empty(numel, dtype=dtype, device=device)
    return buffer, symm_mem.rendezvous(buffer, group.group_name)  # the mappings, exchanged


def check_rank_sum(summed: torch.Tensor, world: int, rank: int, what: str) -> None:
    """The probe every all-reduce here runs once before anyone times or captures it: rank r gave
    r + 1 in every place, so every place of ``summed`` must hold 1 + 2 + ... + world."""
    want = world * (world + 1) / 2
    if not bool((summed == want).all()):
        raise WorkbenchError(f"{what} summed wrong on rank {rank}: "
                             f"{summed.reshape(-1)[:4].tolist()}..., expected {want:g}")


def make_reduce(kind: str, group, max_numel: int, dtype: torch.dtype,
                device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The sum over ``group`` of a contiguous tensor of at most ``max_numel`` values, returned
    (``t`` itself, summed in place, or a new tensor): ``"dist"`` (``torch.distributed.all_reduce``:
    NCCL on GPUs, gloo on CPUs) or ``"symm"`` (one-shot through a symmetric buffer made here, a
    collective call: every rank of ``group`` must make it; its sum is checked once here)."""
    if kind not in ALLREDUCES:
        raise WorkbenchError(f"all-reduce must be one of {', '.join(ALLREDUCES)}, not {kind!r}")
    if kind == "dist":
        def summed(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t, group=group)
            return t
        return summed
    if device.type != "cuda":
        raise WorkbenchError("the one-shot all-reduce uses symmetric memory, which needs CUDA GPUs "
                             f"(this rank runs on {device.type})")
    name = group.group_name
    buffer, _ = symmetric_buffer(group, max_numel, dtype, device)  # [max_numel], peer-readable
    ops = torch.ops.symm_mem
    copy_in = hasattr(ops, "one_shot_all_reduce_copy_out")  # the copy in the same kernel

    def reduce(t: torch.Tensor) -> torch.Tensor:
        n = t.numel()
        if n > max_numel:
            raise WorkbenchError(f"all-reduce of {n} values; the symmetric buffer holds {max_numel}")
        mine, flat = buffer[:n], t.view(-1)
        if copy_in:  # one kernel: copy t into the buffer, barrier, sum every rank's, barrier
            out = torch.empty_like(flat)  # not t: a block of this rank may still be reading it
            ops.one_shot_all_reduce_copy_out(mine, flat, "sum", name, out)
            return out.view_as(t)
        mine.copy_(flat)
        ops.one_shot_all_reduce_out(mine, "sum", name, flat)
        return t

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    probe = reduce(torch.full((min(max_numel, 4096),), float(rank + 1), dtype=dtype, device=device))
    check_rank_sum(probe, world, rank, "the one-shot all-reduce")
    return reduce


def reduce_latency_s(reduce: Callable[[torch.Tensor], None], x: torch.Tensor, cpu_group,
                     iters: int = 30, graph: bool = False, rounds: int = 5) -> float:
    """Seconds per ``reduce(x)``: the best of ``rounds`` rounds of ``iters`` calls, every rank
    starting each round together after a warm-up; with ``graph`` (CUDA) ``iters`` calls captured in
    one CUDA graph and replayed, as in a replayed decode step.

    The best round, not the mean: this latency goes into a *floor*, a lower bound, and a round that
    a rank spent descheduled (two CPU ranks on two cores, say) only adds to it: the mean of one run
    of 30 gloo calls once made notebook 04's floor longer than the step it bounded."""
    cuda = x.device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(x.device)) if cuda else (lambda: None)  # noqa: E731
    for _ in range(5):
        reduce(x)
    run = lambda: [reduce(x) for _ in range(iters)]  # noqa: E731
    captured = None
    if graph and cuda:
        from workbench.engine.cudagraph import capture_graph

        captured, _ = capture_graph(run, warmup=1)
        run = captured.replay
    try:
        run()  # one untimed pass (the graph's first replay)
        best = float("inf")
        for _ in range(max(1, rounds)):
            sync()
            dist.barrier(group=cpu_group)
            t0 = time.perf_counter()
            run()
            sync()
            best = min(best, time.perf_counter() - t0)
        return best / iters
    finally:
        if captured is not None:
            captured.reset()  # release the captured collectives before any teardown
            sync()
