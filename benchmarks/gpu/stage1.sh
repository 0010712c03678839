#!/usr/bin/env bash
# First call of a GPU session: park the GGUF's first part (carried in .stage1) and install the carried wheels
# (.whl: datasets, dill, multiprocess, gguf; fla-core and flash-linear-attention for comparisons only).
set -euo pipefail
mkdir -p /root/stage /root/site
cp .stage1/* /root/stage/
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site .whl/*.whl
PYTHONPATH=/root/site python3 -c "import datasets, gguf, pyarrow; print('datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)"
