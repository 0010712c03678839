"""silu(gate) * up in one launch each way (``TUNING.fused_mlp``, on by default): an MLP's activation, two launches
forward and three backward in PyTorch, which also keeps silu(gate) for the backward; here the backward keeps only
gate and up (views of one merged projection or two tensors). Reference: :func:`reference.swiglu_reference`."""

from __future__ import annotations

import torch

try:  # a try block, so that transformers' trust_remote_code import check does not demand triton on CPU machines
    import triton
    import triton.language as tl
except ImportError as err:
    raise ImportError("the GSA Triton kernels need triton (pip install 't2r[cuda]')") from err

from .layout import cdiv, flat_rows

BLOCK = 1024  # columns per program


@triton.jit
def _swiglu_kernel(g_ptr, u_ptr, h_ptr, sg, su, N, BLOCK: tl.constexpr):
    """One row's block of columns: silu(gate) rounded to the inputs' dtype (as PyTorch's silu returns it), times
    up, rounded again."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < N
    g = tl.load(g_ptr + row * sg + cols, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * su + cols, mask=inside, other=0.0).to(tl.float32)
    act = (g * tl.sigmoid(g)).to(h_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + row * N + cols, (act * u).to(h_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _swiglu_bwd_kernel(g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, sg, su, N, BLOCK: tl.constexpr):
    """dgate = dh * up * silu'(gate), dup = dh * silu(gate), in fp32 from the saved inputs."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < N
    g = tl.load(g_ptr + row * sg + cols, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * su + cols, mask=inside, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + row * N + cols, mask=inside, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(dg_ptr + row * N + cols, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty), mask=inside)
    tl.store(du_ptr + row * N + cols, (dh * g * sig).to(du_ptr.dtype.element_ty), mask=inside)


def _forward(gate: torch.Tensor, up: torch.Tensor):
    (g, sg), (u, su) = flat_rows(gate), flat_rows(up)
    N = g.shape[-1]
    h = torch.empty(g.shape, dtype=torch.promote_types(g.dtype, u.dtype), device=g.device)
    rows = h.numel() // N if N else 0
    if rows:
        _swiglu_kernel[(rows, cdiv(N, BLOCK))](g, u, h, sg, su, N, BLOCK=BLOCK, num_warps=4)
    return h, (g, u), (sg, su)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        h, inputs, strides = _forward(gate, up)
        ctx.save_for_backward(*inputs)
        ctx.strides = strides
        return h

    @staticmethod
    def backward(ctx, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, u = ctx.saved_tensors
        N = g.shape[-1]
        dg, du = (
            torch.empty(g.shape, dtype=g.dtype, device=g.device),
            torch.empty(u.shape, dtype=u.dtype, device=u.device),
        )
        rows = dg.numel() // N if N else 0
        if rows:
            _swiglu_bwd_kernel[(rows, cdiv(N, BLOCK))](g, u, dh.contiguous(), dg, du, *ctx.strides, N,
                                                              BLOCK=BLOCK, num_warps=4)  # fmt: skip
        return dg, du


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over [..., N] tensors of one shape, differentiable; the contract of
    :func:`reference.swiglu_reference`."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLUFunction.apply(gate, up)
    return _forward(gate, up)[0]
