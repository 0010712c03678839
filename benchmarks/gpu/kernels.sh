#!/usr/bin/env bash
# GPU session for the Triton kernels: correctness against the oracle (pytest, compiled kernels), a sweep of the
# tunables at two shapes (our kernels only), then `t2r bench kernels` (with FLA when its wheels are in /tmp/site).
# `fusions`: the inference fusions (tests; graphs and the fused paths against the reference with the RoPE and
# window-step kernels on; the hybrid's decoding with them off and on), the check behind turning those on by default;
# `hybrid-e2e`: the hybrid's generate() with them on, against the teacher at 32k.
# `finetune-graphs`: `t2r finetune` with and without its graphed micro-batch step (recipe graphs: true).
# `train`: the training fusions' and graphed steps' GPU tests, then whole steps against the teacher, eager and
# as CUDA graphs (`--graphs`), each row with its GPU busy time; `fusions-ab`: the fusions off and on in one run,
# the check behind turning them on by default. `variants`: the same steps with kernel tunables changed (the scans
# in parts, smaller scan blocks).
# `gqa`: the kernels at real models' GQA shapes; `gqa-ab`: an A/B there against another revision's kernels (AB_OLD).
# `scan`: the forward scans in parts and in smaller row blocks, kernels alone.
# `new`: the GPU tests of everything built since the last GPU run (the first call of a session).
# `window`: the hybrid's fused window step alone, its launch geometry swept (benchmarks/gpu/window_tiles.py).
# `grouped`: the grouped decoding projections against cuBLAS, then in the profiled decoding step.
# `fused-maps`: the decoder layer's norms and residual adds in the grouped launches, their geometry, and
# programmatic dependent launches, timed.
# `decode-split`: the one-token GSA step split over its memories' blocks, off / on / auto, against FLA's.
# Usage: benchmarks/gpu/kernels.sh [new] [tests] [fusions] [hybrid-e2e] [window] [grouped] [fused-maps] [fused-maps-profiles] [decode-split] [decode-whole] [decode-profile] [finetune-graphs] [train] [fusions-ab] [variants] [gqa] [gqa-ab] [scan] [sweep] [profile] [bench] [nofla]   (logs under $OUT; TESTS_K: see tests)
set -uo pipefail
source benchmarks/gpu/env.sh  # carried wheels (FLA for the comparison) in /root/site
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
decode_rows() {  # JSON TAG: the decode rows of a `t2r bench kernels` record, one line each
  python - "$1" "$2" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    if "layer" in r:
        print(f"[{sys.argv[2]}] {r['layer']:13} B={r['B']:<3} ours {r['ours_step_ms']:.4f} ms  fla {r.get('fla_step_ms', '-')}"
              f"  fla/ours {r.get('fla/ours', '-')}  ours/floor {r.get('ours/floor', '-')}  ours/copy {r['ours/state_copy']}")
PY
}
for step in "$@"; do case $step in
tests)
  python -m pip list 2>/dev/null | grep -i -E '^(torch|triton|transformers) '
  # TESTS_K="EXPR": only the tests pytest's -k selects (the whole set no longer fits one call on a fresh machine).
  python -m pytest -q -p no:cacheprovider tests/test_gsa_triton.py tests/test_gsa_reference.py ${TESTS_K:+-k "$TESTS_K"} -rf \
    2>&1 | tee "$OUT/pytest_gpu${TESTS_K:+_part}.log" | tail -15 ;;
new)
  # First call of a GPU session after CPU-only ones: the GPU tests of what was built without a GPU (the scans in
  # parts, the fused losses, the graphed and sync-free training steps with real captures, the ring window and its
  # custom op in the compiled decoding step), and the hybrid's graphs and fused paths against the reference. The
  # three are checks, not timings, so they run side by side (Triton compiles on 16 cores); each under its own
  # timeout, its summary on stdout.
  timeout 480 python -m pytest -q -p no:cacheprovider tests/test_gsa_triton.py tests/test_losses.py tests/test_bench.py \
    tests/test_model.py tests/test_fusions.py tests/test_decode_graphs.py \
    -k "two_level or fused or graphed or waits_for or window or hybrid" -rf > "$OUT/pytest_gpu_new.log" 2>&1 &
  timeout 480 python -m pytest -q -p no:cacheprovider tests/test_graphed_step.py -rf > "$OUT/pytest_gpu_graphed.log" 2>&1 &
  T2R_GSA_FUSED_ROPE=1 T2R_GSA_FUSED_WINDOW=1 timeout 480 python benchmarks/gpu/decode_graphs_check.py --no-compiled \
    --no-times --json "$OUT/fusions_check.json" > "$OUT/fusions_check.log" 2>&1 &
  wait
  tail -8 "$OUT/pytest_gpu_new.log"; tail -6 "$OUT/pytest_gpu_graphed.log"
  grep -E '"model"|rel_err|identical|failures|PASS|FAIL' "$OUT/fusions_check.log" ;;
