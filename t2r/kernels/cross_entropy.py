"""Next-token cross-entropy over a vocabulary in one launch each way (``TUNING.fused_ce``, on by default).

The chunked PyTorch loss (t2r.train.losses) casts each chunk of logits to fp32, takes its log-softmax, and under
autograd recomputes both in the backward: at SmolLM2-135M's 49k vocabulary and 16k tokens those were about 20 of
the step's 131 ms of GPU time (H200 profile, 2026-12-05: softmax forward twice, backward, and the casts). Here
one program per row streams the row's logits once forward (an online log-sum-exp in fp32, and the label's logit)
and once backward (softmax minus one-hot, times the row's weight, in the logits' dtype); nothing vocabulary-sized
is kept besides the logits themselves. Reference: :func:`reference.cross_entropy_sum_reference`.

Distillation's KL(teacher || student) the same way (``TUNING.fused_ce`` too): the chunked loss takes both
models' log-softmax in fp32 and copies the labelled rows out of both logits first (a boolean index, which also
waits for the device). Reference: :func:`reference.kd_sum_reference`.
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
def _row_scale(g_ptr, w_ptr, row, label, IGNORE: tl.constexpr, HAS_W: tl.constexpr):
    """A row's factor in the backward: the loss's gradient, read on the device (no wait for it on the host), times
    the row's weight; 0 for an ignored row."""
    scale = tl.load(g_ptr).to(tl.float32)
    if HAS_W:
        scale = scale * tl.load(w_ptr + row).to(tl.float32)
    return tl.where(label != IGNORE, scale, 0.0)


