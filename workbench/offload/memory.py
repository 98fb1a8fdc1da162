"""How many bytes of fast memory a policy needs, item by item, and how to measure what a run used.

:func:`plan_memory` models every buffer an offloaded run keeps in the fast tier (device memory on a
GPU, RAM on a CPU-only machine), for prompts of ``P`` tokens and ``G`` generated tokens, GPU batch
``b``, ``n`` batches, hidden size ``h``, FFN size ``I``, ``H`` query / ``Hkv`` key-value heads of
size ``d``, vocabulary ``V``, ``s`` bytes per value:

    resident weights   tensors of the gpu tier (on a CPU also the cpu tier, as stored)
    staging            the buffer units are loaded into: the largest two consecutive loads when
                       loading overlaps compute (double buffering), else the largest load
    dequantized        the dense weights of the computing unit when its weights are 4-bit
    KV cache           2 b Hkv (P + G) d s per layer and batch on the fast tier
    KV in flight       one offloaded layer's keys/values of one batch, brought in to attend
    activations        b P h s per batch kept between units, + the one being produced
    workspace          temporaries of one decoder layer at prefill (norms in float32, q/k/v,
                       rotations, scores, the FFN's three b P I tensors), the larger of
                       attention and FFN
    logits             b V (s + 4): the head's logits and a float32 copy
    runtime            library workspaces the allocator hands out (cuBLAS: 64 MiB on CUDA)

Every item is an upper bound of what the code allocates (tests/test_offload_memory.py measures
runs against it), so a policy that passes :func:`check_policy` stays within its budget. The
CUDA context and the caching allocator's cached-but-free blocks are outside ``memory_allocated``
and outside this plan. Taught in notebook ``06_offloading``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError
from workbench.model.config import ModelConfig
from workbench.offload.layout import _itemsize, weight_units
from workbench.offload.policy import (Budget, Policy, _compressible, act_tiers, check_disk_dir,
                                      format_bytes, kv_tiers, param_tiers)

RUNTIME_CUDA = 64 << 20  # cuBLAS / cuBLASLt workspaces allocated through the caching allocator
HOST_ALIGN = 4096  # a host-tier KV layer aligns its arrays to pages


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a policy keeps on each tier; ``fast_total`` is what the budget must cover."""

    resident_weights: int
    staging: int
    dequantized: int
    kv: int
    kv_in_flight: int
    activations: int
    workspace: int
    logits: int
    runtime: int
    host_bytes: int  # weights + KV on the cpu tier (as stored)
    pinned_bytes: int  # of which page-locked for copies (GPU machines), plus the disk staging
    disk_bytes: int  # weights + KV on the disk tier
    layer_bytes: int  # one decoder layer's weights (the smallest budget that can work)

    def rows(self) -> dict[str, int]:
        return {"resident weights": self.resident_weights, "staging buffers": self.staging,
                "dequantized weights": self.dequantized, "KV cache": self.kv,
                "KV in flight": self.kv_in_flight, "activations": self.activations,
                "workspace": self.workspace, "logits": self.logits, "runtime": self.runtime}

    @property
    def fast_total(self) -> int:
        return sum(self.rows().values())


def staging_bytes(sizes: list[int], overlap: bool) -> int:
    """Fast memory that loads need: the largest unit, or with overlap (double buffering from both
    ends of one buffer) the largest sum of two units loaded one after the other, cyclically."""
    sizes = [s for s in sizes if s]
    if not sizes:
        return 0
    if not overlap:
        return max(sizes)
    if len(sizes) == 1:
        return 2 * sizes[0]
    return max(a + b for a, b in zip(sizes, sizes[1:] + sizes[:1]))


def layer_workspace(config: ModelConfig, b: int, T: int, S: int, size: int) -> int:
    """Temporaries of one decoder layer on ``b`` rows of ``T`` new tokens attending to ``S``."""
    h, I, d = config.hidden_size, config.intermediate_size, config.head_dim
    H, Hkv, bt = config.num_attention_heads, config.num_key_value_heads, b * T
    norm = bt * h * (2 * 4 + size)  # float32 copy and square inside RMSNorm, + its output
    attention = (bt * (H + 2 * Hkv) * d * size  # q, k, v
                 + 3 * bt * (H + Hkv) * d * size  # rotate-half copy and the two RoPE products
                 + 2 * b * H * S * d * size  # keys/values expanded to every query head (GQA)
                 + 2 * b * H * T * S * 4  # scores and their softmax (math path, float32 at most)
                 + 2 * bt * H * d * size  # attention output and its [B, T, H d] copy
                 + bt * h * size)  # o_proj output
    mlp = 3 * bt * I * size + bt * h * size  # silu(gate), up, their product; down's output
    return norm + 2 * bt * h * size + max(attention, mlp)  # + the residual sum and normed input


