#!/usr/bin/env bash
# The test suite on the declared floor: every runtime dependency at pyproject's lower bound
# (scripts/floor_constraints.py), in its own environment (.venv-floor).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/floor_constraints.py > .floor-constraints.txt
T2R_VENV=.venv-floor T2R_CONSTRAINTS=.floor-constraints.txt scripts/setup.sh dev
. .venv-floor/bin/activate
python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|datasets|safetensors|tokenizers) " || true
# One worker per core (pytest-xdist); a file's tests stay on one worker, which builds its module fixtures once.
python -m pytest -q -n "${T2R_TEST_WORKERS:-logical}" --dist loadfile "$@"
