"""Chunked CE and KD: the same values and gradients as the one-shot losses, without keeping every chunk's fp32
vocab-sized intermediates for the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from t2r.train.data import IGNORE_INDEX
from t2r.train.losses import ce_loss_sum, kd_loss_sum


def _inputs(B=2, T=33, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g).to(torch.bfloat16).requires_grad_()
    teacher = torch.randn(B, T, V, generator=g).to(torch.bfloat16)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 5:9] = IGNORE_INDEX
    weights = torch.rand(B, T, generator=g) + 0.5
    return logits, teacher, labels, weights


def _plain_ce(logits, labels, weights):
    per = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none")  # fmt: skip
    return (per * weights[:, 1:].flatten()).sum()


def _plain_kd(logits, teacher, labels, weights, temperature):
    mask = labels[:, 1:].flatten() != IGNORE_INDEX
    s = F.log_softmax(logits[:, :-1].flatten(0, 1)[mask].float() / temperature, -1)
    t = F.log_softmax(teacher[:, :-1].flatten(0, 1)[mask].float() / temperature, -1)
    per = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)
    return (per * weights[:, 1:].flatten()[mask]).sum() * temperature**2


def _rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_chunked_losses_match_the_one_shot_ones(chunk):
    logits, teacher, labels, weights = _inputs()
    for ours, plain in (
        (lambda x: ce_loss_sum(x, labels, weights, chunk=chunk), lambda x: _plain_ce(x, labels, weights)),
        (lambda x: kd_loss_sum(x, teacher, labels, 2.0, weights, chunk=chunk),
         lambda x: _plain_kd(x, teacher, labels, weights, 2.0)),
    ):  # fmt: skip
        a = ours(logits)
        (ga,) = torch.autograd.grad(a, logits)
        b = plain(logits)
        (gb,) = torch.autograd.grad(b, logits)
        assert _rel(a, b) < 1e-6 and _rel(ga, gb) < 1e-2  # the gradients are bf16, like the logits
        assert ga.abs().sum() > 0


def test_backward_keeps_no_fp32_vocab_tensors():
    """Tensors the forward saves for the backward, in bytes: the one-shot CE keeps fp32 [rows, vocab]
    intermediates; the chunked one keeps only the bf16 inputs (each chunk is recomputed in the backward)."""
    logits, _, labels, weights = _inputs(T=257, V=300)
    rows, vocab = 2 * 256, 300

    def saved_bytes(fn):
        total = 0

        def pack(x):
            nonlocal total
            total += x.numel() * x.element_size()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            loss = fn(logits)
        loss.backward()  # and the backward works from what was kept
        assert logits.grad.abs().sum() > 0
        logits.grad = None
        return total

    assert saved_bytes(lambda x: _plain_ce(x, labels, weights)) >= rows * vocab * 4  # fp32 log-probabilities
    # The bf16 rows themselves, their labels (int64) and weights (fp32): nothing vocab-sized in fp32.
    assert saved_bytes(lambda x: ce_loss_sum(x, labels, weights, chunk=64)) <= rows * (vocab * 2 + 8 + 4)
