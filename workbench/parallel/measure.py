"""Decode-step timing on a TP x PP grid, against its floor: ``bench tp``, ``bench pp``, notebooks 04/05.

Every rank runs the same loop (no driver: the inputs are fixed, only the greedy token of each
row feeds the next step): prefill ``batch`` random prompts of ``context_len`` tokens, then
``steps`` timed decode steps. The floor of one step is what the hardware allows::

    TP stage:  (weight bytes + KV bytes read per GPU) / bandwidth + 2 x layers x all-reduce latency
    PP:        (m + p - 1) x the slowest stage's floor for one micro-batch of B/m rows

(a GPipe step runs m + p - 1 slots of time, and every micro-batch re-reads its stage's weights).
Bandwidth is measured on rank 0's device (:func:`workbench.hardware.measure_bandwidth`), the
all-reduce latency on the TP group with the message a decode step sends (``B x hidden``).
With ``cuda_graphs`` (GPU) the decode step is also captured in a CUDA graph and replayed at
a fixed position (each replay rewrites the same KV slot: the same work as a real step), its
logits checked against the eager step; the graph is released before teardown. On a pipeline
(PP > 1) every stage captures one graph per micro-batch and the hand-overs stay eager between
replays (:func:`~workbench.parallel.replay.pipeline_graph_step`), and the bubble is measured again. With ``fast`` (GPU,
PP 1) the engine's GPU fast path is captured too (:class:`~workbench.engine.fastpath.FusedDecoder`:
fused weights, compiled glue, Triton paged attention, the TP all-reduces between), over a paged copy
of the same KV cache; with ``symm_mem`` (GPU, TP > 1) once more with the one-shot all-reduce through
symmetric memory (:mod:`workbench.parallel.allreduce`), and with ``fused_allreduce`` with the
all-reduce fused into the residual add and the next RMSNorm (:mod:`workbench.parallel.allreduce_norm`,
against the one-shot's floor: the same communication). A replayed step is set against the floor
above and against a stricter one, the all-reduces at their latency replayed from a CUDA graph. A
replayed variant that fails leaves ``<variant>_error`` in its row instead of ending the job.

With ``alone`` every TP grid runs as one process holding TP rank 0's shard and no peers
(:func:`~workbench.parallel.plan.alone_mesh`): the all-reduces are left out, so one GPU times
what each rank of TP 2 or 4 computes, against the weight-and-KV floor of its shard alone. That
is not a TP step (the communication is missing), and its rows say so (``alone``). With
``symm_mem`` (``fused_allreduce``) the rank's fast path runs once more with the one-shot (fused)
all-reduce over a group of one: the step with the all-reduce kernels' own cost, no peer to wait
for - a lower bound of the TP step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from workbench.kv.contiguous import ContiguousKVCache
from workbench.model.batch import ForwardBatch
from workbench.parallel.allreduce import make_reduce, reduce_latency_s
from workbench.parallel.engine import RankWorker
from workbench.parallel.floors import decode_row
from workbench.parallel.in_flight import decode_in_flight
from workbench.parallel.launch import DistContext
from workbench.parallel.pipeline import StageEvent, pipeline_forward
from workbench.parallel.plan import ParallelConfig
from workbench.parallel.replay import (fused_step, graph_step, optional, pipeline_graph_step,
                                       profile_table, sync, timed_steps)

__all__ = ["DecodeBench", "decode_worker", "time_grids"]


@dataclass(frozen=True)
class DecodeBench:
    """Which grids, batch sizes and lengths to time (all ranks get the same description)."""

    model: str
    grids: tuple[ParallelConfig, ...]
    batch_sizes: tuple[int, ...] = (1, 32)
    context_len: int = 64
    steps: int = 16
    warmup: int = 3
    dtype: str = "bfloat16"
    timeline: bool = True  # PP: a second run records stage events for the bubble
    cuda_graphs: bool = False
    fast: bool = False  # also the fast path (fused weights + compile + Triton) in a CUDA graph
    symm_mem: bool = False  # also the fast path with the one-shot all-reduce (TP > 1, GPU)
    fused_allreduce: bool = False  # and with it fused into the next norm (allreduce_norm)
    fast_attention: str = "auto"  # the fast path's attention (FusedDecoder's ``attention``)
    fast_linear: str = "auto"  # and its matrix products (FusedDecoder's ``linear``)
    in_flight: bool = False  # PP: also decode with micro-batches in flight across steps
    profile: bool = False  # TP: a profiler table of rank 0's fastest step (GPU kernels)
    alone: bool = False  # TP: each grid's rank 0 alone in one process, its all-reduces left out
    bandwidth: float = 0.0  # bytes/s for the floors; 0: measured on rank 0 (time_grids shares it)


class _Decoder:
    """One rank's decode loop over a fresh KV cache."""

    def __init__(self, worker: RankWorker, batch: int, bench: DecodeBench) -> None:
        self.w, self.B, self.bench = worker, batch, bench
        self.dev, mesh = worker.ctx.device, worker.mesh
        total = bench.context_len + bench.warmup + bench.steps + 2
        self.kv = ContiguousKVCache(worker.local, batch, total, self.dev, worker.dtype,
                                    layers=mesh.layers)
        g = torch.Generator().manual_seed(batch)
        prompt = torch.randint(1, worker.config.vocab_size, (batch, bench.context_len), generator=g)
        self.forward(ForwardBatch.prefill(prompt.to(self.dev)))  # [B, T] prompt
        self.tokens = torch.zeros(batch, dtype=torch.long, device=self.dev)
        self.pos = bench.context_len

    def forward(self, batch: ForwardBatch, step: int = 0, events: list | None = None):
        w = self.w
        return pipeline_forward(w.model, w.mesh, batch, self.kv, w.par.micro_batches,
                                w.config.hidden_size, self.dev, w.dtype, True, step,
                                "decode" if batch.input_ids.shape[1] == 1 else "prefill", events)

    def batch(self, pos: int) -> ForwardBatch:
        return ForwardBatch(input_ids=self.tokens[:, None],  # [B, 1]
                            positions=torch.full((self.B, 1), pos, device=self.dev),
                            kv_start=pos)

    def step(self, i: int, events: list | None = None) -> None:
        mesh = self.w.mesh
        logits = self.forward(self.batch(self.pos), i, events)
        self.pos += 1
        if mesh.last:
            self.tokens = logits.argmax(-1)  # [B]
        if mesh.pp > 1:  # the next step's first stage waits for these tokens
            dist.broadcast(self.tokens, src=mesh.rank_of(mesh.pp - 1, 0), group=mesh.group)

    def timed(self, events: list | None = None) -> float:
        """Seconds per decode step, after warm-up, all ranks starting together."""
        return timed_steps(self.step, self.bench.warmup, self.bench.steps, self.dev,
                           self.w.mesh.cpu_group, events=events)


