"""A hybrid layer's decoding step past its GSA output, in one launch (inference): softmax attention of the new
token over the carried window, the sink and itself, the per-head mix with GSA's output, and the window shifted by
one token in place. PyTorch takes a dozen launches for it (concatenations, mask, SDPA, copies, mix); this takes two
(the kernel, and the copy of the shifted valid flags that its programs share). Reference:
:func:`reference.window_decode_reference`."""

from __future__ import annotations

import torch

try:  # a try block, so that transformers' trust_remote_code import check does not demand triton on CPU machines
    import triton
    import triton.language as tl
except ImportError as err:
    raise ImportError("the GSA Triton kernels need triton (pip install 't2r[cuda]')") from err

from .layout import next_pow2
from .reference import Window


@triton.jit
def _window_step_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, pvalid_ptr, keep_ptr, sk_ptr, sv_ptr, o_ptr, mix_ptr, out_ptr, nvalid_ptr,
    scale, P, stride_kb, stride_kt, stride_vb, stride_vt, stride_valid, keep_stride, mix_stride,
    H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, GP: tl.constexpr, BW: tl.constexpr,
    HAS_SINK: tl.constexpr, HAS_KEEP: tl.constexpr,
):  # fmt: skip
    """Program (row n, KV head h): its query heads' online softmax over the sink, the P carried slots (blocks of
    BW) and the new token; the mix; then the shift of its head's slots. The row's valid flags, which every KV
    head's program reads, are shifted into ``nvalid`` (by h = 0), not in place."""
    G: tl.constexpr = H // Hkv
    i_nh = tl.program_id(0).to(tl.int64)
    n = i_nh // Hkv
    h = i_nh % Hkv
    rg = tl.arange(0, GP)
    rd = tl.arange(0, D)
    heads = n * H + h * G + rg  # rows of q, o and out
    in_group = rg < G
    q = tl.load(q_ptr + heads[:, None] * D + rd[None, :], mask=in_group[:, None], other=0.0).to(tl.float32)
    k_new = tl.load(k_ptr + i_nh * D + rd)
    v_new = tl.load(v_ptr + i_nh * D + rd)
    # the new token: always in (a padding query sees itself)
    m = tl.sum(q * k_new.to(tl.float32)[None, :], axis=1) * scale
    den = tl.full([GP], 1.0, tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32) + v_new.to(tl.float32)[None, :]
    if HAS_SINK:
        sk = tl.load(sk_ptr + h * D + rd).to(tl.float32)
        sv = tl.load(sv_ptr + h * D + rd).to(tl.float32)
        s_sink = tl.sum(q * sk[None, :], axis=1) * scale
        m_sink = tl.maximum(m, s_sink)
        a_sink, p_sink = tl.exp(m - m_sink), tl.exp(s_sink - m_sink)
        acc = acc * a_sink[:, None] + p_sink[:, None] * sv[None, :]
        den = den * a_sink + p_sink
        m = m_sink
    kbase = pk_ptr + n * stride_kb + h * D
    vbase = pv_ptr + n * stride_vb + h * D
    for t0 in range(0, P, BW):
        rt = t0 + tl.arange(0, BW)
        inside = rt < P
        real = tl.load(pvalid_ptr + n * stride_valid + rt, mask=inside, other=0) != 0
        kb = tl.load(kbase + rt[:, None] * stride_kt + rd[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * kb[None, :, :], axis=2) * scale  # [GP, BW]
        s = tl.where(real[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        a = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        vb = tl.load(vbase + rt[:, None] * stride_vt + rd[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
        acc = acc * a[:, None] + tl.sum(p[:, :, None] * vb[None, :, :], axis=1)
        den = den * a + tl.sum(p, axis=1)
        m = m_new
    o_win = acc / den[:, None]
    o = tl.load(o_ptr + heads[:, None] * D + rd[None, :], mask=in_group[:, None], other=0.0).to(tl.float32)
    w = tl.sigmoid(tl.load(mix_ptr + n * mix_stride + h * G + rg, mask=in_group, other=0.0).to(tl.float32))
    out = o + w[:, None] * (o_win - o)
    tl.store(out_ptr + heads[:, None] * D + rd[None, :], out.to(out_ptr.dtype.element_ty), mask=in_group[:, None])
    # The shift: slot t takes slot t + 1, the last slot the new token. Every slot of this head was read above, by
    # this program only; a block's loads and its stores, which overwrite the slot before it, are ordered by a
    # barrier on either side.
    is_real = True
    if HAS_KEEP:
        is_real = tl.load(keep_ptr + n * keep_stride) != 0
    for t0 in range(0, P, BW):
        rt = t0 + tl.arange(0, BW)
        inside = rt < P
        src = rt + 1
        old = src < P
        k_old = tl.load(kbase + src[:, None] * stride_kt + rd[None, :], mask=old[:, None], other=0.0)
        v_old = tl.load(vbase + src[:, None] * stride_vt + rd[None, :], mask=old[:, None], other=0.0)
        flags = tl.load(pvalid_ptr + n * stride_valid + src, mask=old, other=0)
        tl.debug_barrier()
        tl.store(kbase + rt[:, None] * stride_kt + rd[None, :], tl.where(old[:, None], k_old, k_new[None, :]),
                 mask=inside[:, None])  # fmt: skip
        tl.store(vbase + rt[:, None] * stride_vt + rd[None, :], tl.where(old[:, None], v_old, v_new[None, :]),
                 mask=inside[:, None])  # fmt: skip
        if h == 0:
            tl.store(nvalid_ptr + n * P + rt, tl.where(old, flags != 0, is_real), mask=inside)
        tl.debug_barrier()


def window_decode_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: Window, keep: torch.Tensor | None,
    sink: tuple[torch.Tensor, torch.Tensor] | None, scale: float, o: torch.Tensor, mix_logits: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """The contract of :func:`reference.window_decode_reference`: q [B, 1, H, D], k / v [B, 1, Hkv, D], ``past``
    updated in place (its last two dims contiguous), ``keep`` [B, 1] or None, ``o`` [B, 1, H, D], ``mix_logits``
    [H] or [B, 1, H]."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    past_k, past_v, past_valid = past
    P = past_k.shape[1]
    if T != 1 or P < 1 or past_valid.dtype != torch.bool:
        raise ValueError("the fused window step takes one token per row on top of a carried window (bool flags)")
    if past_k.stride()[2:] != (D, 1) or past_v.stride()[2:] != (D, 1) or past_valid.stride(1) != 1:
        raise ValueError("the fused window step needs the window's heads and dims contiguous")
    q, k, v, o = (x.contiguous() for x in (q, k, v, o))
    mix = mix_logits.float().contiguous()
    sk, sv = (k, v) if sink is None else (sink[0].to(k.dtype).contiguous(), sink[1].to(v.dtype).contiguous())
    keep_col = None if keep is None else keep[:, -1]
    out, new_valid = torch.empty_like(o), torch.empty_like(past_valid, memory_format=torch.contiguous_format)
    _window_step_kernel[(B * Hkv,)](
        q, k, v, past_k, past_v, past_valid, q if keep_col is None else keep_col, sk, sv, o, mix, out, new_valid,
        float(scale), P,
        past_k.stride(0), past_k.stride(1), past_v.stride(0), past_v.stride(1), past_valid.stride(0),
        0 if keep_col is None else keep_col.stride(0), H if mix.dim() > 1 else 0, H=H, Hkv=Hkv, D=D,
        GP=next_pow2(H // Hkv), BW=32, HAS_SINK=sink is not None, HAS_KEEP=keep_col is not None,
        num_warps=4,
    )  # fmt: skip
    past_valid.copy_(new_valid)
    return out
