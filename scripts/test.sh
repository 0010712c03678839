#!/usr/bin/env bash
# Set up (scripts/setup.sh: newest releases of every dependency) and run the whole test suite on CPU, then ruff.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
. .venv/bin/activate
python -m pytest -q "$@"
ruff check .
ruff format --check .
