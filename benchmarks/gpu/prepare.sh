#!/usr/bin/env bash
# Call 2 of a session: join the GGUF, convert SmolLM2-135M three ways, benchmark training and decoding.
set -euo pipefail
source benchmarks/gpu/env.sh
S=/root/stage
cat $S/*.part1 .stage2/*.part2 > $S/SmolLM2-135M-Instruct.Q4_1.gguf
(cd $S && sha256sum SmolLM2-135M-Instruct.Q4_1.gguf)
cp .stage2/*.xz $S/ 2>/dev/null || true
mkdir -p $S/data && for f in $S/*.txt.xz; do xz -dkc "$f" > $S/data/$(basename "$f" .xz); done; ls -la $S/data
G=$S/SmolLM2-135M-Instruct.Q4_1.gguf
t2r convert $G $S/conv-random --gate-init random --force
t2r convert $G $S/conv-kproj --gate-init kproj --force
t2r convert $G $S/conv-hybrid --gate-init kproj --window 64 --force
mkdir -p $OUT/r
t2r bench train $S/conv-kproj --seq 2048 --seq 4096 --batch 8 --steps 5 --json $OUT/r/bench_train_smollm2.json
t2r bench generate $S/conv-kproj --context 1024 --context 4096 --context 16384 --context 32768 --batch 1 \
  --batch 16 --new-tokens 32 --json $OUT/r/bench_generate_smollm2.json
