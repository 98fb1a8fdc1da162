#!/usr/bin/env bash
# Issue 5's GPU-only paths on the bundled model, in about 4 minutes, before the 8B benchmarks spend their stage
# limits on them (none of these had run on a GPU when this was written, 2026-12-05):
#   1. tools/gpu/allreduce_smoke.py (2+ GPUs): NCCL's and the one-shot all-reduce's sums, eager and replayed, their
#      replayed latency; peer access, the multicast switches, the symmetric-memory back end
#   2. bench pp --pp 2 --cuda-graphs --in-flight (2+ GPUs): a stage replayed per micro-batch, micro-batches in flight
#      (the tokens' way back on its own communicator), each failure a row entry
#   3. bench tp --tp 2 --symm-mem --profile (2+ GPUs): the fast path with the one-shot all-reduce, compiled
#   4. tests/test_paged_gpu.py -k test_triton_ (any GPU): the compiled Triton kernels against the reference
#   5. tests/test_parallel_gpu.py -k nccl (2+ GPUs): a rank killed or hung on NCCL (job group, TP subgroup) ends
#      the job within 60 s, no process left (added 2026-12-05, not yet run)
# Results to $OUT: preflight.log, preflight_pp.json, preflight_tp.json, preflight-tests.log.
# Run from the repository root: OUT=$OUT bash tools/gpu/preflight.sh
set -u
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/preflight.log") 2>&1
source tools/gpu/setup.sh || true
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
fail=0
start=$SECONDS
step() { echo "== $1 ($(( SECONDS - start )) s)"; }

if [ "$NGPU" -ge 2 ]; then
    step "all-reduce smoke test"
    timeout 100 python tools/gpu/allreduce_smoke.py --ranks 2 --timeout 90 || fail=1
    step "bench pp, bundled, PP 2: graphs + in flight"
    timeout 90 python -m workbench bench pp --model bundled --pp 2 --micro-batches 2 --batch-sizes 4 \
        --context-len 16 --steps 4 --device cuda --cuda-graphs --in-flight --timeout 80 \
        --json "$OUT/preflight_pp.json" || fail=1
    step "bench tp, bundled, TP 2: one-shot all-reduce, alone and fused into the next norm"
    timeout 180 python -m workbench bench tp --model bundled --tp 2 --batch-sizes 1,4 --context-len 16 \
        --steps 4 --device cuda --symm-mem --fused-allreduce --profile --timeout 170 \
        --json "$OUT/preflight_tp.json" || fail=1
else
    echo "one GPU: the multi-GPU checks are skipped"
fi
step "compiled Triton kernels"
timeout 150 python -m pytest -o addopts="" -p no:cacheprovider -q tests/test_paged_gpu.py -k test_triton_ \
    > "$OUT/preflight-tests.log" 2>&1 || fail=1
tail -3 "$OUT/preflight-tests.log"
if [ "$NGPU" -ge 2 ]; then
    step "NCCL faults, and the fused all-reduce over two GPUs in fp32"
    timeout 200 python -m pytest -o addopts="" -p no:cacheprovider -q tests/test_parallel_gpu.py \
        -k "nccl or two_gpus" \
        >> "$OUT/preflight-tests.log" 2>&1 || fail=1
    tail -3 "$OUT/preflight-tests.log"
fi
step "done, exit $fail"
exit $fail
