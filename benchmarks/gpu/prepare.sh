#!/usr/bin/env bash
# Join the staged GGUF and convert SmolLM2-135M for the quality runs (kproj gates; hybrid with W = 64, also with a
# gate bias and with 128 slots; the control). Hybrids get a window sink by default since the seventh session; the
# conversions of the runs before it (C-C18) say --no-window-sink.
set -euo pipefail
source benchmarks/gpu/env.sh
S=/root/stage
cat $S/*.part1 .stage2/*.part2 > $S/SmolLM2-135M-Instruct.Q4_1.gguf
(cd $S && sha256sum SmolLM2-135M-Instruct.Q4_1.gguf)
cp .stage2/*.xz $S/ 2>/dev/null || true
mkdir -p $S/data && for f in $S/*.txt.xz; do xz -dkc "$f" > $S/data/$(basename "$f" .xz); done
G=$S/SmolLM2-135M-Instruct.Q4_1.gguf
declare -A ARGS=(
  [kproj]="--gate-init kproj"
  [hybrid]="--gate-init kproj --window 64 --no-window-sink"
  # The control: the teacher with every layer kept as softmax attention (t2r/train/recipes/smollm2-control-teacher.yaml).
  [teacher]="--full-attention-layers $(seq -s, 0 29)"
  # The hybrid with a gate bias: memory half-lives log-spaced from 8 to 4096 tokens at zero gate input.
  [hybrid-hl]="--gate-init kproj --window 64 --gate-half-life-max 4096 --no-window-sink"
  # Twice the slots (M = 128), same gate bias: more memory for the long-range context the hybrids miss.
  [hybrid-m128]="--gate-init kproj --window 64 --num-slots 128 --gate-half-life-max 4096 --no-window-sink"
  # The window share read per token from the hidden state (a router starting at zero), same gate bias.
  [hybrid-tok]="--gate-init kproj --window 64 --window-mix-per-token --gate-half-life-max 4096 --no-window-sink"
  # hybrid-tok with the two layers that hold the teacher's passkey-retrieval heads kept as softmax attention
  # (benchmarks/long_range_layers.py; docs/results/long_range_layers_smollm2_cpu.json).
  [hybrid-tok-fa2]="--gate-init kproj --window 64 --window-mix-per-token --gate-half-life-max 4096 --full-attention-layers 22,23 --no-window-sink"
  # ... and with all four layers that hold retrieval heads (20-23): C16 (22, 23 kept) still missed the passkey.
  [hybrid-tok-fa4]="--gate-init kproj --window 64 --window-mix-per-token --gate-half-life-max 4096 --full-attention-layers 20,21,22,23 --no-window-sink"
  # hybrid-tok whose windows also see a virtual first token (the teacher's newline key and value): without a
  # sink the windowed teacher collapses (docs/results.md, window sink).
  [hybrid-tok-sink]="--gate-init kproj --window 64 --window-mix-per-token --gate-half-life-max 4096 --window-sink"
  # The same four layers picked by the converter itself (t2r convert --full-attention-layers auto:4), with the sink.
  [hybrid-tok-auto4]="--gate-init kproj --window 64 --window-mix-per-token --gate-half-life-max 4096 --full-attention-layers auto:4"
  # C18's four softmax layers with the sink in the other 26 (C19 vs C15: the sink is worth 8% on pydoc).
  [hybrid-tok-sink-fa4]="--gate-init kproj --window 64 --window-mix-per-token --gate-half-life-max 4096 --full-attention-layers 20,21,22,23"
  # C19's hybrid (the sink) with 128 slots: C12's 128 slots changed nothing while every head took ~88% of its
  # output from the window; since the per-token share (C15) the memories carry about half of it.
  [hybrid-tok-sink-m128]="--gate-init kproj --window 64 --window-mix-per-token --gate-half-life-max 4096 --num-slots 128"
)
# ONLY="hybrid-hl hybrid-tok" converts just those (each conversion takes ~20 s of a GPU call).
for name in ${ONLY:-kproj hybrid teacher hybrid-hl hybrid-m128 hybrid-tok hybrid-tok-fa2 hybrid-tok-fa4}; do
  [ -n "${ARGS[$name]+x}" ] || { echo "prepare.sh: unknown conversion '$name' (one of: ${!ARGS[*]})" >&2; exit 2; }
  t2r convert $G $S/conv-$name ${ARGS[$name]} --force
done
