#!/usr/bin/env bash
# Issue 5's TP all-reduces on ONE GPU, in one call (only one-GPU kinds were lent in sessions 13-17):
# what each back end's code costs inside a TP rank's step, with no peer to wait for. Stages (STAGES, in this order):
#   smoke   tools/gpu/allreduce_smoke.py --ranks 1 (limit 100 s): NCCL's, the one-shot's and the fused all-reduce's
#           code paths (buffers, rendezvous, capture, the Triton kernel's compile) with nothing to sum across
#   bench   bench tp --tp 1,2,4 --alone --fast --symm-mem --fused-allreduce --profile (limit 290 s): the 8B shape in
#           bf16, each grid's TP rank 0 shard from a CUDA graph - without its all-reduces, with the one-shot, with the
#           all-reduce fused into the residual add and the next RMSNorm (their kernels at all 64 places, no peer: a
#           lower bound of the TP step)
#   tests   tests/test_parallel_gpu.py -k "alone or never_arrives or streams" (limit 120 s): both all-reduces over a
#           rank alone in fp32 give the eager step's logits; a fused all-reduce whose peer never arrives traps, and the
#           process ends; its barrier with 2 and 4 ranks as streams of the one GPU sums right, every flag at the last call
#   vocab   bench tp --tp 2,4 --alone --fast --vocab-parallel (limit 150 s): the same ranks with 1/tp of the LM head
#           (its embedding all-reduce and logits all-gather left out with the rest of the communication)
# Results to $OUT: alone.log, smoke.log, tp-fused-alone-llama-3.1-8b_<gpu>_<date>.json, alone-tests.log,
# tp-vocab-alone-llama-3.1-8b_<gpu>_<date>.json. The whole took 180 s on an H100 (2026-12-06); its stage limits add
# up to 9 minutes, so call it with the 600 s limit.
# Run from the repository root: OUT=$OUT bash tools/gpu/alone.sh
set -u
STAGES=${STAGES:-smoke bench tests vocab}
LOG=alone.log
source tools/gpu/stages.sh  # $OUT, the log, setup.sh ($GPU_TAG), has, step, fail
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if has smoke; then
    step "all-reduce smoke test, one rank"
    timeout 100 python tools/gpu/allreduce_smoke.py --ranks 1 --timeout 90 > "$OUT/smoke.log" 2>&1 || fail=1
    tail -25 "$OUT/smoke.log"
fi

if has bench; then
    step "bench tp --alone, the 8B shape: plain, one-shot, fused"
    timeout 290 python -m workbench bench tp --model preset:llama-3.1-8b --tp 1,2,4 --alone --fast --symm-mem \
        --fused-allreduce --profile --batch-sizes 1,32 --context-len 128 --steps 20 --timeout 280 \
        --json "$OUT/tp-fused-alone-llama-3.1-8b_${GPU_TAG}_$(date +%F).json" || fail=1
fi

if has tests; then
    step "GPU tests: a rank alone in fp32, a peer that never arrives, ranks as streams"
    timeout 120 python -m pytest -o addopts="" -p no:cacheprovider -q tests/test_parallel_gpu.py \
        -k "alone or never_arrives or streams" > "$OUT/alone-tests.log" 2>&1 || fail=1
    tail -15 "$OUT/alone-tests.log"
fi
if has vocab; then
    step "bench tp --alone --vocab-parallel, the 8B shape"
    timeout 150 python -m workbench bench tp --model preset:llama-3.1-8b --tp 2,4 --alone --fast --vocab-parallel \
        --batch-sizes 1,32 --context-len 128 --steps 20 --timeout 140 \
        --json "$OUT/tp-vocab-alone-llama-3.1-8b_${GPU_TAG}_$(date +%F).json" || fail=1
fi
step "done, exit $fail"
exit $fail
