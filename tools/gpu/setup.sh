#!/usr/bin/env bash
# Source this on the GPU machine (repository root) before running notebooks there:
#   source tools/gpu/setup.sh
# The GPU machine has torch and transformers but no papermill/ipykernel and no network, so the
# wheels travel in .wheels/ (built here with `pip download --only-binary=:all: --python-version 3.12
# --platform manylinux2014_x86_64 -d .wheels papermill ipykernel ipywidgets`).
# It leaves the caller's shell options (set -e...) as they were.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# GPU_TAG: the card's short name for output file names (h100, h200, a100, l40s, l4; else "gpu").
GPU_TAG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 \
          | grep -oiE 'h100|h200|a100|l40s|l4' | head -1 | tr 'A-Z' 'a-z' || true)
GPU_TAG=${GPU_TAG:-gpu}
if ! python -c "import papermill, ipykernel" 2>/dev/null; then
    pip --python "$(which python)" install -q --no-index --find-links .wheels \
        papermill ipykernel ipywidgets || return 1
    python -m ipykernel install --sys-prefix --name python3 >/dev/null || return 1
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
