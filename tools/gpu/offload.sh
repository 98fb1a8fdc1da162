#!/usr/bin/env bash
# Issue 6's GPU job (one H100, target under 6 minutes):
#   1. `bench offload` on the Llama-3.1-8B shape, bf16 random weights (16 GB, drawn tensor by tensor
#      straight into pinned host memory), under a 4 GiB GPU budget: block vs row-by-row schedule at
#      batch 1 and larger effective batches, the bound effective batch x pinned H2D bandwidth / weight
#      bytes, the cost model's predictions, and Accelerate (device_map + max_memory) in the same run;
#      prints the three bars (>= 80 % of the bound, >= 10x Accelerate's best, cost model within 25 %).
#   2. notebook 06 executed on cuda (offloading timed on preset:llama-3.2-1b, quality sections on the
#      bundled model) -> $OUT/06_offloading.h100.ipynb.
# Dry run on a CPU: DEVICE=cpu SMOKE=1 OUT=/tmp/x bash tools/gpu/offload.sh
set -euo pipefail
OUT=${OUT:?set OUT}
DEVICE=${DEVICE:-cuda}
TAG=${TAG:-h100}
mkdir -p "$OUT"
source tools/gpu/setup.sh || true
export PYTHONPATH="$PWD"
python -c "import accelerate" 2>/dev/null || \
    pip --python "$(which python)" install -q --no-index --find-links .wheels accelerate
DISK=$(mktemp -d /tmp/offload-disk.XXXX)
trap 'rm -rf "$DISK"' EXIT
START=$(date +%s)
if [ "${SMOKE:-0}" = 1 ]; then
    python -m workbench bench offload --device "$DEVICE" --budget 16MiB --batchings 2x1,2x2 \
        --prompt-len 8 --gen-len 3 --accelerate-batches 1,4 --smoke --threads 1 --no-progress \
        --disk-dir "$DISK" --json "$OUT/offload-smoke.json"
    python -m papermill notebooks/06_offloading.ipynb "$OUT/06_offloading.smoke.ipynb" \
        -p device "$DEVICE" -p smoke True -k python3 --cwd notebooks --no-progress-bar
    echo "smoke run done in $(( $(date +%s) - START )) s"
    exit 0
fi
python -m workbench bench offload --model preset:llama-3.1-8b --device "$DEVICE" --dtype bfloat16 \
    --budget 4GiB --weights auto --batchings "${BATCHINGS:-1x1,16x1,16x4,32x8}" \
    --schedules block,row --prompt-len 32 --gen-len 8 --accelerate-batches "${ACC_BATCHES:-1,16,64}" \
    --disk-dir "$DISK" --no-progress --json "$OUT/offload-llama-3.1-8b_${TAG}_$(date +%F).json"
echo "bench done in $(( $(date +%s) - START )) s"
python -m papermill notebooks/06_offloading.ipynb "$OUT/06_offloading.${TAG}.ipynb" \
    -p device "$DEVICE" -p model preset:llama-3.2-1b -p cpu_threads 0 -k python3 --cwd notebooks \
    --no-progress-bar
echo "all done in $(( $(date +%s) - START )) s"
