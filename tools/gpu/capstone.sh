#!/usr/bin/env bash
# Issue 8's capstone on one GPU (repository root), target under 4 minutes on an H100 (not yet run there):
#   notebook 09 executed on cuda:
#     sections 1-2: the bundled model in float32 on the GPU (continuous batching + paged KV, fp32/int8/int4
#       weights, the engine against the plain path; TP is skipped with a printed reason on a 1-GPU machine),
#     section 3: the what-if predictor and explorer (device table),
#     section 4: the Llama-3.2-1B shape (random weights) in bfloat16, dense and int4 (group 64, tinygemm's
#       int4mm kernel), paged KV + CUDA graphs, every engine step against its floor on the measured roofline,
#       and the same floor from the H100 datasheet.
#   Workload: 128 requests, 128-token prompts, 32-160 new tokens each, 64 sequences at once.
# Writes to $OUT: 09_serving_capstone.<gpu>.ipynb (e.g. .h100.ipynb) and capstone.log.
#   GPU:        OUT=/some/dir bash tools/gpu/capstone.sh
#   CPU check:  DEVICE=cpu SMOKE=1 PYTHON=.venv/bin/python OUT=/tmp/cap bash tools/gpu/capstone.sh
set -euo pipefail
source tools/gpu/job.sh  # DEVICE, SMOKE, OUT, PYTHON, TAG
if [ "$SMOKE" = 1 ]; then
    # the GPU's parameters on a small preset (the CPU check of the non-bundled path), smoke sizes
    PARAMS=(-p smoke True -p speed_model preset:smollm2-135m -p weights int4)
else
    PARAMS=(-p speed_model "${SPEED_MODEL:-preset:llama-3.2-1b}" -p weights "${WEIGHTS:-int4}"
            -p kernel "${KERNEL:-int4mm}" -p num_requests "${REQUESTS:-128}" -p prompt_len 128
            -p output_min 32 -p output_max 160 -p max_num_seqs 64 -p cuda_graphs True)
fi
start=$SECONDS
timeout 900 "$PYTHON" -m papermill notebooks/09_serving_capstone.ipynb "$OUT/09_serving_capstone.$TAG.ipynb" \
    --cwd notebooks -k python3 -p device "$DEVICE" "${PARAMS[@]}" --log-output > "$OUT/capstone.log" 2>&1 \
    || { tail -60 "$OUT/capstone.log"; exit 1; }
"$PYTHON" - "$OUT/09_serving_capstone.$TAG.ipynb" <<'PY'
import json, sys
cells = json.load(open(sys.argv[1]))["cells"]
cell = next(c for c in cells if "summary" in c.get("metadata", {}).get("tags", []))
print("".join(cell["outputs"][0]["data"]["text/plain"]))
PY
echo "notebook 09 done after $((SECONDS - start)) s -> $OUT/09_serving_capstone.$TAG.ipynb"