def _allreduce_s(worker: RankWorker, rows: int, kind: str = "dist", graph: bool = False) -> float:
    """Seconds per all-reduce of [rows, hidden] on the TP group (0 without TP): eager ``dist`` by
    default (the floor's), or ``kind`` / replayed from a CUDA graph
    (:func:`workbench.parallel.allreduce.reduce_latency_s`)."""
    mesh, dev = worker.mesh, worker.ctx.device
    if mesh.tp_group is None:
        return 0.0
    x = torch.zeros(rows, worker.config.hidden_size, device=dev, dtype=worker.dtype)
    reduce = make_reduce(kind, mesh.tp_group, x.numel(), x.dtype, dev)
    return reduce_latency_s(reduce, x, mesh.cpu_group, graph=graph)


def _in_flight(worker: RankWorker, B: int, bench: DecodeBench) -> dict:
    """PP: seconds per token of :func:`~workbench.parallel.pipeline.decode_in_flight` over
    ``bench.steps`` steps after ``bench.warmup``, all ranks starting together; then the same on a
    fresh cache with the stages' events (the bubble of the whole run, one pass)."""
    mesh, par = worker.mesh, worker.par

    def run(events: list | None = None) -> float:
        dec = _Decoder(worker, B, bench)
        args = (worker.model, mesh)
        rest = (par.micro_batches, worker.config.hidden_size, dec.dev, worker.dtype)
        tokens = dec.tokens
        if bench.warmup:
            out = decode_in_flight(*args, tokens, dec.kv, dec.pos, bench.warmup, *rest)
            tokens = out[:, -1] if out is not None else tokens
        sync(dec.dev)
        dist.barrier(group=mesh.cpu_group)
        t0 = time.perf_counter()
        decode_in_flight(*args, tokens, dec.kv, dec.pos + bench.warmup, bench.steps, *rest, events)
        sync(dec.dev)
        return (time.perf_counter() - t0) / bench.steps

    seconds, events = run(), []
    if bench.timeline:
        run(events)
    return {"in_flight_s": seconds, "in_flight_events": events if mesh.tp_rank == 0 else []}


