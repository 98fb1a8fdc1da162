#!/usr/bin/env bash
# The fused RoPE + KV-write + paged-attention kernel (attention="triton-rope") on one GPU. Stages (STAGES, in this
# order; default "tests profile bench", under 10 minutes: limits 150 + 180 + 2 x 120 s):
#   tests     tests/test_paged_gpu.py -k test_triton_: the compiled kernels against the reference (both kernels, fp32, bf16)
#   profile   tools/profile_decode.py: the Llama-3.1-8B shape's decode step from a CUDA graph at batch 1 and 32,
#             context 128, attention triton vs triton-rope (GPU time per step vs the floor, a profiler table of the
#             faster one)
#   bench     bench tp --tp 1 --fast with each attention: the same step as issue 5's TP bars time it
#   autotune  (not in the default list; a second call: STAGES=autotune, limit 420 s) profile_decode again with
#             triton-rope compiled in Inductor's max-autotune mode (the GEMMs inside the compiled pieces timed as
#             Triton templates against cuBLAS) beside the default mode
#   configs   (not in the default list; STAGES=configs, limit 300 s) tools/attention_configs.py: the kernel's launch
#             choices (splits x tile x warps x stages) per layer at batch 1 and 32, 152 tokens a row (bench tp's
#             timed step at --context-len 128), against the default
# Results to $OUT: attention-configs.json, attention-tests.log, decode-profile-attention.json, bench_tp1_triton.json,
# bench_tp1_triton-rope.json, decode-profile-autotune.json, attention.log.
# Run from the repository root: OUT=$OUT bash tools/gpu/attention.sh
set -u
STAGES=${STAGES:-tests profile bench}
LOG=attention.log
source tools/gpu/stages.sh  # $OUT, the log, setup.sh, has, step, fail

if has tests; then
    step "tests"
    timeout 150 python -m pytest -o addopts="" -p no:cacheprovider -q tests/test_paged_gpu.py -k test_triton_ \
        > "$OUT/attention-tests.log" 2>&1 || fail=1
    tail -3 "$OUT/attention-tests.log"
fi

if has profile; then
    step "profile_decode"
    timeout 180 python tools/profile_decode.py --model preset:llama-3.1-8b --batches 1,32 --contexts 128 \
        --variants fused-compiled-triton,fused-compiled-triton-rope --profile-batches 32 \
        --json "$OUT/decode-profile-attention.json" || fail=1
fi

if has bench; then
    for attention in triton triton-rope; do
        step "bench tp --fast --fast-attention $attention"
        timeout 120 python -m workbench bench tp --model preset:llama-3.1-8b --tp 1 --batch-sizes 1,32 \
            --context-len 128 --steps 20 --device cuda --fast --fast-attention $attention --timeout 110 \
            --json "$OUT/bench_tp1_$attention.json" || fail=1
    done
fi

if has autotune; then
    step "profile_decode, max-autotune"
    timeout 420 python tools/profile_decode.py --model preset:llama-3.1-8b --batches 1,32 --contexts 128 \
        --variants fused-compiled-triton-rope,fused-autotune-triton-rope --profile-batches 32 \
        --json "$OUT/decode-profile-autotune.json" || fail=1
fi
if has configs; then
    step "attention_configs"
    timeout 300 python tools/attention_configs.py --batches 1,32 --context 152 --max-seconds 270 \
        --json "$OUT/attention-configs.json" || fail=1
fi
step "done, exit $fail"
exit $fail
