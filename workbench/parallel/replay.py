"""Decode steps of a TP x PP grid replayed from CUDA graphs, for ``bench tp`` / ``bench pp``.

:mod:`workbench.parallel.measure` times the eager step of each grid; these capture the same step
(or the engine's fast path) in CUDA graphs on every rank and replay it at a fixed position (each
replay rewrites the same KV slot: the same work as a real step), check its logits against the
eager step and time the replays. Every graph is released before returning, so that no captured
collective outlives it into teardown (a live graph hung ``destroy_process_group`` on 2 H200s,
2026-11-27).

* :func:`graph_step`: one whole step (PP 1), by default the model's plain forward;
* :func:`fused_step`: the engine's fast decode step (:class:`~workbench.engine.fastpath.FusedDecoder`)
  over a paged copy of the cache, with the TP group's all-reduces (NCCL or the one-shot);
* :func:`pipeline_graph_step`: a pipeline stage, one graph per micro-batch, eager hand-overs between;
* :func:`optional`: runs one of these so that its failure is a line in the results, not the job's end;
* :func:`profile_table`: where one step's device time goes, kernel by kernel (``bench tp --profile``).

``dec`` is :class:`workbench.parallel.measure._Decoder` (one rank's decode loop and its cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from workbench.parallel.allreduce import make_reduce
from workbench.parallel.pipeline import StageEvent, run_stage, stage_programs

__all__ = ["fused_step", "graph_step", "optional", "pipeline_graph_step", "profile_table", "sync",
           "timed_steps"]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed_steps(step, warmup: int, steps: int, dev: torch.device, cpu_group, first: int = 0,
                events: list | None = None) -> float:
    """Seconds per ``step(i, events)`` over ``steps`` calls after ``warmup`` untimed ones (without
    events), every rank starting together; ``i`` counts from ``first``. Shared by the eager loop
    (:meth:`workbench.parallel.measure._Decoder.timed`) and the pipeline's graph replays."""
    for i in range(warmup):
        step(first + i, None)
    sync(dev)
    dist.barrier(group=cpu_group)
    t0 = time.perf_counter()
    for i in range(steps):
        step(first + warmup + i, events)
    sync(dev)
    return (time.perf_counter() - t0) / steps


def optional(key: str, run: Callable[[], dict], cpu_group) -> dict:
    """``run()``'s results, or ``{key + "_error": why}`` when it raised on any rank.

    The replayed variants are the code most likely to fail on a GPU where they never ran before (a
    kernel that does not compile, an API that moved between PyTorch releases); one that fails must
    not take the eager results and the other variants of the same job down with it. Every rank says
    whether its run raised (a gloo all-gather), so that all of them drop a half-failed variant together
    and their collectives stay in step. A rank left waiting inside a variant's collective because a
    peer failed is not rescued: the launcher's timeout ends that job, as without this.
    """
    try:
        out, why = run(), ""
    except Exception as e:  # noqa: BLE001 - reported in the row, and the job goes on
        out, why = {}, f"{type(e).__name__}: {e}".strip()
    failed = _first_failure(why, cpu_group)
    return {f"{key}_error": failed[:500]} if failed else out


def _first_failure(why: str, cpu_group) -> str:
    """Every rank's ``why`` ("" if it did not fail) gathered on every rank: "rank r: why" of the
    first that failed, or "" - the same answer everywhere, so all ranks take the same branch."""
    whys = [""] * dist.get_world_size(cpu_group)
    dist.all_gather_object(whys, why, group=cpu_group)
    return next((f"rank {rank}: {w}" for rank, w in enumerate(whys) if w), "")


