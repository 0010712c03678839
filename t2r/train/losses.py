"""Training losses: attention transfer (LoLCATs-style), next-token cross-entropy and teacher KD.

Every loss is returned as a *sum* over tokens together with the count it should be divided by; the trainer
divides by the count over the whole global batch (all micro-batches, all ranks), so gradient accumulation
and data parallelism give exactly the gradient of one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from t2r.kernels.dispatch import cross_entropy_sum, fused_cross_entropy, kd_sum
from t2r.train.data import IGNORE_INDEX
from t2r.train.teacher_attention import TransferCollector, attach_softmax_twins, transfer


def transfer_loss_sum(
    model: nn.Module, batch: dict, collector: TransferCollector | None = None, through_output: bool = False
) -> tuple[torch.Tensor, int]:
    """Sum over GSA layers and tokens of the per-token MSE between GSA and teacher attention outputs.

    Each layer sees the teacher's hidden states (its output passed on is the teacher's), so layers are trained
    independently on the exact inputs the teacher produces. Divide by (layers x tokens).
    ``through_output`` adds zero times one logit column, so the backward also runs through the model output:
    FSDP2 only schedules its unshard / gradient reduce-scatter hooks from there.
    """
    attach_softmax_twins(model)
    collector = collector or TransferCollector()
    collector.active = True
    with transfer(model, collector):
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    collector.active = False
    if collector.sq_sum is None:
        raise RuntimeError("attention transfer needs GSA layers, and the model has none")
    total = collector.sq_sum
    if through_output:
        total = total + 0.0 * out.logits[..., :1].float().sum()
    return total, collector.layers


def _sum_over_chunks(fn, tensors: list[torch.Tensor | None], chunk: int) -> torch.Tensor:
    """sum of fn(*row slices) over chunks of ``chunk`` rows. Under autograd each chunk is recomputed in the
    backward (activation checkpointing), so the fp32 vocab-sized intermediates of only one chunk are alive at a
    time, instead of every chunk's being kept for the backward (2 x rows x vocab x 4 bytes: 13 GB at 4 x 8k
    tokens with a 49k vocabulary). The losses draw no random numbers, so the recompute needs no saved RNG state
    (saving it reads the device's generator: host time per chunk, and not allowed under CUDA-graph capture)."""
    total = None
    for i in range(0, tensors[0].shape[0], chunk):
        parts = [None if x is None else x[i : i + chunk] for x in tensors]
        if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in parts):
            value = checkpoint(fn, *parts, use_reentrant=False, preserve_rng_state=False)
        else:
            value = fn(*parts)
        total = value if total is None else total + value
    return total if total is not None else tensors[0].new_zeros((), dtype=torch.float32)


def _ce_chunk(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return cross_entropy_sum(logits, labels, weights, IGNORE_INDEX)


def ce_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None, chunk: int = 2048
) -> torch.Tensor:
    """Next-token cross-entropy summed over labelled positions; ``weights`` (same shape as labels, optional)
    scales the loss of predicting each label, e.g. a recall row's answer. In fp32: the fused kernel's
    (``TUNING.fused_ce``) over every row at once, else over chunks of positions (see ``_sum_over_chunks``).

    The labels are shifted, not the logits: position t predicts label t + 1, and each row's last position gets
    ``IGNORE_INDEX``. The logits' rows stay a view (slicing off their last position copied them for batches of
    several rows)."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
    w = None if weights is None else F.pad(weights[:, 1:].to(torch.float32), (0, 1)).flatten()
    rows = logits.flatten(0, 1)
    if fused_cross_entropy(rows):
        return _ce_chunk(rows, shifted, w)
    return _sum_over_chunks(_ce_chunk, [rows, shifted, w], chunk)


def kd_loss_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    weights: torch.Tensor | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """KL(teacher || student) per labelled position, summed (weighted like ``ce_loss_sum``), scaled by T^2 as usual
    for distillation. In fp32: the fused kernels' (``TUNING.fused_ce``) over every row at once, else over chunks of
    the labelled positions (see ``_sum_over_chunks``)."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
    w = None if weights is None else F.pad(weights[:, 1:].to(torch.float32), (0, 1)).flatten()
    s = student_logits.flatten(0, 1)
    t = teacher_logits.flatten(0, 1).to(s.device)
    if fused_cross_entropy(s):
        return kd_sum(s, t, shifted, None if w is None else w.to(s.device), temperature, IGNORE_INDEX)
    mask = shifted.to(s.device) != IGNORE_INDEX
    s, t, y = s[mask], t[mask], shifted.to(s.device)[mask]
    w = None if w is None else w.to(s.device)[mask]

    def kl(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        return kd_sum(s, t, y, w, temperature, IGNORE_INDEX)

    return _sum_over_chunks(kl, [s, t, y, w], chunk)
