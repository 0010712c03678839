#!/usr/bin/env bash
# One quality run: finetune RECIPE on CONVERTED (train: linuxdoc + gcide), export, evaluate on pydoc
# (held out as a whole file): perplexity at 2k/4k windows and passkey at 1k/2k/4k, 100 trials each.
set -euo pipefail
source benchmarks/gpu/env.sh
NAME=$1; RECIPE=$2; CONV=$3; shift 3
S=/root/stage; R=$S/runs/$NAME
rm -rf $R
start=$(date +%s)
t2r finetune $CONV $R --recipe $RECIPE ${TRAIN_DATA:---data $S/data/linuxdoc.txt --data $S/data/gcide.txt} "$@"
t2r export $R $S/exports/$NAME --force
mid=$(date +%s)
t2r eval $S/exports/$NAME --data $S/data/pydoc.txt --no-teacher --batch 8 --json $R/eval.json
echo "{\"finetune_export_s\": $((mid-start)), \"eval_s\": $(( $(date +%s) - mid ))}" > $R/wall.json
mkdir -p $OUT/r && tar czf $OUT/r/$NAME.tgz -C $S/runs $NAME/run.json $NAME/log.jsonl $NAME/loss.png \
  $NAME/eval.json $NAME/wall.json
