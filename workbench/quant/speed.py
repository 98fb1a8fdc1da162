"""Decode speed of a (quantized) model: greedy decoding over a fixed-shape KV cache.

Decoding one token reads every weight once, so at small batches its time floor is
``weight bytes / memory bandwidth``: 4-bit weights lower that floor about 3.8x against bf16. An
eager step of a 1B model is bound by kernel launches instead (notebook 02), which would hide the
difference, so on CUDA the step is captured once in a CUDA graph and replayed. Everything a graph
needs is fixed up front: the cache holds ``max_len`` positions, new keys go in by an index tensor
and a boolean mask hides the positions not yet written.

Two measurements: :func:`decode_tok_s` (whole model: attention, norms, head included) and
:func:`linear_sweep_seconds` (only the linear layers of one step, the part quantization changes).
Taught in notebook ``07_quantization``.
"""

from __future__ import annotations

import time

import torch

from workbench.errors import WorkbenchError
from workbench.hardware import _median_seconds
from workbench.kv.base import KVCache
from workbench.model.batch import ForwardBatch
from workbench.model.llama import LlamaModel
from workbench.quant.linear import QuantLinear


class StaticKVCache(KVCache):
    """[B, Hkv, max_len, d] keys/values; every step writes at ``batch.positions[0]`` (rows in
    lockstep) and attends over all ``max_len`` columns under ``batch.mask`` (CUDA-graph safe)."""

    def __init__(self, model: LlamaModel, batch_size: int, max_len: int) -> None:
        c = model.config
        shape = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
        self.k = [torch.zeros(shape, device=model.device, dtype=model.dtype)
                  for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros_like(k) for k in self.k]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor,
               batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        index = batch.positions[0]  # [T]: the same columns for every row
        self.k[layer].index_copy_(2, index, k)  # k: [B, Hkv, T, d]
        self.v[layer].index_copy_(2, index, v)
        return self.k[layer], self.v[layer]

    def advance(self, batch: ForwardBatch) -> None:
        pass  # positions and mask live in the batch

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


@torch.inference_mode()
def greedy_decode(model: LlamaModel, prompt: torch.Tensor, steps: int,
                  graph: bool | None = None) -> tuple[torch.Tensor, float]:
    """Greedy-decode ``steps`` tokens after ``prompt`` [B, P] (no EOS stop); returns the new
    tokens [B, steps] and the decode seconds (prefill excluded). ``graph``: replay a CUDA graph
    (default: on CUDA)."""
    B, P = prompt.shape
    S, dev = P + steps, model.device
    if steps < 1:
        raise WorkbenchError(f"steps must be >= 1, got {steps}")
    if S > model.config.max_position_embeddings:
        raise WorkbenchError(f"{P} + {steps} tokens exceed the context of "
                             f"{model.config.max_position_embeddings}")
    graph = dev.type == "cuda" if graph is None else graph
    kv = StaticKVCache(model, B, S)
    causal = torch.ones(P, S, dtype=torch.bool, device=dev).tril()  # [P, S]: prompt sees its past
    prefill = ForwardBatch(prompt.to(dev), torch.arange(P, device=dev).expand(B, P),
                           causal.expand(B, 1, P, S))
    ids = model(prefill, kv, last_only=True).argmax(-1, keepdim=True)  # [B, 1]
    pos = torch.full((B, 1), P, device=dev)  # [B, 1]
    mask = torch.zeros(B, 1, 1, S, dtype=torch.bool, device=dev)  # [B, 1, 1, S]
    mask[..., :P] = True
    step = ForwardBatch(ids, pos, mask)
    out = torch.empty(B, steps, dtype=torch.long, device=dev)

    def one_step() -> None:  # token ids[t] in -> its keys cached, token t+1 written into ids
        mask.index_fill_(3, pos[0], True)
        ids.copy_(model(step, kv, last_only=True).argmax(-1, keepdim=True))
        pos.add_(1)

    run = one_step
    if graph:
        from workbench.engine.cudagraph import capture_graph

        saved = ids.clone(), pos.clone(), mask.clone()  # the state before the warm-up step
        cuda_graph, _ = capture_graph(one_step)  # then undo the warm-up step's effects
        for t, s in zip((ids, pos, mask), saved):
            t.copy_(s)
        run = cuda_graph.replay
    _sync(dev)
    start = time.perf_counter()
    for t in range(steps):
        out[:, t] = ids[:, 0]
        run()
    _sync(dev)
    return out, time.perf_counter() - start


def decode_tok_s(model: LlamaModel, batch_size: int = 1, prompt_len: int = 128, steps: int = 64,
                 graph: bool | None = None, seed: int = 0) -> float:
    """Tokens per second of greedy decoding (``batch_size`` rows in lockstep, after a warm-up)."""
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, model.config.vocab_size, (batch_size, prompt_len), generator=gen)
    greedy_decode(model, prompt, min(steps, 4), graph)  # warm-up: allocator, cuBLAS, kernels
    _, seconds = greedy_decode(model, prompt, steps, graph)
    return batch_size * steps / seconds


@torch.inference_mode()
def linear_sweep_seconds(model: LlamaModel, batch_size: int = 1, repeats: int = 20,
                         graph: bool | None = None) -> float:
    """Seconds to apply every decoder-layer linear layer once to ``batch_size`` token rows: the
    weight-reading part of one decode step (a CUDA graph on CUDA, so launches do not count)."""
    dev = model.device
    graph = dev.type == "cuda" if graph is None else graph
    layers = [m for layer in model.layers for m in layer.modules()
              if isinstance(m, (torch.nn.Linear, QuantLinear))]
    inputs = {}
    for m in layers:
        k = m.in_features
        inputs.setdefault(k, torch.randn(batch_size, k, device=dev, dtype=model.dtype))

    def sweep() -> None:
        for m in layers:
            m(inputs[m.in_features])

    fn = sweep
    if graph:
        from workbench.engine.cudagraph import capture_graph

        with torch.inference_mode():
            cuda_graph, _ = capture_graph(sweep)
        fn = cuda_graph.replay
    with torch.inference_mode():
        return _median_seconds(fn, dev, repeats, warmup=2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