fusions)
  python -m pytest -q -p no:cacheprovider tests/test_fusions.py tests/test_gsa_triton.py \
    -k "fusions or fused or launches or model_forward or decode" -rf 2>&1 | tee "$OUT/pytest_gpu_fusions.log" | tail -5
  T2R_GSA_FUSED_ROPE=1 T2R_GSA_FUSED_WINDOW=1 python benchmarks/gpu/decode_graphs_check.py --no-compiled --no-times \
    --json "$OUT/fusions_check.json" 2>&1 | grep -E '"model"|rel_err|identical|failures|PASS|FAIL'
  for on in 0 1; do
    T2R_GSA_FUSED_ROPE=$on T2R_GSA_FUSED_WINDOW=$on python -m t2r.cli bench generate --shape smollm2-135m --window 512 \
      --context 32768 --batch 1 --batch 16 --no-teacher --json "$OUT/hybrid_fusions_$on.json" 2>&1 | grep "^GSA" | sed "s/^/[on=$on] /"
  done ;;
hybrid-e2e)
  # The hybrid's generate() against the teacher's best at 32k (issue 29's >= 10x), the inference fusions on: the
  # ring window's two launches (twenty-first session) in place of PyTorch's scatters, mask and SDPA.
  T2R_GSA_FUSED_ROPE=1 T2R_GSA_FUSED_WINDOW=1 timeout 420 python -m t2r.cli bench generate --shape smollm2-135m \
    --window 512 --end-to-end --compile-step --context 32768 --batch 1 --batch 16 \
    --json "$OUT/bench_generate_e2e_hybrid_fused.json" 2>&1 | tee "$OUT/bench_generate_e2e_hybrid_fused.log" | tail -12 ;;
window)
  # The hybrid's fused window step alone (benchmarks/gpu/window_tiles.py): tile, warps and programs per SM swept at
  # SmolLM2's and Mistral-7B's shapes, B = 1 / 16 / 64, each against the reference and the ring's read floor.
  timeout 300 python benchmarks/gpu/window_tiles.py --json "$OUT/window_tiles.json" 2>&1 | tee "$OUT/window_tiles.log" \
    | grep -E '^best|Error' ;;
grouped)
  # The grouped decoding projections (T2R_GSA_GROUPED_PROJECTIONS, on by default): the kernel swept against cuBLAS
  # (benchmarks/gpu/grouped_tiles.py), then the captured decoding step profiled with them off and on, GSA and hybrid.
  timeout 300 python benchmarks/gpu/grouped_tiles.py --json "$OUT/grouped_tiles.json" 2>&1 | tee "$OUT/grouped_tiles.log" \
    | grep -E '^(best|auto)|Error'
  for on in 0 1; do for w in 0 512; do
    T2R_GSA_GROUPED_PROJECTIONS=$on timeout 150 python benchmarks/decode_profile.py --window $w --batch 16 --no-teacher \
      --json "$OUT/decode_profile_grouped${on}_w$w.json" 2>&1 | grep -E "gpu_busy|launches|wall" | head -3 | sed "s/^/[grouped=$on W=$w] /"
  done; done ;;
fused-maps)
  # The decoder layer's neighbours in the grouped launches (T2R_GSA_FUSED_MAPS) and programmatic dependent launches
  # (T2R_GSA_PDL): their GPU tests, each fusion alone against its separate launches (grouped_neighbours.py), then
  # the captured step (GSA and the W = 512 hybrid, batch 1 and 16) with each off and on. RUNS: GEOMETRY:MAPS:PDL
  # triples (GEOMETRY old: the fixed 32 x 128 x 4 tiles used before 2026-12-06).
  timeout 200 python -m pytest -q -p no:cacheprovider tests/test_grouped_linear.py tests/test_decode_graphs.py \
    tests/test_fusions.py -k "grouped or dependent or replayed or rotary" -rf 2>&1 | tail -3
  timeout 200 python benchmarks/gpu/grouped_neighbours.py --json "$OUT/grouped_neighbours.json" 2>&1 \
    | tee "$OUT/grouped_neighbours.log" | grep -E '^best|Error'
  ;&