def plan_memory(policy: Policy, config: ModelConfig, dtype: torch.dtype, device_type: str,
                prompt_len: int, gen_len: int) -> MemoryPlan:
    """Every fast-tier buffer of ``policy`` for prompts of ``prompt_len`` + ``gen_len`` tokens.

    On a CPU (``device_type == "cpu"``) the cpu tier is the same RAM as the gpu tier, so both count
    against the budget, and only disk-tier weights are staged.
    """
    from workbench.offload.store import unit_layout

    cuda, size = device_type == "cuda", _itemsize(dtype)
    units = weight_units(config)
    tiers = param_tiers(policy, units)
    _, disk_len, slot_len = unit_layout(config, dtype, policy.weights, policy.compress_weights)
    resident = host = disk = dequant = 0
    for u, unit in enumerate(units):
        host_u = slot_len[u] - disk_len[u]  # the unit's cpu-tier image, as stored
        resident += sum(p.numel * size for p in unit.params if tiers[p.name] == "gpu")
        resident += 0 if cuda else host_u
        host, disk = host + host_u, disk + disk_len[u]
        if unit.kind == "embed":
            continue  # embedding rows are gathered where the table lives, never staged
        dense = [p.numel * size for p in unit.params if tiers[p.name] != "gpu"
                 and policy.compress_weights and _compressible(p.shape)]
        if dense:  # all dense weights of the unit + the int8 and dtype copies of the largest
            biggest = max(dense) // size
            dequant = max(dequant, sum(dense) + biggest * (2 + size))
    loads = [(slot_len[u] if cuda else disk_len[u]) for u, unit in enumerate(units)
             if unit.kind != "embed"]
    staging = staging_bytes(loads, policy.overlap)
    pinned = host + (2 if policy.overlap else 1) * max(disk_len) if cuda else 0

    b, n, P, L = policy.gpu_batch_size, policy.num_gpu_batches, prompt_len, config.num_hidden_layers
    max_len = prompt_len + gen_len
    kv_one = 2 * b * config.num_key_value_heads * max_len * config.head_dim * size  # layer, batch
    fast_tiers = ("gpu",) if cuda else ("gpu", "cpu")
    layer_tiers = kv_tiers(policy, L)
    kv = sum(n * (kv_one + (HOST_ALIGN if t != "gpu" else 0))
             for t in layer_tiers if t in fast_tiers)
    kv_host = sum(n * kv_one for t in layer_tiers if t == "cpu")
    kv_disk = sum(n * kv_one for t in layer_tiers if t == "disk")
    offloaded_kv = any(t not in fast_tiers for t in layer_tiers)
    if cuda:
        kv_in_flight = (b * config.num_attention_heads * P * config.head_dim * size
                        if policy.cpu_attention else kv_one) if offloaded_kv else 0
    else:  # dense disk-tier keys/values are attended in place (mmap); 4-bit ones are dequantized
        kv_in_flight = kv_one if policy.compress_kv and any(t != "gpu" for t in layer_tiers) else 0
    pinned += kv_host if cuda else 0

    hidden = b * P * config.hidden_size * size
    stored = (n if policy.schedule == "row"  # the row schedule keeps every batch on the device
              else sum(t in fast_tiers for t in act_tiers(policy)))
    activations = (stored + 1 + (stored < n)) * hidden  # + the output being produced (+ a copy in)
    workspace = max(layer_workspace(config, b, P, P, size),
                    layer_workspace(config, b, 1, max_len, size))
    logits = b * config.vocab_size * (size + 4) + b * config.hidden_size * (2 * 4 + size)
    layer_bytes = units[1].nbytes(dtype) if L else 0
    return MemoryPlan(resident, staging, dequant, kv, kv_in_flight, activations, workspace, logits,
                      RUNTIME_CUDA if cuda else 0, host + kv_host, pinned, disk + kv_disk,
                      layer_bytes)


def check_policy(policy: Policy, config: ModelConfig, dtype: torch.dtype, budget: Budget,
                 device_type: str, prompt_len: int, gen_len: int) -> MemoryPlan:
    """The memory plan of ``policy``, or a WorkbenchError saying why it cannot run in ``budget``."""
    plan = plan_memory(policy, config, dtype, device_type, prompt_len, gen_len)
    if budget.fast_bytes < plan.layer_bytes:
        raise WorkbenchError(
            f"fast-memory budget {format_bytes(budget.fast_bytes)} is below one decoder layer "
            f"({format_bytes(plan.layer_bytes)}): a layer's weights must fit to compute it")
    if plan.fast_total > budget.fast_bytes:
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in plan.rows().items() if v)
        raise WorkbenchError(
            f"policy '{policy.label}' needs {format_bytes(plan.fast_total)} of fast memory ({parts})"
            f" but the budget is {format_bytes(budget.fast_bytes)}: lower the gpu percentages or "
            f"the batch size")
    if policy.uses_disk:
        check_disk_dir(budget.disk_dir)
    return plan


def max_num_batches(policy: Policy, config: ModelConfig, dtype: torch.dtype, device_type: str,
                    budget_bytes: int, prompt_len: int, gen_len: int, limit: int = 256) -> int:
    """The largest ``num_gpu_batches`` (at most ``limit``) whose plan fits ``budget_bytes``;
    0 when not even one batch fits. The plan grows with ``n``, so a bisection finds it."""
    from dataclasses import replace

    def fits(n: int) -> bool:
        return plan_memory(replace(policy, num_gpu_batches=n), config, dtype, device_type,
                           prompt_len, gen_len).fast_total <= budget_bytes

    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def cpu_peak_bytes(fn):
    """``(fn(), peak)``: the most bytes PyTorch's CPU allocator held *beyond what it held before*
    while ``fn`` ran, from the profiler's memory events (allocations and frees in time order).
    Slow (the profiler records every op): for tests and notebook checks, not timed runs."""
    out, peak, _ = cpu_allocation_levels(fn)
    return out, peak


def cpu_allocation_levels(fn):
    """``(fn(), peak, end)``: as :func:`cpu_peak_bytes`, plus the bytes still held at the end
    (what ``fn`` left allocated, its result included)."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    with warnings.catch_warnings(), _quiet_stderr():  # the profiler prints start/stop lines
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    level = peak = 0
    for _, delta in deltas:
        level += delta
        peak = max(peak, level)
    return out, peak, level


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 to /dev/null for a moment (C++ code writes there directly)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
