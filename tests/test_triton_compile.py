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
