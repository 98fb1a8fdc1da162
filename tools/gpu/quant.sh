#!/usr/bin/env bash
# Issue 7's quantization GPU job (one H100, target under 4 minutes; not yet run on a GPU):
#   1. tests/test_quant_gpu.py: tinygemm int4 / int8 weight-only kernels, CUDA-graph decode and the
#      quantized KV cache on the device (log -> $OUT/quant_gpu_tests.txt);
#   2. `bench quant`: Llama-3.2-1B shape in bf16 for memory and decode speed (batch 1 and 16, CUDA
#      graphs), the bundled model in bf16 for perplexity / logit error -> $OUT/quant_<tag>_<date>.json;
#   3. notebook 07 executed on CUDA -> $OUT/07_quantization.<tag>.ipynb.
# COMPILED=1 adds a `bench quant --kernels compiled` run (torch.compile; slow to compile).
# Dry run on CPU: DEVICE=cpu SMOKE=1 OUT=/tmp/x bash tools/gpu/quant.sh
set -euo pipefail
OUT=${OUT:?set OUT}
DEVICE=${DEVICE:-cuda}
TAG=${TAG:-h100}
SPEED_MODEL=${SPEED_MODEL:-preset:llama-3.2-1b}
source tools/gpu/setup.sh || true
export PYTHONPATH="$PWD"
mkdir -p "$OUT"
failed=0
start=$SECONDS

if [ "${SMOKE:-0}" = 1 ]; then
    python -m workbench bench quant --device "$DEVICE" --model bundled --weights int8-ch-sym,int4-g64-sym \
        --embeddings int4-g64-asym --kv int4-g32-asym --windows 2 --seq-len 64 --prompt-len 16 \
        --decode-steps 4 --batch-sizes 1,2 --kv-context 256 --threads 1 --json "$OUT/quant-smoke.json"
    (cd notebooks && python -m papermill 07_quantization.ipynb "$OUT/07_quantization.smoke.ipynb" \
        -p device "$DEVICE" -p smoke True --no-progress-bar) || failed=1
    echo "smoke done in $((SECONDS - start)) s"
    exit $failed
fi

python -m pytest -o addopts="" -p no:cacheprovider -q tests/test_quant_gpu.py \
    > "$OUT/quant_gpu_tests.txt" 2>&1 || { failed=1; echo "GPU tests FAILED (see quant_gpu_tests.txt)"; }
tail -3 "$OUT/quant_gpu_tests.txt"
echo "tests done at $((SECONDS - start)) s"

python -m workbench bench quant --device "$DEVICE" --dtype bfloat16 --model "$SPEED_MODEL" \
    --quality-model bundled --weights "${WEIGHTS:-int8-ch-sym,int4-g128-asym,int4-g64-sym,int4-g64-asym}" \
    --batch-sizes 1,16 --prompt-len 128 --decode-steps 64 --windows 32 \
    --json "$OUT/quant_${TAG}_$(date +%F).json" || failed=1
echo "bench done at $((SECONDS - start)) s"

if [ "${COMPILED:-0}" = 1 ]; then
    timeout 300 python -m workbench bench quant --device "$DEVICE" --dtype bfloat16 \
        --model "$SPEED_MODEL" --quality-model bundled --weights int8-ch-sym,int4-g64-asym \
        --kernels compiled --embeddings "" --kv "" --json "$OUT/quant-compiled_${TAG}_$(date +%F).json" \
        || echo "compiled run failed or timed out (not fatal)"
    echo "compiled bench done at $((SECONDS - start)) s"
fi

(cd notebooks && python -m papermill 07_quantization.ipynb "$OUT/07_quantization.${TAG}.ipynb" \
    -p device "$DEVICE" -p speed_model "$SPEED_MODEL" --no-progress-bar) || failed=1
echo "notebook done at $((SECONDS - start)) s"
exit $failed
