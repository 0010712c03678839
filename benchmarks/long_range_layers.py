"""Which of a teacher's layers reach beyond a window? The layers to keep as softmax attention in a hybrid.

The W=64 hybrids lose to the teacher only beyond their window, and retrieve no passkey outside it
(docs/results.md). `t2r convert --full-attention-layers` keeps chosen layers as softmax attention; this script
says which, from the teacher's own attention (eager, on CPU or GPU):
- on real text, the share of each head's attention that lands further back than the last W tokens (the first
  SINK tokens left out: attention sinks are far but carry no content), averaged over queries past 2W;
- on passkey prompts (t2r eval's), the share the last prompt token, which predicts the key, puts on the key's
  tokens (retrieval heads).
Layers are ranked by their strongest retrieval head, then by their strongest far-reaching head
(t2r.convert.layer_select, which `t2r convert --full-attention-layers auto:N` also uses, on its own prompts
and without the corpus).

Usage: python benchmarks/long_range_layers.py TEACHER CORPUS [--window 64] [--tokens 1024] [--context 1024]
                                              [--trials 8] [--top 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json

from t2r.convert.layer_select import far_profile, layer_table, rank_layers, retrieval_profile
from t2r.eval.perplexity import token_stream
from t2r.teacher import load_eager_teacher


def long_range_profile(model, tokenizer, corpus: str, window: int, tokens: int, context: int, trials: int) -> dict:
    ids = token_stream([corpus], tokenizer)[:tokens][None]
    if ids.shape[1] <= 2 * window:
        raise SystemExit(f"{corpus} gives {ids.shape[1]} tokens: more than {2 * window} are needed for W={window}")
    far = far_profile(model, ids, window)
    layers = layer_table(retrieval_profile(model, tokenizer, context, trials, seed=0), far)
    return {"window": window, "tokens": int(ids.shape[1]), "context": context, "trials": trials, "layers": layers,
            "ranked": rank_layers(layers)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("teacher", help="alias, directory or .gguf, as t2r convert takes")
    ap.add_argument("corpus")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--top", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    model, tokenizer = load_eager_teacher(args.teacher)
    result = long_range_profile(model, tokenizer, args.corpus, args.window, args.tokens, args.context, args.trials)
    print("layer | far share (max / mean head) | key share (max / mean head)")
    for r in result["layers"]:
        print(f"{r['layer']:5d} | {r['far_share_max']:.3f} / {r['far_share_mean']:.3f} "
              f"| {r['key_share_max']:.3f} / {r['key_share_mean']:.3f}")  # fmt: skip
    top = sorted(result["ranked"][: args.top])
    print(f"keep as softmax attention: --full-attention-layers {','.join(map(str, top))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
