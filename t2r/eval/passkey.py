"""Passkey retrieval: greedy answers to prompts with a key hidden at spread depths (t2r.prompts)."""

from __future__ import annotations

import torch
from torch import nn

from t2r.prompts import passkey_prompts

MIN_PASSKEY_CONTEXT = 128  # the passkey prompt's fixed text alone is 67 SmolLM2 tokens, one filler 25


@torch.no_grad()
def passkey_accuracy(model: nn.Module, tokenizer, context: int, trials: int, seed: int = 0, batch: int = 8) -> dict:
    prompts = passkey_prompts(tokenizer, context, trials, seed)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    hits, lengths, answers = [], [], []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        enc = tokenizer([p for p, _, _ in chunk], return_tensors="pt", padding=True).to(device)
        lengths += enc.attention_mask.sum(1).tolist()
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
        hits += [key in text for text, (_, key, _) in zip(texts, chunk, strict=True)]
        answers += texts
    by_depth = {}
    for hit, (_, _, depth) in zip(hits, prompts, strict=True):
        by_depth.setdefault(round(depth, 1), []).append(hit)
    return {
        "context": context,
        "trials": trials,
        "accuracy": sum(hits) / len(hits),
        "mean_prompt_tokens": round(sum(lengths) / len(lengths)),
        "by_depth": {str(d): sum(v) / len(v) for d, v in sorted(by_depth.items())},
        # What a model says instead of the key (wrong digits, the filler, nothing) tells where retrieval fails.
        "samples": [
            {"depth": round(depth, 3), "key": key, "answer": answer}
            for answer, (_, key, depth) in list(zip(answers, prompts, strict=True))[:: max(1, len(prompts) // 8)]
        ],
    }
