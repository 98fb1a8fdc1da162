#!/usr/bin/env bash
# Create the virtual environment and install the workbench into it (used by the Makefile).
#
# PyTorch comes first, so that pip never swaps in a multi-GB CUDA build on a CPU-only machine:
#   1. torch already importable in the venv: keep it;
#   2. a machine with an NVIDIA driver: the default PyPI build (CUDA) of TORCH_SPEC if given, else torch>=2.5;
#      TORCH_INDEX (with TORCH_SPEC, default torch==2.13.0) picks another index on any machine;
#   3. CPU only: the CPU build of torch 2.13.0 from a local wheel directory if pip has one
#      configured (find-links), else from PyTorch's CPU index.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
GIVEN_SPEC=${TORCH_SPEC:-}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already installed"
elif [ -n "${TORCH_INDEX:-}" ]; then
  "${pip[@]}" install "$TORCH_SPEC" --index-url "$TORCH_INDEX"
elif command -v nvidia-smi >/dev/null 2>&1; then
  echo "NVIDIA driver found: installing the CUDA build of ${GIVEN_SPEC:-torch>=2.5} from PyPI"
  "${pip[@]}" install "${GIVEN_SPEC:-torch>=2.5}"
elif "${pip[@]}" install --no-deps --no-index "$TORCH_SPEC" 2>/dev/null; then
  echo "installed $TORCH_SPEC (CPU) from a local wheel"
else
  echo "installing the CPU build of $TORCH_SPEC from download.pytorch.org"
  "${pip[@]}" install "$TORCH_SPEC" --index-url https://download.pytorch.org/whl/cpu \
    --extra-index-url https://pypi.org/simple
fi
"${pip[@]}" install -e "."  # the test extra: make test (Makefile)
echo "environment ready: $VENV"
