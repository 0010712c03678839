"""Chunked CE and KD: the same values and gradients as the one-shot losses, without keeping every chunk's fp32
vocab-sized intermediates for the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from t2r.train.data import IGNORE_INDEX
from t2r.train.losses import ce_loss_sum, kd_loss_sum

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the fused kernels: compiled, or Triton's interpreter


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
    rows, vocab = 2 * 257, 300  # every position (the last one's label is ignored: the labels are shifted)

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_fused_cross_entropy_matches_the_reference(monkeypatch, dtype, weighted):
    """The Triton kernels (Triton's interpreter on the CPU) against the PyTorch reference on fresh random rows:
    a vocabulary over several blocks with a partial last one, ignored rows, rows with -inf logits, large logits,
    a strided view of the rows; the summed loss and the logits' gradient (relative errors)."""
    pytest.importorskip("triton")
    from t2r.kernels import cross_entropy
    from t2r.kernels.cross_entropy import cross_entropy_sum_triton
    from t2r.kernels.reference import cross_entropy_sum_reference

    monkeypatch.setattr(cross_entropy, "MAX_BLOCK", 128)  # 300 columns: three blocks, the last partial
    wide = torch.randn(3, 19, 310) * 4
    wide[0, 3] += 80.0  # exp overflows fp32 without the running maximum
    wide[1, 2, :150] = float("-inf")  # a first block with no finite logit
    logits = wide[..., :300].to(DEVICE, dtype).requires_grad_()  # rows of stride 310: a view, not a copy
    labels = torch.randint(0, 300, (3, 19))
    labels[1, 2] = 200  # its label's logit is finite
    labels[2, 4:7] = IGNORE_INDEX
    labels = labels.to(DEVICE)
    weights = (torch.rand(3, 19) + 0.5).to(DEVICE) if weighted else None
    got = cross_entropy_sum_triton(logits, labels, weights, IGNORE_INDEX)
    (g_got,) = torch.autograd.grad(got * 0.7, logits)
    want = cross_entropy_sum_reference(logits, labels, weights, IGNORE_INDEX)
    (g_want,) = torch.autograd.grad(want * 0.7, logits)
    assert got.dtype == torch.float32 and g_got.dtype == dtype
    assert _rel(got, want) < 1e-6
    assert _rel(g_got, g_want) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert torch.all(g_got[2, 4:7] == 0)  # ignored rows


def test_fused_cross_entropy_in_the_training_loss(monkeypatch):
    """T2R_GSA_FUSED_CE=1: ce_loss_sum over every row at once with the kernels gives the chunked loss and its
    gradient (bf16 logits, weights, ignored labels, several rows)."""
    pytest.importorskip("triton")
    from t2r.kernels.cross_entropy import cross_entropy_sum_triton
    from t2r.kernels.tuning import TUNING

    logits, _, labels, weights = (x.to(DEVICE) for x in _inputs(B=3, T=40, V=70))
    logits = logits.detach().requires_grad_()
    want = ce_loss_sum(logits, labels, weights, chunk=16)
    (g_want,) = torch.autograd.grad(want, logits)
    monkeypatch.setattr(TUNING, "fused_ce", True)
    if DEVICE == "cpu":
        monkeypatch.setattr(TUNING, "impl", "triton")  # CPU tensors to the kernels (the interpreter)
    calls = []
    monkeypatch.setattr("t2r.kernels.dispatch.cross_entropy_sum_triton",
                        lambda *a: calls.append(1) or cross_entropy_sum_triton(*a))  # fmt: skip
    got = ce_loss_sum(logits, labels, weights, chunk=16)
    (g_got,) = torch.autograd.grad(got, logits)
    assert calls == [1]  # one call over every row
    assert _rel(got, want) < 1e-6 and _rel(g_got, g_want) < 1e-2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_distillation_matches_the_reference(monkeypatch, dtype, temperature):
    """The KL kernels against the PyTorch reference on fresh random rows: several vocabulary blocks with a partial
    last one, ignored rows, -inf logits on either side (a teacher's -inf is no term, not NaN), large logits,
    strided rows of both, weights; the scaled sum and the student's gradient (relative errors)."""
    pytest.importorskip("triton")
    from t2r.kernels import cross_entropy
    from t2r.kernels.cross_entropy import kd_sum_triton
    from t2r.kernels.reference import kd_sum_reference

    monkeypatch.setattr(cross_entropy, "MAX_BLOCK", 128)
    wide_s, wide_t = torch.randn(2, 23, 310) * 3, torch.randn(2, 23, 310) * 3
    wide_s[0, 1] += 70.0
    wide_t[1, 5, :140] = float("-inf")  # a teacher row whose first block has no finite logit
    wide_t[0, 7, 200:] = float("-inf")  # and one with -inf at the end
    wide_s[1, 9, 250:] = -1e4  # a student far below
    student = wide_s[..., :300].to(DEVICE, dtype).requires_grad_()
    teacher = wide_t[..., :300].to(DEVICE, dtype)
    labels = torch.randint(0, 300, (2, 23))
    labels[1, 10:14] = IGNORE_INDEX
    labels = labels.to(DEVICE)
    weights = (torch.rand(2, 23) + 0.5).to(DEVICE)
    got = kd_sum_triton(student, teacher, labels, weights, temperature, IGNORE_INDEX)
    (g_got,) = torch.autograd.grad(got * 1.3, student)
    want = kd_sum_reference(student, teacher, labels, weights, temperature, IGNORE_INDEX)
    (g_want,) = torch.autograd.grad(want * 1.3, student)
    assert torch.isfinite(got) and got.dtype == torch.float32 and g_got.dtype == dtype
    assert _rel(got, want) < 1e-5
    assert _rel(g_got, g_want) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.all(g_got[1, 10:14] == 0)


def test_fused_distillation_in_the_training_loss(monkeypatch):
    """T2R_GSA_FUSED_CE=1: kd_loss_sum over every row at once with the kernels (no selection of the labelled
    rows) gives the chunked loss and its gradient."""
    pytest.importorskip("triton")
    from t2r.kernels.tuning import TUNING

    logits, teacher, labels, weights = (x.to(DEVICE) for x in _inputs(B=3, T=40, V=70))
    logits = logits.detach().requires_grad_()
    want = kd_loss_sum(logits, teacher, labels, 2.0, weights, chunk=16)
    (g_want,) = torch.autograd.grad(want, logits)
    monkeypatch.setattr(TUNING, "fused_ce", True)
    if DEVICE == "cpu":
        monkeypatch.setattr(TUNING, "impl", "triton")
    got = kd_loss_sum(logits, teacher, labels, 2.0, weights, chunk=16)
    (g_got,) = torch.autograd.grad(got, logits)
    assert _rel(got, want) < 1e-6 and _rel(g_got, g_want) < 1e-2
