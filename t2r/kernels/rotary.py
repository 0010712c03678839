"""Rotary position embedding of q and k in one launch (inference): transformers' ``apply_rotary_pos_emb`` is ten
launches for the pair, the largest share of a hybrid layer's decoding step after the norms. Reference:
:func:`reference.rotary_reference`."""

from __future__ import annotations

import torch

try:  # a try block, so that transformers' trust_remote_code import check does not demand triton on CPU machines
    import triton
    import triton.language as tl
except ImportError as err:
    raise ImportError("the GSA Triton kernels need triton (pip install 't2r[cuda]')") from err

from .layout import next_pow2
from .pdl import _depend, pdl


@triton.jit
def _rotate_rows(x_ptr, o_ptr, c1, c2, s1, s2, tok, n, N: tl.constexpr, HALF: tl.constexpr):
    """Rows ``tok * n .. tok * n + n`` (heads) of x: x * cos + rotate_half(x) * sin, in fp32, stored once."""
    rh = tl.arange(0, N)[:, None]
    rd = tl.arange(0, HALF)[None, :]
    ptrs = (tok * n + rh) * (2 * HALF) + rd
    inside = rh < n
    x1 = tl.load(x_ptr + ptrs, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + ptrs + HALF, mask=inside, other=0.0).to(tl.float32)
    out = o_ptr.dtype.element_ty
    tl.store(o_ptr + ptrs, (x1 * c1 - x2 * s1).to(out), mask=inside)
    tl.store(o_ptr + ptrs + HALF, (x2 * c2 + x1 * s2).to(out), mask=inside)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, qo_ptr, ko_ptr, T, cs_batch, H, Hkv,
    HALF: tl.constexpr, BH: tl.constexpr, BHK: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One token (row of [B * T]): every query and key head, the token's cos / sin read once."""
    _depend(PDL)  # everything it reads comes from the step's earlier kernels
    tok = tl.program_id(0).to(tl.int64)
    rd = tl.arange(0, HALF)[None, :]
    cs = (tok // T) * cs_batch + (tok % T) * (2 * HALF) + rd
    c1 = tl.load(cos_ptr + cs).to(tl.float32)
    c2 = tl.load(cos_ptr + cs + HALF).to(tl.float32)
    s1 = tl.load(sin_ptr + cs).to(tl.float32)
    s2 = tl.load(sin_ptr + cs + HALF).to(tl.float32)
    _rotate_rows(q_ptr, qo_ptr, c1, c2, s1, s2, tok, H, BH, HALF)
    _rotate_rows(k_ptr, ko_ptr, c1, c2, s1, s2, tok, Hkv, BHK, HALF)


def rotary_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, T, H, D] and k [B, T, Hkv, D] rotated by cos / sin [B or 1, T, D]: the contract of
    :func:`reference.rotary_reference`."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if D % 2 or cos.shape[-2:] != (T, D) or cos.shape[0] not in (1, B) or sin.shape != cos.shape:
        raise ValueError(f"rotary: q {tuple(q.shape)} with cos {tuple(cos.shape)}, sin {tuple(sin.shape)}")
    q, k, cos, sin = (x.contiguous() for x in (q, k, cos, sin))
    qo = torch.empty(q.shape, dtype=torch.result_type(q, cos), device=q.device)
    ko = torch.empty(k.shape, dtype=torch.result_type(k, cos), device=k.device)
    if B * T:
        cs_batch = 0 if cos.shape[0] == 1 else T * D  # one table for every row, or one per row
        dependent = pdl(q.device)
        _rotary_kernel[(B * T,)](q, k, cos, sin, qo, ko, T, cs_batch, H, Hkv, HALF=D // 2, BH=next_pow2(H),
                                 BHK=next_pow2(Hkv), PDL=dependent, num_warps=4, launch_pdl=dependent)  # fmt: skip
    return qo, ko
