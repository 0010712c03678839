"""Initial slot gates of a GSA layer: the new ``f_proj`` weight (random, or pooled from the teacher's keys) and the
optional per-slot bias that spreads the memories' half-lives."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def init_gate(config, layer_idx: int, k_proj: torch.Tensor | None, gate_init: str, seed: int) -> torch.Tensor:
    """f_proj weight [Hkv * M, hidden] for one layer.

    random: N(0, 0.02), as in the GSA paper's code. kproj: each KV head's key rows average-pooled onto the M
    slots (adaptive pooling: groups of rows when head_dim > M, repeated rows when head_dim < M), so gates start
    as pooled keys of the same token, as Liger does.
    """
    Hkv, M, D = config.num_key_value_heads, config.gsa_num_slots, config.hidden_size
    if gate_init == "random":
        gen = torch.Generator().manual_seed(seed * 100_003 + layer_idx)
        return torch.randn(Hkv * M, D, generator=gen) * config.initializer_range
    head_dim = k_proj.shape[0] // Hkv
    rows = k_proj.float().reshape(Hkv, head_dim, D).permute(0, 2, 1)  # [Hkv, D, head_dim]
    return F.adaptive_avg_pool1d(rows, M).permute(0, 2, 1).reshape(Hkv * M, D)


def init_gate_bias(config, max_half_life: float) -> torch.Tensor:
    """f_proj bias [Hkv * M]: slot m of every KV head gets a memory half-life (at zero gate input) log-spaced
    from the normalizer's own (bias 0: logsigmoid(0) / n = -ln 2 / n, so n tokens) up to ``max_half_life``.

    Why: bias-free gates start near f = 0, so every slot starts at that short half-life and nothing crosses a long
    context until training moves every gate (docs/results.md); spread half-lives, like the fixed multi-scale decays
    of retention-style models, give the memory slow slots from the start.
    """
    n, M = config.gsa_gate_logit_normalizer, config.gsa_num_slots
    half_lives = torch.logspace(math.log10(n), math.log10(max_half_life), M, dtype=torch.float64)
    keep = torch.exp2(-n / half_lives)  # sigmoid(bias): logsigmoid(bias) / n = -ln 2 / half-life
    return torch.logit(keep).float().repeat(config.num_key_value_heads)
