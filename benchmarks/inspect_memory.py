"""How long do a converted model's GSA memories hold, and how much does a hybrid lean on its window?

Per GSA layer: each slot's memory half-life in tokens on real text (ln 2 over the slot's mean -log forget gate),
summarised as the median and the share of slots holding beyond 500 and 2,000 tokens; for hybrids, each head's
learned share of the window branch (averaged over the tokens where it is read per token). Run it on a trained
export to see whether finetuning taught the slots to hold (docs/results.md: the student loses to the teacher
only beyond its 64-token window).

Usage: python benchmarks/inspect_memory.py MODEL CORPUS [--tokens 2048] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import t2r  # noqa: F401  (registers the converted architectures)


def gsa_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "log_forget_gate")]


@torch.no_grad()
def memory_stats(model: torch.nn.Module, ids: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Over the tokens of ``ids``, per GSA layer index: every slot's half-life [Hkv * M] (the model's own gates),
    and for hybrids each head's window share [H], averaged over the tokens when it is read per token."""
    gates, shares, hooks = {}, {}, []
    for layer in gsa_layers(model):

        def gate_hook(_m, _inp, out, layer=layer):
            gates[layer.layer_idx] = layer.log_forget_gate(out).mean(dim=(0, 1))

        def share_hook(_m, _inp, out, idx=layer.layer_idx):
            shares[idx] = torch.sigmoid(out.float()).reshape(-1, out.shape[-1]).mean(0)

        hooks.append(layer.f_proj.register_forward_hook(gate_hook))
        if getattr(layer, "window_mix", None) is not None:
            hooks.append(layer.window_mix.register_forward_hook(share_hook))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {idx: math.log(2) / -g.clamp(max=-1e-12) for idx, g in gates.items()}, shares


def summary(half_lives: torch.Tensor) -> dict:
    return {
        "median_half_life": round(half_lives.median().item(), 2),
        "share_over_500": round((half_lives > 500).float().mean().item(), 4),
        "share_over_2000": round((half_lives > 2000).float().mean().item(), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("corpus")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    if not gsa_layers(model):
        raise SystemExit(f"inspect_memory: {args.model} has no GSA layers")
    text = Path(args.corpus).read_text(encoding="utf-8", errors="replace")[: 20 * args.tokens]
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"inspect_memory: {args.corpus} has {ids.shape[1]} tokens, fewer than {args.tokens}")
    per_layer, shares = memory_stats(model, ids.to(device))
    rows = []
    for layer in gsa_layers(model):
        row = {"layer": layer.layer_idx, **summary(per_layer[layer.layer_idx])}
        if layer.layer_idx in shares:
            share = shares[layer.layer_idx]
            row["window_share"] = [round(x, 3) for x in (share.min().item(), share.median().item(), share.max().item())]
        rows.append(row)
    result = {"model": args.model, "tokens": args.tokens, "all": summary(torch.cat(list(per_layer.values()))),
              "layers": rows}  # fmt: skip
    print("layer | median half-life | > 500 | > 2000 | window share min/median/max")
    for r in rows:
        share = "/".join(f"{x:.2f}" for x in r["window_share"]) if "window_share" in r else "-"
        print(f"{r['layer']:5d} | {r['median_half_life']:16.1f} | {r['share_over_500']:5.1%} | "
              f"{r['share_over_2000']:6.1%} | {share}")  # fmt: skip
    print(json.dumps(result["all"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