fused-maps-profiles)
  for run in ${RUNS:-new:0:0 new:0:1 new:1:0 new:1:1}; do
    IFS=: read -r geo maps dependent <<< "$run"
    for w in 0 512; do
      tag="geometry=$geo maps=$maps pdl=$dependent W=$w"
      T2R_GSA_FUSED_MAPS=$maps T2R_GSA_PDL=$dependent timeout 150 python - "$geo" "$w" \
        "$OUT/decode_profile_${geo}_maps${maps}_pdl${dependent}_w$w.json" <<'PY' 2>&1 \
        | grep -E '"batch"|wall|gpu_busy|launches' | paste - - - - | sed "s/^/[$tag] /"
import runpy, sys
import t2r.kernels.grouped_linear as grouped
if sys.argv[1] == "old":
    grouped.GROUPED_GEOMETRY = (32, 128, 4)  # the fixed geometry before 2026-12-06
sys.argv = ["decode_profile.py", "--window", sys.argv[2], "--batch", "1", "--batch", "16", "--no-teacher",
            "--json", sys.argv[3]]
runpy.run_path("benchmarks/decode_profile.py", run_name="__main__")
PY
    done
  done ;;
decode-split)
  # The one-token step split over its memories' blocks (T2R_GSA_DECODE_SPLIT, auto by default) against the
  # one-program step and FLA's (when its wheels are carried): the issue's layer and the GQA ones, batch 1 / 16 / 64,
  # each timed as a graph's replay over copies of its inputs; then the profiled decoding step (GSA and the W = 512
  # hybrid, batch 1 and 16) with it off and on.
  # BLOCKS: the memories' row / column blocks a program streams (T2R_GSA_DECODE_BLOCK; 64 is one block at
  # SmolLM2's K = V = 64, where FLA's step takes one round of loads each way and ours at 32 two).
  for blk in ${BLOCKS:-32 64}; do for mode in off on auto; do
    T2R_GSA_DECODE_BLOCK=$blk T2R_GSA_DECODE_SPLIT=$mode timeout 200 python -m t2r.cli bench kernels --no-train --no-loss \
      --layer issue --layer smollm2-135m --layer mistral-7b --json "$OUT/bench_decode_split_${mode}_$blk.json" \
      > "/tmp/bench_decode_split_${mode}_$blk.log" 2>&1 || echo "[block=$blk split=$mode] rc $?"
    decode_rows "$OUT/bench_decode_split_${mode}_$blk.json" "block=$blk split=$mode"
  done; done
  for mode in off on; do for w in 0 512; do
    T2R_GSA_DECODE_SPLIT=$mode timeout 150 python benchmarks/decode_profile.py --window $w --batch 1 --batch 16 --no-teacher \
      --json "/tmp/decode_profile_split_${mode}_w$w.json" 2>&1 | grep -E '"batch"|gpu_busy|wall' | paste - - - \
      | sed "s/^/[split=$mode W=$w] /"
  done; done ;;
decode-whole)
  # The one-token step in one pass, both memories whole in registers (T2R_GSA_DECODE_WHOLE): its GPU tests, then
  # off / on (and on at 8 warps: WARPS) against FLA's step (carry .whl), the issue's layer and the GQA ones at batch
  # 1 / 16 / 64 as graph replays; then the captured decoding step (GSA and the W = 512 hybrid, batch 1 and 16; W
  # picks the windows).
  timeout 240 python -m pytest -q -p no:cacheprovider tests/test_gsa_triton.py tests/test_decode_graphs.py \
    -k "decode or dependent or replayed" -rf 2>&1 | tail -4
  for run in ${RUNS:-off:4 on:4 on:8}; do
    IFS=: read -r mode warps <<< "$run"
    T2R_GSA_DECODE_WHOLE=$mode T2R_GSA_DECODE_WARPS=$warps timeout 200 python -m t2r.cli bench kernels --no-train \
      --no-loss --layer issue --layer smollm2-135m --layer mistral-7b --json "$OUT/bench_decode_whole_${mode}_$warps.json" \
      > "/tmp/bench_decode_whole_${mode}_$warps.log" 2>&1 || echo "[whole=$mode warps=$warps] rc $?"
    decode_rows "$OUT/bench_decode_whole_${mode}_$warps.json" "whole=$mode warps=$warps"
  done
  for mode in off on; do for w in ${W:-0 512}; do
    T2R_GSA_DECODE_WHOLE=$mode timeout 150 python benchmarks/decode_profile.py --window $w --batch 1 --batch 16 --no-teacher \
      --json "/tmp/decode_profile_whole_${mode}_w$w.json" 2>&1 | grep -E '"batch"|wall|gpu_busy|launches' | paste - - - - \
      | sed "s/^/[whole=$mode W=$w] /"
  done; done ;;