def profile_table(step: Callable[[], object], dev: torch.device, steps: int = 5,
                  rows: int = 25) -> dict:
    """torch.profiler over ``steps`` eager calls of ``step`` after 3 untimed ones:
    ``profile_table``, its table (on a GPU the kernels by device time - GEMMs, the compiled glue,
    attention, the all-reduces; on a CPU the operators by CPU time), and
    ``allreduce_calls_per_step``, the all-reduces the step really called (``torch.distributed``'s
    or the one-shot's). Eager calls launch the same kernels as the step's graph; a rank's
    all-reduce kernels include its wait for the others."""
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    for _ in range(3):
        step()
    sync(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(dev)
    ops = prof.key_averages()
    calls = sum(op.count for op in ops if op.key in (
        "c10d::allreduce_", "symm_mem::one_shot_all_reduce_out", "symm_mem::one_shot_all_reduce_copy_out"))
    key = "cuda_time_total" if cuda else "cpu_time_total"
    return {"profile_table": ops.table(sort_by=key, row_limit=rows),
            "allreduce_calls_per_step": calls / steps}


def graph_step(dec, step=None, key: str = "graph") -> dict:
    """Capture one decode step (``step()``, by default the plain forward) in a CUDA graph, check
    its logits against the eager step, time its replays."""
    from workbench.engine.cudagraph import capture_graph

    fixed = dec.batch(dec.pos)
    step = step or (lambda: dec.forward(fixed))
    eager = dec.forward(fixed).float()
    graph, out = capture_graph(step, warmup=3)
    try:
        graph.replay()
        sync(dec.dev)
        diff = float((out.float() - eager).abs().max())
        agree = float((out.argmax(-1) == eager.argmax(-1)).float().mean())  # greedy tokens
        dist.barrier(group=dec.w.mesh.cpu_group)
        t0 = time.perf_counter()
        for _ in range(dec.bench.steps):
            graph.replay()
        sync(dec.dev)
        seconds = (time.perf_counter() - t0) / dec.bench.steps
    finally:
        graph.reset()  # release the captured collectives before any teardown
        sync(dec.dev)
    return {f"{key}_step_ms": seconds * 1e3, f"{key}_max_abs_logit_diff": diff,
            f"{key}_token_agreement": agree}


def pipeline_graph_step(dec, capture: bool = True) -> dict:
    """PP: every stage's micro-batches of one decode step captured in CUDA graphs, one per
    micro-batch (embedding, layers, and on the last stage the norm and LM head), the hand-overs
    eager between replays: ``recv`` into the graph's input buffer, replay, ``isend`` its output.

    An eager micro-batch of a stage launches ~15 kernels per layer from Python; a replay launches
    one graph, so what is left of the bubble's excess over (p-1)/(m+p-1) is unequal stages and
    the hand-overs themselves. Checked, timed and its bubble measured like the eager step
    (``_Decoder.timed``): every step ends with the last stage's greedy tokens broadcast to
    the others, which the first stage's graphs embed next (each replay rewrites the same KV
    position). The graphs are released before returning. ``capture=False`` runs the same
    programs eagerly (the CPU tests' path through everything but the capture)."""
    from workbench.engine.cudagraph import capture_graph

    w, mesh, bench = dec.w, dec.w.mesh, dec.bench
    fixed = dec.batch(dec.pos)  # reads dec.tokens, which the steps below update in place
    eager = dec.forward(fixed)  # [B, vocab] on the last stage, else None
    programs = stage_programs(w.model, mesh, fixed, dec.kv, w.par.micro_batches,
                              w.config.hidden_size, dec.dev, w.dtype, last_only=True)
    graphs, why = [], ""
    try:
        try:
            for prog in programs if capture else ():
                if prog.inbox is not None:
                    prog.inbox.zero_()  # the warm-up runs read it before any hand-over
                graph, out = capture_graph(prog.run, warmup=3)
                graphs.append(graph)
                prog.run = lambda graph=graph, out=out: (graph.replay(), out)[1]
        except Exception as e:  # noqa: BLE001 - every rank hears of it below
            why = f"{type(e).__name__}: {e}"
        # The captures are local to each stage: vote before the first hand-over, so that a stage
        # whose capture failed does not leave the others waiting for its data.
        failed = _first_failure(why, mesh.cpu_group)
        if failed:
            raise RuntimeError(f"capture failed on {failed}")

        def step(i: int, events: list | None = None) -> torch.Tensor | None:
            logits = run_stage(mesh, programs, dec.dev, i, "decode", events)
            if mesh.last:
                dec.tokens.copy_(logits.argmax(-1))  # [B]
            dist.broadcast(dec.tokens, src=mesh.rank_of(mesh.pp - 1, 0), group=mesh.group)
            return logits

        first = step(0)
        out: dict = {}
        if mesh.last:
            out["graph_max_abs_logit_diff"] = float((first.float() - eager.float()).abs().max())
            out["graph_token_agreement"] = float((first.argmax(-1) == eager.argmax(-1)).float().mean())
        out["graph_step_ms"] = timed_steps(step, bench.warmup, bench.steps, dec.dev,
                                           mesh.cpu_group, first=1) * 1e3
        events: list[StageEvent] = []
        if bench.timeline:
            for i in range(bench.steps):
                step(i, events)
        out["graph_events"] = events if mesh.tp_rank == 0 else []
        return out
    finally:
        for graph in graphs:
            graph.reset()  # release the graphs before any teardown
        sync(dec.dev)


def fused_step(dec, compile: bool = True, attention: str = "auto",
               allreduce: str = "dist", linear: str = "auto", group=None):
    """The engine's fast decode step (:class:`~workbench.engine.fastpath.FusedDecoder`) for
    ``dec``'s next position, over a paged copy of its KV cache (one run of blocks per row), with
    the TP group's all-reduces (``allreduce``: :func:`workbench.parallel.allreduce.make_reduce`'s
    kinds, or "fused": :class:`~workbench.parallel.allreduce_norm.AllReduceAddNorm`):
    a function of no arguments returning the logits ``[B, vocab]``. ``attention``, ``linear``:
    :class:`~workbench.engine.fastpath.FusedDecoder`'s; ``group``: the all-reduces' group if not
    the TP group (``bench tp --alone --symm-mem``: the one-shot over a rank alone)."""
    from workbench.engine.fastpath import FusedDecoder
    from workbench.kv.paged import PagedKVCache

    w, B, pos, bs = dec.w, dec.B, dec.pos, 16
    per_row = -(-(pos + 1) // bs)  # blocks a row needs for its context and this step's token
    kv = PagedKVCache(w.local, B * per_row, bs, dec.dev, w.dtype)
    for i in w.mesh.layers:  # [B, Hkv, pos, d] -> row b's blocks b * per_row ...
        for pool, dense in ((kv.k[i], dec.kv.k[i]), (kv.v[i], dec.kv.v[i])):
            pool.view(B, per_row * bs, *pool.shape[2:])[:, :pos] = dense[:, :, :pos].transpose(1, 2)
    tables = torch.arange(B * per_row, device=dec.dev).view(B, per_row)  # [B, per_row]
    slots = tables[:, pos // bs] * bs + pos % bs  # [B]
    positions = torch.full((B,), pos, device=dec.dev)
    lens = torch.full((B,), pos + 1, device=dec.dev)
    group = w.mesh.tp_group if group is None else group
    reduce = reduce_norm = None
    if group is not None and allreduce == "fused":  # the all-reduce inside the next norm's kernel
        from workbench.parallel.allreduce_norm import AllReduceAddNorm

        reduce_norm = AllReduceAddNorm(group, B, w.config.hidden_size, w.dtype, dec.dev)
    elif group is not None:
        reduce = make_reduce(allreduce, group, B * w.config.hidden_size, w.dtype, dec.dev)
    fused = FusedDecoder(w.model, kv, compile, attention, reduce=reduce, linear=linear,
                         reduce_norm=reduce_norm)
    return lambda: fused(dec.tokens, positions, slots, tables, lens)
