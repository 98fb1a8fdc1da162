#!/usr/bin/env bash
# Three sink experiments at once on one GPU (tools/sink_experiment.py; issue 7, notebook 08):
#   aligned   - the bundled corpus, every training window starting with end-of-text (like BOS),
#               2,000 steps; its best checkpoint comes back (bf16, 14 MB)
#   big       - the bundled corpus + ~200 M characters of the GPU machine's site-packages, 3,000 steps
#   big-aligned - the same with aligned windows
# Needs build/sinks-corpus (carry it; made here by `python tools/sink_experiment.py prepare`).
#   OUT=$OUT bash tools/gpu/sinks.sh
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:?set OUT}
SITE=$(python -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")
T=${T_SINKS:-500}
mkdir -p /tmp/sinks
date
timeout "$T" python tools/sink_experiment.py run --data build/sinks-corpus --out /tmp/sinks/aligned \
    --steps 2000 --align-documents --keep-model --skip-bundled > /tmp/sinks/aligned.log 2>&1 &
python tools/sink_experiment.py extend --data build/sinks-corpus --extra-root "$SITE" \
    --extra-chars 200000000 --out /tmp/sinks/big-corpus
date
timeout "$T" python tools/sink_experiment.py run --data /tmp/sinks/big-corpus --out /tmp/sinks/big \
    --steps 3000 --skip-bundled > /tmp/sinks/big.log 2>&1 &
timeout "$T" python tools/sink_experiment.py run --data /tmp/sinks/big-corpus \
    --out /tmp/sinks/big-aligned --steps 3000 --align-documents > /tmp/sinks/big-aligned.log 2>&1 &
wait
date
for v in aligned big big-aligned; do
    echo "== $v"; tail -c 2500 /tmp/sinks/$v.log
    cp /tmp/sinks/$v/sink-experiment.json "$OUT/sink-$v.json" 2>/dev/null
done
m=/tmp/sinks/aligned/model
[ -d $m ] && cp $m/model.safetensors $m/config.json $m/training_log.json "$OUT/" 2>/dev/null
ls -la "$OUT"
