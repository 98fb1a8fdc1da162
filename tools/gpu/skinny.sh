#!/usr/bin/env bash
# The skinny Triton products (workbench.engine.skinny: one kernel per matrix product of a decode step, with the
# residual add, RMSNorm and SwiGLU inside) on one GPU. Stages (STAGES, in this order), three calls of under 10 minutes
# each, one right after the other (a warm machine keeps Triton's compiled kernels): STAGES=tests (limit 540 s: about
# 200 compilations), STAGES=micro (420 s), STAGES="profile bench" (240 + 2 x 150 s):
#   tests     tests/test_paged_gpu.py -k "skinny or (graphs and triton)": the compiled kernel against PyTorch (fp32, bf16),
#             the engine's CUDA graphs with FusedDecoder(linear="triton") against eager and each request alone
#   micro     tools/skinny_gemm.py: each product of the 8B shape alone at batch 1 and 32 (cuBLAS, cuBLAS + compiled
#             glue, skinny) against its weight's read time
#   profile   tools/profile_decode.py: the 8B shape's decode step from a CUDA graph at batch 1 and 32, context 128,
#             triton-rope with cuBLAS vs with the skinny products, a profiler table of the faster one
#   bench     bench tp --tp 1 --fast --fast-linear torch|triton: the step as issue 5's TP bars time it
# LINEAR=fastest (default triton) times FusedDecoder(linear="fastest") instead: cuBLAS, except o_proj, down_proj and
# the LM head, which run the plain skinny kernel where it timed faster for the shape. In one call of under 10 minutes:
#   LINEAR=fastest STAGES="tests profile bench"  (tests: only the "fastest" GPU tests, limit 120 s);
# PROFILE_BATCHES (default 32): the batches the profiler table is made for, e.g. 1,32
# Results to $OUT: skinny-tests.log, skinny-gemm.json, decode-profile-linears.json, bench_tp1_{torch,$LINEAR}.json,
# skinny.log. Run from the repository root: OUT=$OUT bash tools/gpu/skinny.sh
set -u
STAGES=${STAGES:-tests}
LINEAR=${LINEAR:-triton}
LOG=skinny.log
source tools/gpu/stages.sh  # $OUT, the log, setup.sh, has, step, fail

if has tests; then
    step "tests"
    if [ "$LINEAR" = fastest ]; then
        tests=(-k fastest); limit=120
    else
        tests=(-k "skinny or (graphs and triton)"); limit=540
    fi
    timeout $limit python -m pytest -o addopts="" -p no:cacheprovider -q tests/test_paged_gpu.py "${tests[@]}" \
        > "$OUT/skinny-tests.log" 2>&1 || fail=1
    tail -5 "$OUT/skinny-tests.log"
fi

if has micro; then
    step "skinny_gemm"
    timeout 420 python tools/skinny_gemm.py --batches 1,32 --json "$OUT/skinny-gemm.json" || fail=1
fi

if has profile; then
    step "profile_decode"
    timeout 240 python tools/profile_decode.py --model preset:llama-3.1-8b --batches 1,32 --contexts 128 \
        --variants fused-compiled-triton-rope,fused-$LINEAR-linears --profile-batches ${PROFILE_BATCHES:-32} \
        --json "$OUT/decode-profile-linears.json" || fail=1
fi

if has bench; then
    for linear in torch $LINEAR; do
        step "bench tp --fast --fast-linear $linear"
        timeout 150 python -m workbench bench tp --model preset:llama-3.1-8b --tp 1 --batch-sizes 1,32 \
            --context-len 128 --steps 20 --device cuda --fast --fast-linear $linear --timeout 140 \
            --json "$OUT/bench_tp1_$linear.json" || fail=1
    done
fi
step "done, exit $fail"
exit $fail
