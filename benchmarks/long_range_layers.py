"""Which of a teacher's layers reach beyond a window? The layers to keep as softmax attention in a hybrid.

The W=64 hybrids lose to the teacher only beyond their window, and retrieve no passkey outside it
(docs/results.md). `t2r convert --full-attention-layers` keeps chosen layers as softmax attention; this script
says which, from the teacher's own attention (eager, on CPU or GPU):
- on real text, the share of each head's attention that lands further back than the last W tokens (the first
  SINK tokens left out: attention sinks are far but carry no content), averaged over queries past 2W;
- on passkey prompts (t2r eval's), the share the last prompt token, which predicts the key, puts on the key's
  tokens (retrieval heads).
Layers are ranked by their strongest retrieval head, then by their strongest far-reaching head.

Usage: python benchmarks/long_range_layers.py TEACHER CORPUS [--window 64] [--tokens 1024] [--context 1024]
                                              [--trials 8] [--top 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json

import torch

from t2r.evaluate import passkey_prompts, token_stream
from t2r.sources import load_eager_teacher

SINK = 4


def far_share(weights: torch.Tensor, window: int, sink: int = SINK) -> torch.Tensor:
    """weights [B, H, T, T] (causal softmax rows) -> [H]: mean over queries t >= 2W of the attention on keys
    j <= t - W, j >= sink."""
    T = weights.shape[-1]
    t = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    far = (j <= t - window) & (j >= sink)
    rows = torch.arange(T) >= 2 * window
    if not rows.any():
        raise ValueError(f"need more than {2 * window} tokens to measure attention beyond a window of {window}")
    return (weights.float() * far).sum(-1)[..., rows].mean(dim=(0, 2))


def key_share(weights: torch.Tensor, key_positions: list[int]) -> torch.Tensor:
    """weights [1, H, T, T] -> [H]: the last query's attention on the key's tokens."""
    return weights[0, :, -1, key_positions].float().sum(-1)


def key_token_positions(tokenizer, prompt: str, key: str) -> list[int]:
    """Token positions whose characters overlap any occurrence of the key in the prompt."""
    enc = tokenizer(prompt, return_offsets_mapping=True)
    spans, start = [], prompt.find(key)
    while start >= 0:
        spans.append((start, start + len(key)))
        start = prompt.find(key, start + 1)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if any(a < e and b > s for s, e in spans)]


class AttentionTap:
    """Forward hooks on every self-attention module that hand its attention weights to ``fn(layer, weights)``."""

    def __init__(self, model: torch.nn.Module):
        self.fn = None
        self.hooks = [
            layer.self_attn.register_forward_hook(lambda _m, _i, out, i=i: self.fn(i, out[1]))
            for i, layer in enumerate(model.model.layers)
        ]

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def long_range_profile(model, tokenizer, corpus: str, window: int, tokens: int, context: int, trials: int) -> dict:
    tap = AttentionTap(model)
    far, keys = {}, {}
    try:
        ids = token_stream([corpus], tokenizer)[:tokens][None]
        if ids.shape[1] <= 2 * window:
            raise SystemExit(f"{corpus} gives {ids.shape[1]} tokens: more than {2 * window} are needed for W={window}")
        tap.fn = lambda i, w: far.__setitem__(i, far_share(w, window))
        model(input_ids=ids)
        for prompt, key, _depth in passkey_prompts(tokenizer, context, trials):
            positions = key_token_positions(tokenizer, prompt, key)
            tap.fn = lambda i, w, p=positions: keys.setdefault(i, []).append(key_share(w, p))
            model(input_ids=tokenizer(prompt, return_tensors="pt").input_ids)
    finally:
        tap.close()
    layers = []
    for i in sorted(far):
        retrieval = torch.stack(keys[i]).mean(0)
        layers.append({
            "layer": i,
            "far_share_max": round(far[i].max().item(), 4),
            "far_share_mean": round(far[i].mean().item(), 4),
            "key_share_max": round(retrieval.max().item(), 4),
            "key_share_mean": round(retrieval.mean().item(), 4),
        })  # fmt: skip
    ranked = sorted(layers, key=lambda r: (-r["key_share_max"], -r["far_share_max"]))
    return {"window": window, "tokens": int(ids.shape[1]), "context": context, "trials": trials, "layers": layers,
            "ranked": [r["layer"] for r in ranked]}  # fmt: skip


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
