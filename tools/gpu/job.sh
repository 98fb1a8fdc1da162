#!/usr/bin/env bash
# Sourced by the notebook jobs (capstone.sh, notebook03.sh, streaming.sh) after `set -euo pipefail`.
# Reads DEVICE (default cuda), SMOKE (0), OUT (required), PYTHON (python); makes $OUT and sets TAG:
# "cpu" for a CPU check (the repository on PYTHONPATH, one thread unless OMP_NUM_THREADS says
# otherwise), else the card's short name from setup.sh (which also installs papermill and ipykernel).
DEVICE=${DEVICE:-cuda}
SMOKE=${SMOKE:-0}
OUT=${OUT:?set OUT to the output directory}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
if [ "$DEVICE" = cpu ]; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    TAG=cpu
else
    source tools/gpu/setup.sh  # papermill and ipykernel from the carried .wheels/
    TAG=$GPU_TAG
fi
