#!/usr/bin/env bash
# One quality run, part 1: finetune RECIPE on CONVERTED (train: linuxdoc + gcide) and export it.
# Part 2 is benchmarks/gpu/quality_eval.sh NAME on the same warm machine: one 600 s call no longer holds both.
# A run that may not fit one call: STOP_AFTER=N checkpoints and stops after global step N (no export); the next
# call, RESUME=1 with the same arguments, continues from that checkpoint and exports.
set -euo pipefail
source benchmarks/gpu/env.sh
NAME=$1; RECIPE=$2; CONV=$3; shift 3
S=/root/stage; R=$S/runs/$NAME
DATA=${TRAIN_DATA:---data $S/data/linuxdoc.txt --data $S/data/gcide.txt}
start=$(date +%s)
if [ "${RESUME:-0}" = 1 ]; then
  t2r finetune $CONV $R --recipe $RECIPE $DATA --resume "$@"
else
  rm -rf $R
  t2r finetune $CONV $R --recipe $RECIPE $DATA ${STOP_AFTER:+--stop-after $STOP_AFTER} "$@"
fi
if [ -n "${STOP_AFTER:-}" ]; then echo $(( $(date +%s) - start )) >> $R/wall_parts; exit 0; fi
t2r export $R $S/exports/$NAME --force
echo $(( $(date +%s) - start )) >> $R/wall_parts
echo "{\"finetune_export_s\": $(awk '{s += $1} END {print s}' $R/wall_parts)}" > $R/wall_train.json
mkdir -p $OUT/r && tar czf $OUT/r/$NAME.train.tgz -C $S/runs $NAME/run.json $NAME/log.jsonl $NAME/loss.png \
  $NAME/wall_train.json
