#!/usr/bin/env bash
# Notebook 03 (paged attention) executed on one GPU (repository root); estimated 6-8 minutes on an H100
# (not yet run there: about 3 of them are the live benchmark, torch.compile and graph captures included).
#   Sections 1-8 and 10: the bundled model in float32 on cuda (same tokens as transformers, block map,
#   accounting, budget sweep with the fast path, preemption, prefix cache);
#   section 9: the fast path live - bench_throughput (every system, 256 design-anchor requests) and
#   bench_batch1 - with the Llama-3.2-1B shape (random weights) in bfloat16. FAST_REQUESTS=64 shortens it.
# Writes to $OUT: 03_paged_attention.<gpu>.ipynb (e.g. .h100.ipynb) and notebook03.log.
#   GPU:        OUT=/some/dir bash tools/gpu/notebook03.sh
#   CPU check:  DEVICE=cpu SMOKE=1 PYTHON=.venv/bin/python OUT=/tmp/nb03 bash tools/gpu/notebook03.sh
set -euo pipefail
source tools/gpu/job.sh  # DEVICE, SMOKE, OUT, PYTHON, TAG
PARAMS=(-p device "$DEVICE" -p model bundled -p dtype float32
        -p fast_model preset:llama-3.2-1b -p fast_dtype bfloat16 -p fast_requests "${FAST_REQUESTS:-256}")
if [ "$SMOKE" = 1 ]; then
    PARAMS+=(-p smoke True)
fi
start=$SECONDS
"$PYTHON" -m papermill notebooks/03_paged_attention.ipynb "$OUT/03_paged_attention.$TAG.ipynb" \
    --cwd notebooks -k python3 "${PARAMS[@]}" --log-output > "$OUT/notebook03.log" 2>&1 \
    || { tail -60 "$OUT/notebook03.log"; exit 1; }
"$PYTHON" - "$OUT/03_paged_attention.$TAG.ipynb" <<'EOF'
import json, sys
cells = json.load(open(sys.argv[1]))["cells"]
cell = next(c for c in cells if "summary" in c.get("metadata", {}).get("tags", []))
print("".join(cell["outputs"][0]["data"]["text/plain"]))
EOF
echo "notebook 03 done after $((SECONDS - start)) s -> $OUT/03_paged_attention.$TAG.ipynb"
