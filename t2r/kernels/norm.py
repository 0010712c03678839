"""RMSNorm in one launch: transformers' Llama-family RMSNorm, whose eager form is eight launches per call and three
calls per decoder layer, the largest share of a small model's decoding step (docs/benchmarks.md). Under autograd
(``TUNING.fused_norm_grad``, on by default) the forward keeps only its input and one fp32 statistic per row, where
the eager form keeps an fp32 copy of the normalised rows too, and the backward is one launch plus the weight
gradient's sum.
Reference: :func:`reference.rms_norm_reference`."""

from __future__ import annotations

import functools

import torch

try:  # a try block, so that transformers' trust_remote_code import check does not demand triton on CPU machines
    import triton
    import triton.language as tl
except ImportError as err:
    raise ImportError("the GSA Triton kernels need triton (pip install 't2r[cuda]')") from err

from .layout import cdiv, next_pow2, row_warps
from .pdl import _depend, pdl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, N, eps, BLOCK: tl.constexpr, STORE_RSTD: tl.constexpr,
                     PDL: tl.constexpr):  # fmt: skip
    """One row: fp32 mean of squares, the normalised row rounded to the input's dtype, times the weight (in the
    output's dtype, as ``weight * x.to(input_dtype)`` rounds); with ``STORE_RSTD`` the row's 1 / rms for a backward.
    ``PDL``: the weight is read before waiting on the kernel before (kernels/pdl.py)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < N
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    _depend(PDL)
    x = tl.load(x_ptr + row * N + cols, mask=inside, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / N + eps)
    h = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * N + cols, (w * h).to(y_ptr.dtype.element_ty), mask=inside)
    if STORE_RSTD:
        tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, R, N, per_program, BLOCK: tl.constexpr,
                         HAS_DW: tl.constexpr):  # fmt: skip
    """A run of ``per_program`` rows: dx = rstd * (dh - x_hat * mean(dh * x_hat)) with dh = w * dy (the rounding of
    x_hat to the input's dtype passes gradients through, as a cast does), and with ``HAS_DW`` the run's share of
    dw = sum over rows of dy * round(x_hat), one fp32 row per program (summed by the host)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < N
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid * per_program
    at = first.to(tl.int64) * N + cols
    for row in range(first, tl.minimum(first + per_program, R)):
        x = tl.load(x_ptr + at, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + at, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x * rstd
        dh = dy * w
        dx = rstd * (dh - x_hat * (tl.sum(dh * x_hat, axis=0) / N))
        tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=inside)
        if HAS_DW:
            dw += dy * x_hat.to(x_ptr.dtype.element_ty).to(tl.float32)
        at += N
    if HAS_DW:
        tl.store(dw_ptr + pid.to(tl.int64) * N + cols, dw, mask=inside)


def _forward(x: torch.Tensor, weight: torch.Tensor, eps: float, rstd: torch.Tensor | None) -> torch.Tensor:
    N = x.shape[-1]
    rows = x.reshape(-1, N)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rows.shape[0]:
        block = next_pow2(N)
        stats = out if rstd is None else rstd  # not written without a backward
        dependent = rstd is None and pdl(x.device)  # decoding's (inference) launches only
        _rms_norm_kernel[(rows.shape[0],)](rows, weight.contiguous(), out, stats, N, float(eps), BLOCK=block,
                                           STORE_RSTD=rstd is not None, PDL=dependent, num_warps=row_warps(block),
                                           launch_pdl=dependent)  # fmt: skip
    return out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension without autograd, the contract of :func:`reference.rms_norm_reference`."""
    return _forward(x.contiguous(), weight, eps, None)


@functools.cache
def _programs(device: torch.device) -> int:
    """Backward programs: a few per SM, each summing its rows' weight gradient in registers."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = x.contiguous()
        rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
        out = _forward(x, weight, eps, rstd)
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        N = x.shape[-1]
        R = x.numel() // N if N else 0
        dx = torch.empty_like(x)
        has_dw = ctx.needs_input_grad[1]
        programs = max(min(R, _programs(x.device)), 1)
        per_program = cdiv(R, programs)
        programs = cdiv(R, per_program) if R else 1
        dw = torch.empty(programs, N, dtype=torch.float32, device=x.device) if has_dw else dx  # a row per program
        if R:
            block = next_pow2(N)
            _rms_norm_bwd_kernel[(programs,)](dy.contiguous(), x, weight.contiguous(), rstd, dx, dw, R, N, per_program,
                                              BLOCK=block, HAS_DW=has_dw, num_warps=row_warps(block))  # fmt: skip
        return dx, (dw.sum(0).to(weight.dtype) if has_dw else None), None


def rms_norm_autograd_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension with its Triton backward (gradients for x and the weight); the contract of
    :func:`reference.rms_norm_reference`."""
    return _RMSNormFunction.apply(x, weight, float(eps))
