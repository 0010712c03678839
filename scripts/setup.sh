#!/usr/bin/env bash
# Create .venv (if missing) and install t2r with its test tools. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first, pinned: an unpinned resolve may pull a multi-GB CUDA build onto a CPU machine.
# For GPUs, install the torch build you want before running this script; it is kept.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${T2R_TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[dev]"
python -c "import t2r, t2r.kernels, t2r.cli" 
