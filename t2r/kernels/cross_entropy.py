"""Next-token cross-entropy over a vocabulary in one launch each way (``TUNING.fused_ce``; off until timed).

The chunked PyTorch loss (t2r.train.losses) casts each chunk of logits to fp32, takes its log-softmax, and under
autograd recomputes both in the backward: at SmolLM2-135M's 49k vocabulary and 16k tokens those were about 20 of
the step's 131 ms of GPU time (H200 profile, 2026-12-05: softmax forward twice, backward, and the casts). Here
one program per row streams the row's logits once forward (an online log-sum-exp in fp32, and the label's logit)
and once backward (softmax minus one-hot, times the row's weight, in the logits' dtype); nothing vocabulary-sized
is kept besides the logits themselves. Reference: :func:`reference.cross_entropy_sum_reference`.
"""

from __future__ import annotations

import torch

try:  # a try block, so that transformers' trust_remote_code import check does not demand triton on CPU machines
    import triton
    import triton.language as tl
except ImportError as err:
    raise ImportError("the GSA Triton kernels need triton (pip install 't2r[cuda]')") from err

from .layout import flat_rows, next_pow2

MAX_BLOCK = 4096  # vocabulary columns per step of a row's program


@triton.jit
def _ce_fwd_kernel(x_ptr, y_ptr, w_ptr, loss_ptr, lse_ptr, V, stride, IGNORE: tl.constexpr, HAS_W: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
    """One row: its log-sum-exp (kept for the backward) and its weighted loss, lse - logit[label] (0 if ignored)."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    label = tl.load(y_ptr + row).to(tl.int64)
    peak = tl.full([BLOCK], float("-inf"), tl.float32)  # per lane: the largest logit so far, and the sum of
    total = tl.zeros([BLOCK], tl.float32)  # exp(logit - that largest)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new = tl.maximum(peak, x)
        shift = tl.where(new == float("-inf"), 0.0, new)  # a lane with no finite logit yet: exp(-inf) = 0, not NaN
        total = total * tl.exp(peak - shift) + tl.exp(x - shift)
        peak = new
    top = tl.max(peak, 0)
    lse = top + tl.log(tl.sum(total * tl.exp(peak - top), 0))
    kept = label != IGNORE
    picked = tl.load(base + tl.where(kept, label, 0), mask=kept, other=0.0).to(tl.float32)
    loss = lse - picked
    if HAS_W:
        loss = loss * tl.load(w_ptr + row).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _ce_bwd_kernel(x_ptr, y_ptr, w_ptr, lse_ptr, g_ptr, dx_ptr, V, stride, IGNORE: tl.constexpr,
                   HAS_W: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One row's gradient: (softmax - one_hot(label)) * the loss's gradient * the row's weight; 0 if ignored. The
    loss's gradient is read on the device (no wait for it on the host)."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    label = tl.load(y_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(g_ptr).to(tl.float32)
    if HAS_W:
        scale = scale * tl.load(w_ptr + row).to(tl.float32)
    scale = tl.where(label != IGNORE, scale, 0.0)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < V
        x = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32)
        d = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
        tl.store(dx_ptr + row * V + cols, d.to(dx_ptr.dtype.element_ty), mask=inside)


def _launch(logits: torch.Tensor) -> dict:
    V = logits.shape[-1]
    block = min(MAX_BLOCK, max(next_pow2(V), 16))
    return dict(BLOCK=block, num_warps=8 if block >= 2048 else 4)


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, weights, ignore_index: int):
        x, stride = flat_rows(logits)
        rows, V = x.numel() // max(x.shape[-1], 1), x.shape[-1]
        loss = torch.empty(rows, dtype=torch.float32, device=x.device)
        lse = torch.empty(rows, dtype=torch.float32, device=x.device)
        w = weights if weights is not None else loss  # not read
        if rows:
            _ce_fwd_kernel[(rows,)](x, labels, w, loss, lse, V, stride, IGNORE=ignore_index,
                                    HAS_W=weights is not None, **_launch(x))  # fmt: skip
        ctx.save_for_backward(x, labels, w, lse)
        ctx.stride, ctx.ignore_index, ctx.has_w, ctx.shape = stride, ignore_index, weights is not None, logits.shape
        return loss.sum()

    @staticmethod
    def backward(ctx, grad):
        x, labels, w, lse = ctx.saved_tensors
        rows, V = lse.shape[0], x.shape[-1]
        dx = torch.empty(ctx.shape, dtype=x.dtype, device=x.device)
        if rows:
            _ce_bwd_kernel[(rows,)](x, labels, w, lse, grad.to(torch.float32).reshape(1), dx, V, ctx.stride,
                                    IGNORE=ctx.ignore_index, HAS_W=ctx.has_w, **_launch(x))  # fmt: skip
        return dx, None, None, None


def cross_entropy_sum_triton(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None, ignore_index: int
) -> torch.Tensor:
    """Sum over rows of the (weighted) cross-entropy of ``logits`` [..., V] against ``labels`` [...] (rows labelled
    ``ignore_index`` count 0), in fp32, differentiable in the logits: the contract of
    :func:`reference.cross_entropy_sum_reference`."""
    labels = labels.reshape(-1).contiguous()
    weights = None if weights is None else weights.reshape(-1).to(torch.float32).contiguous()
    return _CrossEntropyFunction.apply(logits, labels, weights, ignore_index)
