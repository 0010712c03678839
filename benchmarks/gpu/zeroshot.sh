#!/usr/bin/env bash
# Zero-shot table (issue 27): the teacher, the converted-untrained models, and the B (pure GSA) and C (hybrid)
# recipes trained on linuxdoc + gcide. Steps (each a call on the same warm machine; files under /root/stage):
#   convert[:B C W]  convert SmolLM2-135M for those runs (B: kproj, pure GSA; C: the hybrid, W=64, per-token
#            share, gate bias, window sink; W: the same hybrid with a 512-token window); all three by default
#   train:B, train:C, train:W  start that run in the background (setsid: it outlives the call), logs in
#            /root/stage/runs; several names ("train:B W") run side by side on the one GPU
#   untrained  t2r eval --tasks default of both conversions, teacher beside (timed)
#   finish:B, finish:C, finish:W  wait for that run, export, eval (tasks + passkey + pydoc perplexity), results to $OUT
set -uo pipefail
source benchmarks/gpu/env.sh
S=/root/stage; G=$S/SmolLM2-135M-Instruct.Q4_1.gguf; E=$S/eval; R=$S/runs; mkdir -p $R "$OUT"
# gcide.txt holds some Latin-1 bytes: decoded with replacement characters, as in the earlier sessions' runs.
DATA="--data $S/data/linuxdoc.txt --data $S/data/gcide.txt --set data.encoding_errors=replace"
for step in "$@"; do case $step in
convert*)
  names=${step#convert}; names=${names#:}
  HYBRID="--gate-init kproj --window-mix-per-token --gate-half-life-max 4096"
  [[ -z $names || " $names " == *" B "* ]] && t2r convert $G $S/conv-kproj --gate-init kproj --force
  [[ -z $names || " $names " == *" C "* ]] && t2r convert $G $S/conv-hybrid $HYBRID --window 64 --force
  [[ -z $names || " $names " == *" W "* ]] && t2r convert $G $S/conv-hybrid-w512 $HYBRID --window 512 --force
  true ;;
train:*)
  for run in B:smollm2-135m:conv-kproj C:smollm2-C-hybrid:conv-hybrid W:smollm2-C-hybrid:conv-hybrid-w512; do
    IFS=: read -r name recipe conv <<< "$run"
    [[ " ${step#train:} " == *" $name "* ]] || continue
    rm -rf $R/$name $R/$name.seconds
    setsid nohup bash -c "source benchmarks/gpu/env.sh; start=\$(date +%s); t2r finetune $S/$conv $R/$name \
      --recipe $recipe $DATA > $R/$name.log 2>&1; echo \$(( \$(date +%s) - start )) > $R/$name.seconds" \
      > /dev/null 2>&1 < /dev/null &
  done
  sleep 20; for f in $R/*.log; do tail -c 300 "$f" | tr '\r' '\n' | tail -1; done ;;
untrained)
  for conv in kproj hybrid; do
    start=$(date +%s)
    t2r eval $S/conv-$conv --tasks default --data-dir $E --no-passkey --batch 8 --json $OUT/untrained-$conv.json \
      $( [ $conv = hybrid ] && echo --no-teacher ) 2>&1 | grep -v "it/s\]" | tee $OUT/untrained-$conv.txt
    echo "untrained-$conv eval: $(( $(date +%s) - start )) s" | tee -a $OUT/timing.txt
  done ;;
finish:*)
  for name in ${step#finish:}; do
    while [ ! -e $R/$name.seconds ]; do sleep 10; done
    tail -2 $R/$name.log; echo "$name finetune: $(cat $R/$name.seconds) s" | tee -a $OUT/timing.txt
    t2r export $R/$name $S/exports/$name --force
    start=$(date +%s)
    t2r eval $S/exports/$name --tasks default --data-dir $E --data $S/data/pydoc.txt --batch 8 \
      --json $OUT/trained-$name.json ${NO_TEACHER:+--no-teacher} 2>&1 | grep -v "it/s\]" | tee $OUT/trained-$name.txt
    echo "trained-$name eval: $(( $(date +%s) - start )) s" | tee -a $OUT/timing.txt
    tar czf $OUT/run-$name.tgz -C $R $name/run.json $name/log.jsonl $name/loss.png $name.log
  done ;;
esac; done
