#!/usr/bin/env bash
# Multi-GPU finetuning, measured (kind nvidia-h200-x2 or larger; also runs on CPU with DEVICE=cpu for a smoke test):
#   1. the same global batch on 1 process and on N under FSDP2 and under DDP: loss curves compared step by step;
#   2. a run on N processes whose last rank is SIGKILLed mid-stage, then --resume: compared with (1)'s curve;
#   3. tokens/s per GPU and scaling efficiency (N-process tokens/s / N) / (1-process tokens/s).
# Usage: MODEL=DIR DATA=FILE [NPROC=2] [STEPS=40] [MICRO=8] [DEVICE=cuda] [RECIPE=smollm2-A-paper] \
#          [EXTRA="--set seq_len=64 ..."] benchmarks/gpu/multi_gpu.sh   (results: $OUT/multi_gpu.json; logs: $W/*)
# Tolerance: the curves agree to bf16 autocast's rounding (the N-process reductions sum in another order); the
# check reports the largest absolute and relative loss difference and passes under TOL (default 2e-2 relative).
set -uo pipefail
[ -f benchmarks/gpu/env.sh ] && source benchmarks/gpu/env.sh
: "${MODEL:?MODEL=converted model dir}" "${DATA:?DATA=training text}"
NPROC=${NPROC:-2}; STEPS=${STEPS:-40}; MICRO=${MICRO:-8}; DEVICE=${DEVICE:-cuda}; TOL=${TOL:-2e-2}
RECIPE=${RECIPE:-smollm2-A-paper}; W=${W:-/tmp/multi_gpu}; OUT=${OUT:-$W}; rm -rf "$W"; mkdir -p "$W" "$OUT"
PORT=$((29600 + RANDOM % 300))
common() {  # the one-stage LM recipe, global batch NPROC x MICRO rows whatever the process count
  echo --recipe $RECIPE --data $DATA --set grad_accum=1 --set stages.0.steps=$STEPS --set eval_every=0 \
    --set calibrate_rows=0 --set checkpoint_every=$((STEPS / 4)) --set log_every=1 \
    ${DEVICE:+$( [ "$DEVICE" = cpu ] && echo --device cpu )} ${EXTRA:-}
}
launch() {  # NPROCS RUN_DIR EXTRA...
  local n=$1 run=$2; shift 2
  python3 -m torch.distributed.run --nproc_per_node $n --master_port $((PORT++)) -m t2r.cli finetune "$MODEL" "$run" \
    $(common) "$@"
}
set -x
launch 1 $W/one --set micro_batch_size=$((MICRO * NPROC)) > $W/one.log 2>&1 || { tail -5 $W/one.log; exit 1; }
for kind in fsdp ddp; do
  launch $NPROC $W/$kind --set micro_batch_size=$MICRO --set distributed=$kind > $W/$kind.log 2>&1 \
    || { tail -5 $W/$kind.log; exit 1; }
done
# Kill the last rank once the stage is past its second checkpoint, then resume on the same process count.
launch $NPROC $W/killed --set micro_batch_size=$MICRO --set distributed=fsdp > $W/killed.log 2>&1 &
agent=$!
trained() { local n; n=$(grep -c '"type": "train"' $W/killed/log.jsonl 2>/dev/null); echo "${n:-0}"; }
until [ "$(trained)" -gt $((STEPS / 2)) ]
do sleep 0.2; kill -0 $agent 2>/dev/null || { echo "the run ended before the kill: raise STEPS" >&2; exit 1; }; done
victim=$(python3 - $agent <<'PY'
import os, sys
def kids(pid):  # children of PID, from /proc (no procps needed)
    out = []
    for e in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(open(f"/proc/{e}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(e))
        except OSError:
            pass
    return out
todo, workers = [int(sys.argv[1])], []
while todo:
    pid = todo.pop()
    for kid in kids(pid):
        cmd = open(f"/proc/{kid}/cmdline").read()
        (workers.append(kid) if "t2r.cli" in cmd and "torch.distributed.run" not in cmd else None)
        todo.append(kid)
print(max(workers))
PY
)
kill -9 "$victim"; wait $agent; echo "killed worker pid $victim (the last rank): torchrun exit $?"
launch $NPROC $W/killed --set micro_batch_size=$MICRO --set distributed=fsdp --resume > $W/resumed.log 2>&1 \
  || { tail -5 $W/resumed.log; exit 1; }
set +x
python3 - "$W" "$NPROC" "$TOL" <<'PY' | tee "$OUT/multi_gpu.json"
import json, sys
from t2r.train.reporting import read_log
root, n, tol = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
curves = {k: {e["step"]: e for e in read_log(f"{root}/{k}") if e["type"] == "train"} for k in ("one", "fsdp", "ddp", "killed")}
def diff(a, b):
    worst = max(abs(curves[a][s]["loss"] - curves[b][s]["loss"]) / abs(curves[a][s]["loss"]) for s in curves[a])
    return round(worst, 6)
def tps(k):  # steady state: the second half of the run
    rows = [curves[k][s]["tokens_per_s"] for s in sorted(curves[k])][len(curves[k]) // 2:]
    return sum(rows) / len(rows)
out = {"processes": n, "steps": len(curves["one"]),
       "max_rel_loss_diff": {f"{k}_vs_one": diff("one", k) for k in ("fsdp", "ddp")} | {"killed_resumed_vs_fsdp": diff("fsdp", "killed")},
       "tokens_per_s": {k: round(tps(k)) for k in ("one", "fsdp", "ddp")}}
out["tokens_per_s_per_process"] = {k: round(tps(k) / n) for k in ("fsdp", "ddp")}
out["scaling_efficiency"] = {k: round(tps(k) / n / tps("one"), 3) for k in ("fsdp", "ddp")}
out["within_tolerance"] = all(v <= tol for v in out["max_rel_loss_diff"].values())
print(json.dumps(out, indent=1))
sys.exit(0 if out["within_tolerance"] else 1)
PY
