#!/usr/bin/env bash
# One quality run, part 1: finetune RECIPE on CONVERTED (train: linuxdoc + gcide) and export it.
# Part 2 is benchmarks/gpu/quality_eval.sh NAME on the same warm machine: one 600 s call no longer holds both.
set -euo pipefail
source benchmarks/gpu/env.sh
NAME=$1; RECIPE=$2; CONV=$3; shift 3
S=/root/stage; R=$S/runs/$NAME
rm -rf $R
start=$(date +%s)
t2r finetune $CONV $R --recipe $RECIPE ${TRAIN_DATA:---data $S/data/linuxdoc.txt --data $S/data/gcide.txt} "$@"
t2r export $R $S/exports/$NAME --force
echo "{\"finetune_export_s\": $(( $(date +%s) - start ))}" > $R/wall_train.json
mkdir -p $OUT/r && tar czf $OUT/r/$NAME.train.tgz -C $S/runs $NAME/run.json $NAME/log.jsonl $NAME/loss.png \
  $NAME/wall_train.json