def _bytes_read(worker: RankWorker) -> int:
    """Weight bytes one decode step reads on this rank (the embedding table only as the head)."""
    read = 0
    for name, p in worker.model.named_parameters():
        tied_head = worker.config.tie_word_embeddings and worker.mesh.last
        if not name.startswith("embed_tokens") or tied_head:
            read += p.numel() * p.element_size()
    return read


def decode_worker(ctx: DistContext, bench: DecodeBench) -> list[dict] | None:
    """Every grid x batch size in turn; rank 0 returns one row per pair, the others None."""
    from workbench.hardware import measure_bandwidth

    bandwidth = bench.bandwidth or (measure_bandwidth(ctx.device) if ctx.rank == 0 else 0.0)
    rows = []
    for par in bench.grids:
        worker = RankWorker.load(ctx, bench.model, par, getattr(torch, bench.dtype),
                                 alone=bench.alone)
        if worker is None:
            continue  # this grid leaves the rank idle
        mesh, cfg = worker.mesh, worker.config
        with torch.inference_mode():
            for B in bench.batch_sizes:
                dec = _Decoder(worker, B, bench)
                step_s = dec.timed()
                events: list[StageEvent] = []
                if par.pp > 1 and bench.timeline:
                    _Decoder(worker, B, bench).timed(events)
                mb_rows = -(-B // min(par.micro_batches, B))
                ar_s = _allreduce_s(worker, mb_rows)
                extra = _replayed(dec, mb_rows)  # each variant optional: a failure is a row entry
                if bench.in_flight and par.pp > 1:
                    extra |= optional("in_flight", lambda w=worker: _in_flight(w, B, bench),
                                      mesh.cpu_group)
                kv_read = (mb_rows * (bench.context_len + bench.warmup) * 2 * len(mesh.layers)
                           * worker.local.num_key_value_heads * cfg.head_dim
                           * torch.finfo(worker.dtype).bits // 8)
                mine = {"stage": mesh.stage, "tp_rank": mesh.tp_rank, "layers": len(mesh.layers),
                        "weight_bytes": _bytes_read(worker), "kv_bytes": kv_read, "ar_s": ar_s,
                        "events": events if mesh.tp_rank == 0 else [], **extra}
                ranks = 1 if bench.alone else par.world_size
                gathered = [None] * ranks if ctx.rank == 0 else None
                dist.gather_object(mine, gathered, dst=0, group=mesh.cpu_group)
                if ctx.rank == 0:
                    rows.append(decode_row(par, B, step_s, gathered, bandwidth, bench))
        del worker
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows if ctx.rank == 0 else None


def _replayed(dec: _Decoder, mb_rows: int) -> dict:
    """The variants of one grid and batch (:mod:`workbench.parallel.replay`) that ``dec.bench``
    asks for, each :func:`~workbench.parallel.replay.optional`: one that fails leaves an
    ``*_error`` in the row and the rest stand. The replays need CUDA; with ``profile`` (PP 1, any
    device) a profiler table of the fastest step built here: the fast path (with the one-shot
    all-reduce if asked for), else the plain step."""
    worker, bench, par = dec.w, dec.bench, dec.w.par
    group, out, cuda = worker.mesh.cpu_group, {}, dec.dev.type == "cuda"
    peers = worker.mesh.tp_group is not None  # TP > 1, not alone
    if bench.cuda_graphs and cuda:
        out |= optional("graph", lambda: graph_step(dec) if par.pp == 1
                        else pipeline_graph_step(dec), group)
    if par.pp > 1:
        return out  # the fast path, the all-reduces and the profile below are TP's
    fastest = [lambda: dec.forward(dec.batch(dec.pos))]  # the step to profile

    def fast(key: str, allreduce: str, reduce_group=None) -> dict:
        step = fused_step(dec, attention=bench.fast_attention, allreduce=allreduce,
                          linear=bench.fast_linear, group=reduce_group)
        timed = graph_step(dec, step, key)
        fastest.append(step)
        return timed

    if bench.fast and cuda:
        out |= optional("fast", lambda: fast("fast", "dist"), group)
    if cuda and peers and (bench.cuda_graphs or bench.fast or bench.symm_mem):  # the floor
        out |= optional("ar_graph", lambda: {"ar_graph_s": _allreduce_s(  # of a replayed step
            worker, mb_rows, "dist", graph=True)}, group)
    if cuda and peers and (bench.symm_mem or bench.fused_allreduce):  # the one-shot's floor
        out |= optional("ar_symm", lambda: {"ar_symm_graph_s": _allreduce_s(
            worker, mb_rows, "symm", graph=True)}, group)
    if cuda and peers and bench.symm_mem:
        out |= optional("fast_symm", lambda: fast("fast_symm", "symm"), group)
    if cuda and peers and bench.fused_allreduce:
        out |= optional("fast_fused", lambda: fast("fast_fused", "fused"), group)
    if cuda and bench.alone and par.tp > 1:  # the all-reduces' kernels in the step over this
        # rank alone (a job of one): their fixed cost, no peer to wait for or read
        for key, kind, asked in (("fast_symm", "symm", bench.symm_mem),
                                 ("fast_fused", "fused", bench.fused_allreduce)):
            if asked:
                out |= optional(key, lambda: fast(key, kind, dist.group.WORLD), group)
    if bench.profile:
        out |= optional("profile", lambda: profile_table(fastest[-1], dec.dev), group)
    return out


def time_grids(bench: DecodeBench, device: str, timeout_s: float, threads: int = 1) -> list[dict]:
    """Time every grid of ``bench``, one job per world size, so each grid uses every rank of its
    job; returns the rows in grid order of world size.

    On NCCL, a job whose grids left ranks idle (TP 1 and 2 in a 4-rank job) ran past its timeout on
    4 H200s (2026-11-27), while jobs whose grids all used every rank ran. ``timeout_s`` is shared,
    and so is the bandwidth the first job measured: every row's floor uses the same one (on a
    CPU, separate measurements differed up to 3x).
    """
    import dataclasses

    from workbench.errors import WorkbenchError
    from workbench.parallel.launch import launch

    rows, deadline = [], time.monotonic() + timeout_s
    size_of = (lambda g: 1) if bench.alone else (lambda g: g.world_size)  # noqa: E731
    for size in sorted({size_of(g) for g in bench.grids}):
        part = dataclasses.replace(bench, grids=tuple(g for g in bench.grids if size_of(g) == size))
        left = deadline - time.monotonic()
        if left <= 0:
            raise WorkbenchError(f"timeout of {timeout_s:g} s spent before the {size}-rank grids")
        rows += launch(decode_worker, size, part, device=device, timeout_s=left, threads=threads)[0]
        if rows and not bench.bandwidth:
            bench = dataclasses.replace(bench, bandwidth=rows[0]["bandwidth_GB_s"] * 1e9)
    return rows

