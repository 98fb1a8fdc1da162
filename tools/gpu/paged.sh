#!/usr/bin/env bash
# Issue 4's GPU job (one H100, about 6 minutes): CUDA-graph correctness tests, then
# `bench paged` on the design anchor (Llama-3.2-1B shape, bf16, 256 requests) with the KV budget
# sweep. Results to $OUT. On CPU for a dry run: DEVICE=cpu SMOKE=1 OUT=/tmp/x bash tools/gpu/paged.sh
set -euo pipefail
OUT=${OUT:?set OUT}
DEVICE=${DEVICE:-cuda}
TAG=${TAG:-h100}
source tools/gpu/setup.sh || true
export PYTHONPATH="$PWD"
if [ "${SMOKE:-0}" = 1 ]; then
    python -m workbench bench paged --device "$DEVICE" --workload natural --num-requests 8 \
        --max-num-seqs 8 --batch1-tokens 16 --budgets 0.002 --no-progress --threads 1 \
        --json "$OUT/paged-smoke.json"
    exit 0
fi
[ "${SKIP_TESTS:-0}" = 1 ] || python -m pytest -o addopts="" -p no:cacheprovider -q tests/test_paged_gpu.py 2>&1 | tail -5
python -m workbench bench paged --model preset:llama-3.2-1b --dtype bfloat16 --device "$DEVICE" \
    --workload design-anchor --budgets "${BUDGETS:-1,2,4}" --no-progress \
    --json "$OUT/paged-design-anchor_${TAG}_$(date +%F).json"
