#!/usr/bin/env bash
# Park carried files outside the repo copy (they stay while the machine is warm) and install the carried wheels.
# Usage: benchmarks/gpu/stage.sh DIR...   (.stage1: GGUF part 1 + eval sets; .stage2: corpora; .stage3: GGUF part 2)
set -euo pipefail
S=/root/stage; mkdir -p $S/data /root/site
for d in "$@"; do cp -r "$d"/* $S/; done
for f in $S/*.txt.xz; do [ -e "$f" ] && [ ! -e $S/data/$(basename "$f" .xz) ] && xz -dkc "$f" > $S/data/$(basename "$f" .xz); done
if ls $S/*.part1 >/dev/null 2>&1 && ls $S/*.part2 >/dev/null 2>&1 && [ ! -e $S/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
  cat $S/*.part1 $S/*.part2 > $S/SmolLM2-135M-Instruct.Q4_1.gguf && rm $S/*.part1 $S/*.part2
  (cd $S && sha256sum SmolLM2-135M-Instruct.Q4_1.gguf)
fi
if [ -d .whl ] && [ ! -e /root/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site .whl/*.whl
  touch /root/site/.installed
fi
PYTHONPATH=/root/site:$PWD python3 -c "import torch, transformers, triton, datasets, gguf, pyarrow, peft; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, \
'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__, 'peft', peft.__version__, torch.cuda.get_device_name())"
ls $S $S/data
