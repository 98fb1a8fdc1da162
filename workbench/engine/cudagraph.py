"""Decode steps replayed from CUDA graphs (GPU fast path of the paged engine, notebook 03).

An eager decode step of a 1B model launches about 15 kernels per layer from Python, and at small
batches the GPU finishes each one before the host has launched the next: the step is bound by the
launch rate, not by memory bandwidth. A CUDA graph records the launches of one step once and
replays them with a single call, so the GPU runs back to back.

A graph fixes every shape and address, so (as vLLM does) we capture one graph per bucket of
(batch size, block-table columns) up front, run them all from the same static input buffers, and at
run time pick the smallest bucket that holds the step: padding rows write into a spare block that
no sequence owns and attend to it alone. Per step the host fills one pinned buffer (token ids,
positions, slots, context lengths, block tables), copies it to the device without waiting, and
replays; the only wait is for the sampled tokens at the end of the step.
"""

from __future__ import annotations

import statistics
import time

import torch

from workbench.engine.scheduler import Sequence
from workbench.kv.paged import PagedKVCache
from workbench.model.batch import ForwardBatch, PackedLayout
from workbench.model.llama import LlamaModel


def buckets(largest: int) -> list[int]:
    """1, 2, 4, ... up to ``largest`` (included): the shapes graphs are captured for."""
    sizes, n = [], 1
    while n < largest:
        sizes.append(n)
        n *= 2
    return sizes + [largest]


def capture_graph(fn, warmup: int = 1) -> tuple["torch.cuda.CUDAGraph", object]:
    """Run ``fn`` ``warmup`` times on a side stream (cuBLAS handles, compiled kernels, allocator:
    nothing of that may happen during capture), then capture one call in a CUDA graph. Returns the
    graph and what the captured call returned (tensors that every replay rewrites)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def replay_ms(graph: "torch.cuda.CUDAGraph", replays: int = 50) -> float:
    """Median GPU time of one replay of ``graph`` (CUDA events around each replay)."""
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_call_us(fn, calls: int, replays: int = 50) -> tuple[float, list]:
    """Microseconds per call of ``fn(j)`` over j = 0 .. calls - 1 (one call per weight copy, per
    layer...): all the calls captured in one CUDA graph after a warm-up run (compilation, autotuning,
    cuBLAS's workspace), replayed once more, then ``replays`` times (median); the graph is released
    before returning. Also returns the calls' results (still valid after the release)."""
    with torch.inference_mode():
        graph, outs = capture_graph(lambda: [fn(j) for j in range(calls)])
        graph.replay()
        us = replay_ms(graph, replays) * 1e3 / calls
    graph.reset()
    return us, outs


class DecodeGraphs:
    """CUDA graphs of the decode-only step for every (batch, blocks) bucket; ``run`` replays one."""

    def __init__(self, model: LlamaModel, kv: PagedKVCache, max_batch: int, max_blocks: int,
                 null_block: int, compile: bool = False) -> None:
        self.model, self.kv = model, kv
        self.max_batch, self.max_blocks, self.null_block = max_batch, max_blocks, null_block
        self.batch_buckets, self.block_buckets = buckets(max_batch), buckets(max_blocks)
        self.fused = None
        if compile:  # fused weights and compiled glue (workbench.engine.fastpath)
            from workbench.engine.fastpath import FusedDecoder

            self.fused = FusedDecoder(model, kv)
        B, MB = max_batch, max_blocks
        # [ids | positions | slots | context lens | block tables]: one pinned host buffer and its
        # device twin, so that a step costs one host-to-device copy
        self.host = torch.zeros(4 * B + B * MB, dtype=torch.long, pin_memory=True)
        self.host_np = self.host.numpy()
        self.device = torch.zeros_like(self.host, device=model.device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_s = 0.0

    def fits(self, batch: int) -> bool:
        return batch <= self.max_batch

    def _views(self, b: int, nb: int) -> ForwardBatch:
        """A decode batch of ``b`` rows over ``nb`` table columns, on the static device buffer."""
        B, d = self.max_batch, self.device
        ids, pos, slots, ctx = d[:B], d[B:2 * B], d[2 * B:3 * B], d[3 * B:4 * B]
        tables = d[4 * B:].view(B, self.max_blocks)  # [B, max_blocks]
        layout = PackedLayout(slots=list(range(b)), query_lens=[1] * b, context_lens=[1] * b,
                              num_decodes=b, slot_mapping=slots[:b], slots_t=slots[:b],
                              context_lens_t=ctx[:b], block_tables=tables[:b], decode_blocks=nb)
        return ForwardBatch(input_ids=ids[:b][None], positions=pos[:b][None], layout=layout)

    def _forward(self, b: int, nb: int) -> torch.Tensor:
        """Logits [b, vocab] of the decode step on the static buffers (what a graph records)."""
        if self.fused is None:
            return self.model(self._views(b, nb), self.kv)[0]
        B, d = self.max_batch, self.device
        tables = d[4 * B:].view(B, self.max_blocks)[:b, :nb]  # [b, nb]
        return self.fused(d[:b], d[B:B + b], d[2 * B:2 * B + b], tables, d[3 * B:3 * B + b])

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so that smaller graphs reuse its memory pool."""
        start = time.perf_counter()
        self._fill([], 0)  # every row a padding row: safe inputs for warm-up and capture
        self.device.copy_(self.host)
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside capture: cuBLAS, compilation of
            for b in reversed(self.batch_buckets):  # every shape (Triton specialises on some)
                for nb in reversed(self.block_buckets):
                    self._forward(b, nb)
        torch.cuda.current_stream().wait_stream(stream)
        for b in reversed(self.batch_buckets):
            for nb in reversed(self.block_buckets):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    logits = self._forward(b, nb)  # [b, vocab]
                pool = graph.pool()
                self.graphs[b, nb] = (graph, logits)
        torch.cuda.synchronize()
        self.capture_s = time.perf_counter() - start

    def _fill(self, seqs: list[Sequence], b: int) -> None:
        """Write the step's inputs into the pinned buffer; rows past ``len(seqs)`` are padding."""
        B, MB, bs, null = self.max_batch, self.max_blocks, self.kv.block_size, self.null_block
        h = self.host_np
        n = len(seqs)
        last = [len(s.tokens) - 1 for s in seqs]  # position of each sequence's newest token
        h[:n] = [s.tokens[-1] for s in seqs]
        h[n:B] = 0
        h[B:B + n] = last
        h[B + n:2 * B] = 0
        h[2 * B:2 * B + n] = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, last)]
        h[2 * B + n:3 * B] = null * bs
        h[3 * B:3 * B + n] = [p + 1 for p in last]
        h[3 * B + n:4 * B] = 1
        tables = h[4 * B:].reshape(B, MB)
        tables[:] = null
        for i, s in enumerate(seqs):
            tables[i, :len(s.block_table)] = s.block_table

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits [len(seqs), vocab] of one decode step of ``seqs`` (capturing on first use)."""
        if not self.graphs:
            self.capture()
        n = len(seqs)
        b = next(x for x in self.batch_buckets if x >= n)
        need = max(-(-len(s.tokens) // self.kv.block_size) for s in seqs)
        nb = next(x for x in self.block_buckets if x >= need)
        self._fill(seqs, b)
        self.device.copy_(self.host, non_blocking=True)
        graph, logits = self.graphs[b, nb]
        graph.replay()
        return logits[:n]