decode-profile)
  # Where a captured decoding step's time goes (batch 16, after a 1k prefill; each kernel of a replay, named), the
  # W = 512 hybrid beside all-GSA: what separates the hybrid's step from GSA's, kernel by kernel.
  for w in 0 512; do
    timeout 150 python benchmarks/decode_profile.py --window $w --batch 16 --no-teacher --json "$OUT/decode_profile_w$w.json" \
      2>&1 | tee "$OUT/decode_profile_w$w.log" | tail -25 | sed "s/^/[W=$w] /"
  done ;;
finetune-graphs)
  # t2r finetune's graphed micro-batch step (recipe graphs: true) against eager steps, and the all-softmax control's
  # eager steps (the teacher's layers; after `ONLY="kproj teacher" prepare.sh`): one LoRA stage on the pydoc
  # corpus, 1 x 4096, 60 steps, logged every 20; cross-entropy, then cross-entropy with distillation (the teacher's
  # forward inside the graph). Each run's last tokens/s (steps 41-60) and graphs line. One run at a time. RUNS
  # picks (conversion:loss:graphs). The GPU tests of the graphed step run in `new`.
  for run in ${RUNS:-kproj:ce:false kproj:ce:true teacher:ce:false kproj:kd:false kproj:kd:true}; do
    IFS=: read -r conv loss graphs <<< "$run"; dir=/tmp/ft-$conv-$loss-graphs-$graphs
    weights="{ce: 1.0}"; [ "$loss" = kd ] && weights="{ce: 1.0, kd: 1.0}"
    timeout 150 python3 -m t2r.cli finetune /root/stage/conv-$conv $dir --data /root/stage/data/pydoc.txt \
      --set seq_len=4096 --set micro_batch_size=1 --set eval_every=0 --set checkpoint_every=0 --set calibrate_rows=0 \
      --set log_every=20 --set "stages=[{name: lm, train: lora, steps: 60, lr: 1.0e-4, loss: $weights}]" \
      --set graphs=$graphs > "$OUT/finetune_${conv}_${loss}_graphs_$graphs.log" 2>&1 || echo "[$run] rc $?"
    grep -E '"type": "(graphs|train)"' $dir/log.jsonl | tail -2 | sed "s/^/[$run] /"
    cp $dir/log.jsonl "$OUT/finetune_${conv}_${loss}_graphs_${graphs}_log.jsonl" 2>/dev/null
  done ;;
train)
  K="gradients or prologue or opt_in or launches or model_forward or profiled or merged_reverse or graphed"
  python -m pytest -q -p no:cacheprovider tests/test_fusions.py tests/test_gsa_triton.py tests/test_bench.py \
    tests/test_losses.py tests/test_model.py -k "$K or fused or waits_for_the_device" -rf \
    2>&1 | tee "$OUT/pytest_gpu_train_fusions.log" | tail -5
  # Eager and graphed steps (--graphs: each step one CUDA graph replay, the teacher's too), turn by turn.
  python -m t2r.cli bench train --shape smollm2-135m --seq 4096 --seq 16384 --batch 1 --steps 10 --graphs \
    --profile 3 --rounds 3 --json "$OUT/bench_train_graphs.json" 2>&1 | tee "$OUT/bench_train_graphs.log" | tail -8 ;;
fusions-ab)
  python -m t2r.cli bench train --shape smollm2-135m --seq 4096 --seq 16384 --batch 1 --steps 10 --fusions --profile 3 \
    --rounds 3 --json "$OUT/bench_train_fusions.json" 2>&1 | tee "$OUT/bench_train_fusions.log" | tail -8 ;;
