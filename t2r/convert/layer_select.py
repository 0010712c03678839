"""Which of a teacher's layers to keep as softmax attention in a hybrid, read from the teacher's own attention.

Windowed hybrids lose to the teacher mostly beyond their window, and keeping the layers that hold the teacher's
retrieval heads (heads whose last query lands on a passkey's tokens) as full attention closes most of that gap
(docs/results.md).
``t2r convert --full-attention-layers auto:N`` keeps the N layers ranked first here; benchmarks/long_range_layers.py
prints the whole profile, with how far each layer reaches on real text.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from t2r.prompts import passkey_prompts

SINK = 4  # the first tokens, attention sinks: far away but carrying no content
SELECT_SEED = 1  # passkey prompts for selection differ from t2r eval's (seed 0)


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
    """Forward hooks on every self-attention module that hand its attention weights to ``fn(layer, weights)``
    (the model must run with eager attention, so that the weights exist)."""

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
def far_profile(model, ids: torch.Tensor, window: int) -> dict[int, torch.Tensor]:
    """Per layer, each head's share of attention beyond the last ``window`` tokens on ids [1, T] of real text."""
    tap = AttentionTap(model)
    far: dict[int, torch.Tensor] = {}
    try:
        tap.fn = lambda i, w: far.__setitem__(i, far_share(w, window))
        model(input_ids=ids.to(model.device))
    finally:
        tap.close()
    return far


@torch.no_grad()
def retrieval_profile(model, tokenizer, context: int, trials: int, seed: int = SELECT_SEED,
                      progress: bool = False) -> dict[int, torch.Tensor]:  # fmt: skip
    """Per layer, each head's attention from the last token of a passkey prompt onto the key, averaged over
    ``trials`` prompts of about ``context`` tokens with the key at spread depths."""
    tap = AttentionTap(model)
    keys: dict[int, list[torch.Tensor]] = {}
    try:
        prompts = passkey_prompts(tokenizer, context, trials, seed)
        for prompt, key, _depth in tqdm(prompts, desc="retrieval heads", unit="prompt", disable=not progress):
            positions = key_token_positions(tokenizer, prompt, key)
            tap.fn = lambda i, w, p=positions: keys.setdefault(i, []).append(key_share(w, p).cpu())
            model(input_ids=tokenizer(prompt, return_tensors="pt").input_ids.to(model.device))
    finally:
        tap.close()
    return {i: torch.stack(v).mean(0) for i, v in keys.items()}


def layer_table(retrieval: dict[int, torch.Tensor], far: dict[int, torch.Tensor] | None = None) -> list[dict]:
    """One row per layer: its strongest and mean head for each measure (rounded, for JSON)."""
    rows = []
    for i in sorted(retrieval):
        row = {"layer": i}
        if far is not None:
            row |= {"far_share_max": round(far[i].max().item(), 4), "far_share_mean": round(far[i].mean().item(), 4)}
        row |= {"key_share_max": round(retrieval[i].max().item(), 4),
                "key_share_mean": round(retrieval[i].mean().item(), 4)}  # fmt: skip
        rows.append(row)
    return rows


def rank_layers(rows: list[dict]) -> list[int]:
    """Layers by their strongest retrieval head, then by their strongest far-reaching head (when measured)."""
    return [r["layer"] for r in sorted(rows, key=lambda r: (-r["key_share_max"], -r.get("far_share_max", 0.0)))]


def select_full_attention_layers(path, n: int, context: int = 1024, trials: int = 8,
                                 progress: bool = True) -> tuple[list[int], dict]:  # fmt: skip
    """The ``n`` layers of the teacher at ``path`` (an HF directory) with the strongest retrieval heads, and the
    profile behind the choice (for conversion.json). Runs the teacher with eager attention, on CUDA if there is
    one."""
    from t2r.teacher import load_eager_teacher

    model, tokenizer = load_eager_teacher(str(path))
    if torch.cuda.is_available():
        model = model.to("cuda")
    rows = layer_table(retrieval_profile(model, tokenizer, context, trials, progress=progress))
    ranked = rank_layers(rows)
    chosen = sorted(ranked[:n])
    profile = {"method": "retrieval heads on passkey prompts", "context": context, "trials": trials,
               "seed": SELECT_SEED, "ranked": ranked, "chosen": chosen, "layers": rows}  # fmt: skip
    return chosen, profile
