#!/usr/bin/env bash
# Set up (scripts/setup.sh: newest releases of every dependency) and run the whole test suite on CPU, then ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
. .venv/bin/activate
# One worker per core (pytest-xdist); a file's tests stay on one worker, which builds its module fixtures once.
python -m pytest -q -n "${T2R_TEST_WORKERS:-logical}" --dist loadfile "$@"
ruff check .
ruff format --check .
