"""Does a model answer the training-time recall task (t2r.train.recall) on held-out text? Greedy answers to recall
rows built from a corpus the model did not train on: tells "never learned to recall" from "learned the drill
but not the passkey". Usage: python benchmarks/recall_probe.py MODEL_DIR CORPUS [--rows 100] [--seq 2048]"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from t2r.train.recall import recall_row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("corpus")
    ap.add_argument("--rows", type=int, default=100)
    ap.add_argument("--seq", type=int, default=2048)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, trust_remote_code=True).to(device)
    text = Path(args.corpus).read_text(encoding="utf-8", errors="replace")[:4_000_000]
    ids = np.array(tok(text)["input_ids"])
    if len(ids) < args.rows * args.seq:
        raise SystemExit(f"recall_probe: {args.corpus} has {len(ids)} tokens, fewer than {args.rows} x {args.seq}")
    hits = 0
    for r in range(args.rows):
        task = recall_row(ids[r * args.seq : (r + 1) * args.seq].copy(), tok, np.random.default_rng(1234 + r))
        if task is None:
            raise SystemExit(f"recall_probe: rows of {args.seq} tokens are too short to hold a recall task")
        row, n_answer = task
        prompt, answer = row[:-n_answer], tok.decode(row[-n_answer:]).strip(" .")
        out = model.generate(torch.tensor(prompt[None]).to(device), max_new_tokens=n_answer + 2, do_sample=False)
        hits += answer in tok.decode(out[0, len(prompt) :])
    print(json.dumps({"model": args.model, "rows": args.rows, "seq": args.seq, "recall_acc": hits / args.rows}))


if __name__ == "__main__":
    main()
