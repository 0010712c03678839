#!/usr/bin/env bash
# 2-GPU FSDP2 vs 1 GPU on the same global batch: a SmolLM2-135M-shaped GSA model (random weights, the real
# tokenizer), full finetune with the LM loss. Prints tokens/s and the largest loss difference.
set -euo pipefail
source benchmarks/gpu/env.sh
W=/root/fsdp; rm -rf $W; mkdir -p $W
xz -dkc .stage_fsdp/pydoc.txt.xz > $W/pydoc.txt
python3 - <<'PY'
import shutil, torch
import t2r
from t2r.models.configuration_t2r import T2RLlamaConfig
from transformers import AutoModelForCausalLM
cfg = T2RLlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                     rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                     rms_norm_eps=1e-5, gsa_num_slots=64)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(cfg).save_pretrained("/root/fsdp/model")
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f".stage_fsdp/{f}", f"/root/fsdp/model/{f}")
PY
COMMON="--recipe smollm2-A-paper --data $W/pydoc.txt --set distributed=fsdp --set grad_accum=1 \
 --set stages.0.steps=30 --set stages.0.lr=1e-4 --set eval_every=0 --set calibrate_rows=0"
python3 -m torch.distributed.run --nproc_per_node 1 --master_port 29701 -m t2r.cli finetune $W/model $W/one \
  $COMMON --set micro_batch_size=8 2>&1 | grep -v "step/s\]\|it/s\]\|examples/s\]" | tail -2
python3 -m torch.distributed.run --nproc_per_node 2 --master_port 29702 -m t2r.cli finetune $W/model $W/two \
  $COMMON --set micro_batch_size=4 2>&1 | grep -v "step/s\]\|it/s\]\|examples/s\]" | tail -2
python3 - <<'PY' | tee $OUT/fsdp_check.json
import json
def read(run):
    rows = [json.loads(l) for l in open(f"/root/fsdp/{run}/log.jsonl")]
    return [r for r in rows if r["type"] == "train"]
one, two = read("one"), read("two")
diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two))
tps = lambda rows: sum(r["tokens_per_s"] for r in rows[5:]) / len(rows[5:])
print(json.dumps({"steps": len(one), "max_abs_loss_diff": diff, "first_loss": one[0]["loss"],
                  "last_loss_1gpu": one[-1]["loss"], "last_loss_2gpu": two[-1]["loss"],
                  "tokens_per_s_1gpu": round(tps(one)), "tokens_per_s_2gpu_fsdp": round(tps(two))}, indent=1))
PY