variants)
  # Kernel tunables in whole steps, each beside the teacher (a call of its own: every variant compiles its kernels).
  # The defaults since 2026-12-05 (H200: GPU time per 16k step 128.6 -> 66.5 ms, docs/benchmarks.md): the scans in
  # parts (scan_parts=0, automatic) and the fused loss (fused_ce=1); the rows here switch each off again, and try
  # smaller scan row blocks (state_block=32).
  python -m t2r.cli bench train --shape smollm2-135m --seq 4096 --seq 16384 --batch 1 --steps 10 --profile 3 --rounds 2 \
    --tuning scan_parts=1 --tuning fused_ce=0 --tuning scan_parts=1,fused_ce=0 --tuning state_block=32 \
    --json "$OUT/bench_train_variants.json" 2>&1 | tee "$OUT/bench_train_variants.log" | grep -E '^\{|^GSA|^teacher' ;;
gqa)
  # Real models' GQA layer shapes (SmolLM2: 9 heads over 3 KV heads of 64; Mistral-7B: 32 over 8 of 128), which the
  # default issue shape (no GQA) never timed; and the training loss, chunked against fused (T2R_GSA_FUSED_CE).
  python -m t2r.cli bench kernels --layer smollm2-135m --layer mistral-7b --shape 1x4096 --shape 1x16384 \
    --decode-batch 16 --json "$OUT/bench_kernels_gqa.json" 2>&1 | tee "$OUT/bench_kernels_gqa.log" | tail -12 ;;
gqa-ab)
  # AB_OLD=DIR: another revision's t2r/kernels (carried untracked, e.g. from `git archive 9f23b4e t2r/kernels`, the
  # last with unrolled heads) beside this one in one process, at the GQA shapes.
  LAYERS=smollm2-135m,mistral-7b python benchmarks/ab_kernels.py "$AB_OLD" 2>&1 | tee "$OUT/ab_gqa.log" ;;
scan)
  # The forward scans in parts (T2R_GSA_SCAN_PARTS) and smaller row blocks (T2R_GSA_STATE_BLOCK), kernels alone at
  # real models' shapes (each setting checked against the oracle by tests/test_gsa_triton.py -k two_level first).
  python -m pytest -q -p no:cacheprovider tests/test_gsa_triton.py -k "two_level or scan_block" -rf 2>&1 | tail -2
  for cfg in ${SCAN:-"1 64" "0 64" "4 64" "8 64" "16 64" "1 16"}; do  # parts 0: automatic
    set -- $cfg
    T2R_GSA_SCAN_PARTS=$1 T2R_GSA_STATE_BLOCK=$2 python -m t2r.cli bench kernels --no-fla --no-loss --layer smollm2-135m \
      --layer mistral-7b --shape 1x4096 --shape 1x16384 --json "$OUT/scan_$1_$2.json" 2>&1 | sed "s/^/[parts $1 rows $2] /" |
      grep -v "^\[.*\] *$"
  done ;;
sweep)
  IFS=';' read -ra CFGS <<< "${SWEEP:-64 16 tf32 2;64 16 half 2;128 32 half 2;64 16 half 1;64 32 half 2}"
  for cfg in "${CFGS[@]}"; do
    set -- $cfg
    T2R_GSA_SEGMENT=$1 T2R_GSA_SUBCHUNK=$2 T2R_GSA_DOT=$3 T2R_GSA_STAGES=$4 python -m t2r.cli bench kernels --no-fla --no-loss \
      --shape 8x2048 --shape 1x16384 --json "$OUT/sweep_$1_$2_$3_$4.json" 2>&1 | sed "s/^/[$1 $2 $3 $4] /" | grep -v "^\[.*\] *$"
  done ;;
profile)
  python benchmarks/profile_kernels.py 2>&1 | tee "$OUT/profile.log" ;;
bench)
  python -m t2r.cli bench kernels --json "$OUT/bench_kernels.json" --record "$OUT/bench_kernels.md" 2>&1 |
    tee "$OUT/bench_kernels.log" ;;
nofla)
  python -m t2r.cli bench kernels --no-fla --json "$OUT/bench_kernels_nofla.json" --record "$OUT/bench_kernels_nofla.md" 2>&1 |
    tee "$OUT/bench_kernels_nofla.log" ;;
esac; done
