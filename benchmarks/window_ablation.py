"""Can the teacher still retrieve when only some layers see beyond a window? The hybrid's architecture, minus the
memories.

Every layer not in KEEP is limited to the last W tokens (softmax attention over a sliding window, which is what a
converted layer keeps besides its GSA memory); the layers in KEEP see everything, as `t2r convert
--full-attention-layers` keeps them. Passkey accuracy (t2r eval's prompts) and perplexity then show what those
layers can do with exact local attention and no memory at all. If the teacher retrieves this way, a hybrid that
keeps KEEP and misses the key loses it in conversion or training; if not, retrieval needs more far-reaching
layers than KEEP.

Usage: python benchmarks/window_ablation.py TEACHER CORPUS [--window 64] [--sink 4] [--keep 22,23 --keep 20,21,22,23]
                                            [--context 1024] [--trials 20] [--ppl-window 2048] [--ppl-windows 4]
                                            [--json FILE]
"""

from __future__ import annotations

import argparse
import json

import torch

from t2r.eval.passkey import passkey_accuracy
from t2r.eval.perplexity import perplexity, token_stream
from t2r.teacher import load_eager_teacher


def window_mask(mask: torch.Tensor, window: int, sink: int) -> torch.Tensor:
    """An eager attention mask [B, 1, Q, KV] (bool: True attends; float: additive) further limited to the last
    ``window`` positions of the key axis before each query (queries are the last Q key positions) and the first
    ``sink`` positions: a softmax layer cut off from its attention sinks collapses (StreamingLLM), which would
    say nothing about what the window loses."""
    Q, KV = mask.shape[-2:]
    q = torch.arange(KV - Q, KV, device=mask.device)[:, None]
    j = torch.arange(KV, device=mask.device)[None, :]
    far = (j <= q - window) & (j >= sink)
    if mask.dtype == torch.bool:
        return mask & ~far
    return mask.masked_fill(far, torch.finfo(mask.dtype).min)


class Windowed:
    """Pre-hooks that window the attention of every layer outside ``keep`` (eager attention: the mask is a
    tensor)."""

    def __init__(self, model: torch.nn.Module, keep: set[int], window: int, sink: int):
        def hook(_module, args, kwargs):
            if kwargs.get("attention_mask") is None:
                raise RuntimeError("window_ablation needs attn_implementation='eager' (a materialised mask)")
            kwargs["attention_mask"] = window_mask(kwargs["attention_mask"], window, sink)
            return args, kwargs

        self.hooks = [
            layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
            for i, layer in enumerate(model.model.layers)
            if i not in keep
        ]

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def ablate(model, tokenizer, tokens: torch.Tensor, keep: set[int] | None, window: int, sink: int, contexts,
           trials: int, ppl_window: int, ppl_windows: int) -> dict:  # fmt: skip
    """Passkey accuracy and perplexity with every layer outside ``keep`` windowed (``keep`` None: the teacher).
    Prompts go one at a time: left padding would move the sinks."""
    tap = Windowed(model, keep, window, sink) if keep is not None else None
    try:
        ppl = perplexity(model, tokens, ppl_window, ppl_windows, batch=1)
        passkey = {c: passkey_accuracy(model, tokenizer, c, trials, batch=1) for c in contexts}
    finally:
        if tap is not None:
            tap.close()
    return {
        "keep": sorted(keep) if keep is not None else "all",
        "ppl": round(ppl["ppl"], 3),
        "passkey": {c: p["accuracy"] for c, p in passkey.items()},
        "by_depth": {c: p["by_depth"] for c, p in passkey.items()},
        "samples": {c: p["samples"] for c, p in passkey.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("teacher", help="alias, directory or .gguf, as t2r convert takes")
    ap.add_argument("corpus")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--sink", type=int, default=4, help="first tokens every windowed layer still sees")
    ap.add_argument("--keep", action="append", default=[], help="comma-separated layers that see everything")
    ap.add_argument("--context", type=int, action="append")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--ppl-window", type=int, default=2048)
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args()
    model, tokenizer = load_eager_teacher(args.teacher)
    keeps = [None, set()] + [{int(x) for x in k.split(",") if x} for k in args.keep]
    tokens = token_stream([args.corpus], tokenizer)
    rows = []
    for keep in keeps:
        rows.append(ablate(model, tokenizer, tokens, keep, args.window, args.sink, args.context or [1024],
                           args.trials, args.ppl_window, args.ppl_windows))  # fmt: skip
        r = rows[-1]
        print(f"keep {r['keep']}: ppl {r['ppl']}, passkey {r['passkey']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"window": args.window, "sink": args.sink, "trials": args.trials, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
