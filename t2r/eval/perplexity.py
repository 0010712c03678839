"""Held-out perplexity over fixed windows, split by target position: a recurrent student can match its teacher
early in a window and lose it later, which an average alone hides."""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from t2r.errors import T2RError


def token_stream(specs: list[str], tokenizer, text_field: str = "text") -> torch.Tensor:
    from t2r.train.data import load_documents, tokenize_documents

    docs = tokenize_documents(load_documents(specs, text_field), tokenizer, add_eos=True)
    return torch.tensor([t for ids in docs["input_ids"] for t in ids], dtype=torch.long)


POSITION_EDGES = (0, 64, 256, 1024, 2048, 4096, 8192, 16384)


def position_buckets(window: int) -> list[tuple[int, int]]:
    """[lo, hi) target-position ranges; the first 64 sit inside a W=64 window, the rest test the memory."""
    edges = [e for e in POSITION_EDGES if e < window - 1] + [window - 1]
    return list(itertools.pairwise(edges))


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, window: int, max_windows: int, batch: int = 4) -> dict:
    """Mean next-token NLL over the first ``max_windows`` non-overlapping windows (each scored from scratch),
    also split by position, because a recurrent student can match the teacher early and lose it later."""
    n = min(len(tokens) // window, max_windows)
    if n == 0:
        raise T2RError(f"the evaluation data has fewer than {window} tokens")
    rows = tokens[: n * window].view(n, window)
    device = next(model.parameters()).device
    per_position = torch.zeros(window - 1, dtype=torch.float64)
    for i in range(0, n, batch):
        ids = rows[i : i + batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids, use_cache=False).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:], reduction="none")
        per_position += loss.sum(0).double().cpu()
    count = n * (window - 1)
    nll = per_position.sum().item() / count
    by_position = {
        f"{lo}-{hi}": round(math.exp(min(per_position[lo:hi].mean().item() / n, 50.0)), 4)
        for lo, hi in position_buckets(window)
    }
    return {
        "window": window,
        "windows": n,
        "tokens": count,
        "nll": nll,
        "ppl": math.exp(min(nll, 50.0)),
        "ppl_by_position": by_position,
    }
