"""RMSNorm in one launch (inference): transformers' Llama-family RMSNorm, whose eager form is eight launches per call
and three calls per decoder layer, the largest share of a small model's decoding step (docs/benchmarks.md).
Reference: :func:`reference.rms_norm_reference`."""

from __future__ import annotations

import torch

try:  # a try block, so that transformers' trust_remote_code import check does not demand triton on CPU machines
    import triton
    import triton.language as tl
except ImportError as err:
    raise ImportError("the GSA Triton kernels need triton (pip install 't2r[cuda]')") from err


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, N, eps, BLOCK: tl.constexpr):
    """One row: fp32 mean of squares, the normalised row rounded to the input's dtype, times the weight (in the
    output's dtype, as ``weight * x.to(input_dtype)`` rounds)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=inside, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / N + eps)
    h = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, (w * h).to(y_ptr.dtype.element_ty), mask=inside)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, the contract of :func:`reference.rms_norm_reference`."""
    N = x.shape[-1]
    rows = x.reshape(-1, N).contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(N)
        _rms_norm_kernel[(rows.shape[0],)](rows, weight.contiguous(), out, N, float(eps), BLOCK=block,
                                           num_warps=min(max(block // 512, 1), 16))  # fmt: skip
    return out
