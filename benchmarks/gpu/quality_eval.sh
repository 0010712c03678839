#!/usr/bin/env bash
# One quality run, part 2: evaluate the export of benchmarks/gpu/quality_run.sh NAME on pydoc (held out as a whole
# file): perplexity at 2k/4k windows (also by position) and passkey at 1k/2k/4k, 100 trials each; then the
# slots' half-lives and the window shares the training left (benchmarks/inspect_memory.py).
set -euo pipefail
source benchmarks/gpu/env.sh
NAME=$1; shift
S=/root/stage; R=$S/runs/$NAME
start=$(date +%s)
t2r eval $S/exports/$NAME --data $S/data/pydoc.txt --no-teacher --batch 8 --json $R/eval.json "$@"
echo "{\"eval_s\": $(( $(date +%s) - start ))}" > $R/wall_eval.json
python benchmarks/inspect_memory.py $S/exports/$NAME $S/data/pydoc.txt --tokens 2048 --json $R/memory.json | tail -1
mkdir -p $OUT/r && tar czf $OUT/r/$NAME.eval.tgz -C $S/runs $NAME/eval.json $NAME/wall_eval.json $NAME/memory.json
