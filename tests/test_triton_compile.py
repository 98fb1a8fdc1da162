"""The skinny product kernel compiles for an H100/H200 (sm_90) here, on a machine without a GPU.

Triton's interpreter (``tests/test_triton_interpreter.py``) checks what the kernel computes, not
how it compiles: a kernel can pass there and fail to build, or build without the software
pipelining it relies on. Triton ships ptxas, so the compiler runs to the GPU binary on any Linux
x86-64 machine; here with the arguments' 16-byte divisibility that Triton's JIT finds for the 8B
shape's tensors (without it no load is pipelined). Skipped where Triton is not installed."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

SIGNATURE = {"X": "*bf16", "A": "*bf16", "R": "*bf16", "G": "*bf16", "W": "*bf16", "B": "*bf16",
             "Y": "*bf16", "Part": "*fp32", "Count": "*i32", "M": "i32", "N": "i32", "K": "i32",
             "HALF": "i32", "s_xm": "i32", "s_am": "i32", "s_rm": "i32", "s_wn": "i32",
             "s_ym": "i32", "eps": "fp32"}
ALIGNED = [name for name in SIGNATURE if name not in ("M", "eps")]


def compile_sm90(kernel, signature, constants, aligned, num_warps, num_stages):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    src = ASTSource(kernel, signature | {k: "constexpr" for k in constants},
                    constexprs={(names.index(k),): v for k, v in constants.items()},
                    attrs={(names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("variant", ["plain", "norm", "swiglu"])
@pytest.mark.parametrize("split", [1, 4])
def test_skinny_kernel_compiles_for_sm90_with_its_loads_pipelined(variant, split):
    """Every fused part (residual add, RMSNorm, SwiGLU), K whole or split: the kernel builds, its
    weight loads go through shared memory asynchronously (cp.async, several stages in flight: a
    skinny product's speed is the number of bytes in flight), and the stages fit an SM's 227 KB."""
    from workbench.engine.skinny import CONFIGS, _skinny_kernel

    config = next(c for c in CONFIGS if c.kwargs["SPLIT"] == split)
    flags = dict(ADD=variant != "plain", NORM=variant != "plain", SWIGLU=variant == "swiglu",
                 BIAS=True, IEEE=False, BM=32)
    compiled = compile_sm90(_skinny_kernel, SIGNATURE, config.kwargs | flags, ALIGNED,
                            config.num_warps, config.num_stages)
    ttgir = compiled.asm["ttgir"]
    copies = ttgir.count("async_copy_global_to_local")
    assert copies >= 2 * config.num_stages - 2, ttgir[:2000]  # x and W, per stage in flight
    assert compiled.metadata.shared <= 227 * 1024
    assert "mma" in ttgir  # tensor cores


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_without_aligned_arguments_nothing_is_pipelined():
    """Why the test above states the alignment: the same kernel, its arguments of unknown
    alignment, issues plain loads only (what a caller passing odd strides or offsets gets)."""
    from workbench.engine.skinny import CONFIGS, _skinny_kernel

    config = CONFIGS[0]
    flags = dict(ADD=False, NORM=False, SWIGLU=False, BIAS=False, IEEE=False, BM=32)
    compiled = compile_sm90(_skinny_kernel, SIGNATURE, config.kwargs | flags, [],
                            config.num_warps, config.num_stages)
    assert compiled.asm["ttgir"].count("async_copy_global_to_local") == 0


def _flags(variant: str, dtype: str, bm: int) -> dict:
    return dict(ADD=variant != "plain", NORM=variant != "plain", SWIGLU=variant == "swiglu",
                BIAS=True, IEEE=dtype == "fp32", BM=bm)


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("index,dtype,variant,bm", [
    (0, "bf16", "plain", 16), (1, "bf16", "swiglu", 32), (6, "bf16", "norm", 32),
    (2, "fp32", "norm", 16), (7, "bf16", "plain", 64), (-1, "fp32", "swiglu", 64)])
def test_shared_memory_bound_against_the_compiler(index, dtype, variant, bm):
    """smem_lower_bound, by which the autotuner's list is pruned, never exceeds what the compiler
    lays out; the fallback config fits an SM in the largest case (float32, 64 rows, SwiGLU with
    the residual add and norm), so that every call has a config that runs."""
    from workbench.engine.skinny import (CONFIGS, FALLBACK, SMEM_LIMIT, _skinny_kernel,
                                         smem_lower_bound)

    config = CONFIGS[index]
    flags = _flags(variant, dtype, bm)
    signature = {k: v.replace("bf16", dtype) for k, v in SIGNATURE.items()}
    compiled = compile_sm90(_skinny_kernel, signature, config.kwargs | flags, ALIGNED,
                            config.num_warps, config.num_stages)
    bound = smem_lower_bound(bm, config.kwargs["BN"], config.kwargs["BK"], config.num_stages,
                             2 if dtype == "bf16" else 4, flags["ADD"], flags["SWIGLU"])
    assert bound <= compiled.metadata.shared
    if config is FALLBACK:
        assert compiled.metadata.shared <= SMEM_LIMIT


def test_the_prune_keeps_a_config_for_every_call():
    """For every dtype, row count and variant the autotuner has the fallback and, in bfloat16,
    larger tiles too; splits only where a workspace exists (N <= SPLIT_N)."""
    import torch

    from workbench.engine.skinny import CONFIGS, FALLBACK, SPLIT_N, _prune

    for dtype in (torch.bfloat16, torch.float32):
        for bm in (16, 32, 64):
            for variant in ("plain", "norm", "swiglu"):
                flags = _flags(variant, "", bm)
                for n in (4096, SPLIT_N + 1):
                    kept = _prune(CONFIGS, {"X": torch.empty(0, dtype=dtype), "N": n}, **flags)
                    assert FALLBACK in kept
                    assert n <= SPLIT_N or all(c.kwargs["SPLIT"] == 1 for c in kept)
                    if dtype == torch.bfloat16 and bm <= 32:
                        assert len(kept) >= 5, (bm, variant, n)


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("world", [2, 4])
def test_fused_allreduce_kernel_compiles_for_sm90_with_its_barrier(world):
    """The fused all-reduce + residual add + RMSNorm (:mod:`workbench.parallel.allreduce_norm`)
    for the 8B shape's hidden size: it arrives at every rank with one exchange, release order at
    system scope (peers on other GPUs see what was written before the flag), each lane's by one
    thread and none waiting for another's round trip; it waits on its own pad with volatile loads
    and then an acquire fence; every wait reads the GPU's clock and can trap (a peer that never
    arrives must not hang a CUDA graph); the peers' rows skip L1 (``.cg``)."""
    from workbench.parallel.allreduce_norm import _allreduce_add_rms_kernel

    signature = {"Bufs": "*i64", "Pads": "*i64", "Res": "*bf16", "W": "*bf16", "Bias": "*bf16",
                 "H": "*bf16", "offset": "i32", "N": "i32", "eps": "fp32", "rank": "i32",
                 "timeout_ns": "i64"}
    compiled = compile_sm90(_allreduce_add_rms_kernel, signature,
                            dict(WORLD=world, LANES=world, BLOCK=4096, HAS_BIAS=False, ON_GPU=True),
                            ["Res", "W", "H", "Bias", "N"], 8, 1)
    ptx = compiled.asm["ptx"]
    atoms = [line.strip() for line in ptx.splitlines() if "atom." in line]
    assert len(atoms) == 1 and atoms[0].startswith("@"), atoms  # one exchange, per owning thread
    assert all(k in atoms[0] for k in (".sys", ".release", ".exch")), atoms
    assert "ld.volatile.global" in ptx and "fence.acq_rel.sys" in ptx
    assert "%globaltimer" in ptx and "trap;" in ptx
    assert ptx.count("ld.global.cg") >= world  # the rows of every rank's buffer