@triton.jit
def _ce_bwd_kernel(x_ptr, y_ptr, w_ptr, lse_ptr, g_ptr, dx_ptr, V, stride, IGNORE: tl.constexpr,
                   HAS_W: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One row's gradient: (softmax - one_hot(label)) * the loss's gradient * the row's weight; 0 if ignored."""
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    label = tl.load(y_ptr + row).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    scale = _row_scale(g_ptr, w_ptr, row, label, IGNORE, HAS_W)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < V
        x = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32)
        d = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
        tl.store(dx_ptr + row * V + cols, d.to(dx_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _kd_fwd_kernel(s_ptr, t_ptr, y_ptr, w_ptr, loss_ptr, lse_ptr, V, stride_s, stride_t, inv_temp,
                   IGNORE: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One row: KL(softmax(t / T) || softmax(s / T)) = sum_v p_t (t - s) / T - lse_t + lse_s, from online sums
    over the vocabulary (each lane's maxima, exp sums, and the teacher-weighted differences); its weighted value
    (0 if ignored) and both log-sum-exps (kept for the backward)."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(y_ptr + row)
    s_peak = tl.full([BLOCK], float("-inf"), tl.float32)
    t_peak = tl.full([BLOCK], float("-inf"), tl.float32)
    s_total = tl.zeros([BLOCK], tl.float32)
    t_total = tl.zeros([BLOCK], tl.float32)
    t_diff = tl.zeros([BLOCK], tl.float32)  # sum of exp(t - t_peak) * (t - s)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < V
        s = tl.load(s_ptr + row * stride_s + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_temp
        t = tl.load(t_ptr + row * stride_t + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_temp
        s_new, t_new = tl.maximum(s_peak, s), tl.maximum(t_peak, t)
        s_shift = tl.where(s_new == float("-inf"), 0.0, s_new)
        t_shift = tl.where(t_new == float("-inf"), 0.0, t_new)
        t_rescale = tl.exp(t_peak - t_shift)
        t_weight = tl.exp(t - t_shift)
        s_total = s_total * tl.exp(s_peak - s_shift) + tl.exp(s - s_shift)
        t_total = t_total * t_rescale + t_weight
        t_diff = t_diff * t_rescale + tl.where(t_weight == 0.0, 0.0, t_weight * (t - s))  # 0 * inf: no NaN
        s_peak, t_peak = s_new, t_new
    s_top, t_top = tl.max(s_peak, 0), tl.max(t_peak, 0)
    lse_s = s_top + tl.log(tl.sum(s_total * tl.exp(s_peak - s_top), 0))
    t_scale = tl.exp(t_peak - t_top)
    z_t = tl.sum(t_total * t_scale, 0)
    lse_t = t_top + tl.log(z_t)
    loss = tl.sum(t_diff * t_scale, 0) / z_t - lse_t + lse_s
    if HAS_W:
        loss = loss * tl.load(w_ptr + row).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(label != IGNORE, loss, 0.0))
    tl.store(lse_ptr + 2 * row, lse_s)
    tl.store(lse_ptr + 2 * row + 1, lse_t)


@triton.jit
def _kd_bwd_kernel(s_ptr, t_ptr, y_ptr, w_ptr, lse_ptr, g_ptr, ds_ptr, V, stride_s, stride_t, inv_temp,
                   IGNORE: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One row's gradient in the student's logits: (p_s - p_t) / T * the loss's gradient * the row's weight (the
    caller's T^2 is in the gradient it passes); 0 if ignored."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(y_ptr + row)
    lse_s = tl.load(lse_ptr + 2 * row)
    lse_t = tl.load(lse_ptr + 2 * row + 1)
    scale = _row_scale(g_ptr, w_ptr, row, label, IGNORE, HAS_W) * inv_temp
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < V
        s = tl.load(s_ptr + row * stride_s + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_temp
        t = tl.load(t_ptr + row * stride_t + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_temp
        d = (tl.exp(s - lse_s) - tl.exp(t - lse_t)) * scale
        tl.store(ds_ptr + row * V + cols, d.to(ds_ptr.dtype.element_ty), mask=inside)


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


class _DistillationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, weights, temperature: float, ignore_index: int):
        (s, stride_s), (t, stride_t) = flat_rows(student), flat_rows(teacher)
        rows, V = s.numel() // max(s.shape[-1], 1), s.shape[-1]
        loss = torch.empty(rows, dtype=torch.float32, device=s.device)
        lse = torch.empty(rows, 2, dtype=torch.float32, device=s.device)
        w = weights if weights is not None else loss  # not read
        args = dict(IGNORE=ignore_index, HAS_W=weights is not None, **_launch(s))
        if rows:
            _kd_fwd_kernel[(rows,)](s, t, labels, w, loss, lse, V, stride_s, stride_t, 1.0 / temperature, **args)
        ctx.save_for_backward(s, t, labels, w, lse)
        ctx.strides, ctx.temperature, ctx.args, ctx.shape = (stride_s, stride_t), temperature, args, student.shape
        return loss.sum() * temperature**2

    @staticmethod
    def backward(ctx, grad):
        s, t, labels, w, lse = ctx.saved_tensors
        rows, V = lse.shape[0], s.shape[-1]
        ds = torch.empty(ctx.shape, dtype=s.dtype, device=s.device)
        scaled = (grad.to(torch.float32) * ctx.temperature**2).reshape(1)
        if rows:
            _kd_bwd_kernel[(rows,)](s, t, labels, w, lse, scaled, ds, V, *ctx.strides, 1.0 / ctx.temperature,
                                    **ctx.args)  # fmt: skip
        return ds, None, None, None, None, None


def kd_sum_triton(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """Sum over rows of KL(softmax(teacher / T) || softmax(student / T)) times T^2 (each row times its weight;
    rows labelled ``ignore_index`` count 0), in fp32, differentiable in the student's logits: the contract of
    :func:`reference.kd_sum_reference`."""
    labels = labels.reshape(-1).contiguous()
    weights = None if weights is None else weights.reshape(-1).to(torch.float32).contiguous()
    return _DistillationFunction.apply(student, teacher.detach(), labels, weights, temperature, ignore_index)
