"""A hybrid layer's decoding step past its GSA output, in two launches (inference): softmax attention of the new
token over its ring of carried tokens (the sink in slot 0) and itself, the per-head mix with GSA's output, and the
new token written over its row's oldest slot. PyTorch takes about a dozen launches for it (scatters, mask, SDPA,
the head's move, mix). Reference: :func:`reference.window_decode_reference`.

The ring's slots are split between programs, flash-decoding style, so that one sequence's three KV heads still
fill the device: ``_window_part_kernel`` reduces each slot range to a partial softmax (running max, denominator,
weighted values), and ``_window_merge_kernel`` merges them with the new token's own term, mixes, and writes. The
ring is only read by the first launch and only written by the second, so no program waits on another."""

from __future__ import annotations

import re

import torch

try:  # a try block, so that transformers' trust_remote_code import check does not demand triton on CPU machines
    import triton
    import triton.language as tl
except ImportError as err:
    raise ImportError("the GSA Triton kernels need triton (pip install 't2r[cuda]')") from err

from .chunk import operand_precision
from .chunk_jit import _mm
from .layout import cdiv, multiprocessors, next_pow2
from .pdl import _depend, pdl
from .reference import Window

# Slots per loaded tile and warps per program of the part kernel (benchmarks/gpu/window_tiles.py sweeps them).
WINDOW_BLOCK = 32
WINDOW_WARPS = 4


@triton.jit
def _group_queries(q_ptr, i_nh, H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, GP: tl.constexpr):
    """Program (row n, KV head h)'s query heads: q [GP, D] in fp32 (0 past the group), their rows of q / o / out,
    and which of the GP lanes are heads."""
    G: tl.constexpr = H // Hkv
    rg = tl.arange(0, GP)
    heads = (i_nh // Hkv) * H + (i_nh % Hkv) * G + rg
    in_group = rg < G
    q = tl.load(q_ptr + heads[:, None] * D + tl.arange(0, D)[None, :], mask=in_group[:, None], other=0.0)
    return q.to(tl.float32), heads, in_group


@triton.jit
def _window_part_kernel(
    q_ptr, pk_ptr, pv_ptr, pvalid_ptr, head_ptr, m_ptr, den_ptr, acc_ptr, slot_ptr,
    scale, S, CH, stride_kb, stride_kt, stride_vb, stride_vt, stride_valid,
    H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, GP: tl.constexpr, QP: tl.constexpr,
    BW: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (row n, KV head h, part p): its query heads' softmax over the ring's slots [p CH, (p + 1) CH), the
    valid ones other than the new token's (its old contents are ``window`` tokens back, out of reach). A part with
    none leaves max -inf, denominator and values 0. Both products are tl.dot (queries padded to QP rows, the head
    dim to DP: 16 each, its least); [group, slots, dims] broadcast products took 23 us a layer at SmolLM2's 16 rows
    (H100 profile, 2026-12-05), about 12x the time to read the ring. ``PDL``: launched as a programmatic dependent
    (kernels/pdl.py), waiting before its first read."""
    _depend(PDL)
    i_nh = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    parts = tl.num_programs(1)
    n = i_nh // Hkv
    h = i_nh % Hkv
    G: tl.constexpr = H // Hkv
    rq = tl.arange(0, QP)
    rd = tl.arange(0, DP)
    dims = rd < D
    heads = (i_nh // Hkv) * H + (i_nh % Hkv) * G + rq
    q = tl.load(q_ptr + heads[:, None] * D + rd[None, :], mask=(rq < G)[:, None] & dims[None, :], other=0.0)
    at = tl.load(head_ptr + n)
    if part == 0:
        tl.store(slot_ptr + i_nh, at)  # for the merge, whose programs of row n must not race on the head's move
    m = tl.full([QP], float("-inf"), tl.float32)
    den = tl.zeros([QP], dtype=tl.float32)
    acc = tl.zeros([QP, DP], dtype=tl.float32)
    kbase = pk_ptr + n * stride_kb + h * D
    vbase = pv_ptr + n * stride_vb + h * D
    lo = part * CH
    hi = tl.minimum(lo + CH, S)
    for t0 in range(lo, hi, BW):
        rt = t0 + tl.arange(0, BW)
        inside = rt < hi
        real = (tl.load(pvalid_ptr + n * stride_valid + rt, mask=inside, other=0) != 0) & (rt != at) & inside
        kb = tl.load(kbase + rt[:, None] * stride_kt + rd[None, :], mask=real[:, None] & dims[None, :], other=0.0)
        vb = tl.load(vbase + rt[:, None] * stride_vt + rd[None, :], mask=real[:, None] & dims[None, :], other=0.0)
        s = _mm(q, tl.trans(kb), PREC) * scale  # [QP, BW]
        s = tl.where(real[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet: keep every term 0, not NaN
        a = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        acc = acc * a[:, None] + _mm(p, vb, PREC)
        den = den * a + tl.sum(p, axis=1)
        m = m_new
    at_part = (i_nh * parts + part) * GP + rq
    first = rq < GP
    tl.store(m_ptr + at_part, m, mask=first)
    tl.store(den_ptr + at_part, den, mask=first)
    tl.store(acc_ptr + at_part[:, None] * D + rd[None, :], acc, mask=first[:, None] & dims[None, :])


@triton.jit
def _window_merge_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, pvalid_ptr, head_ptr, keep_ptr, m_ptr, den_ptr, acc_ptr, slot_ptr, o_ptr,
    mix_ptr, proj_ptr, hidden_ptr, out_ptr,
    scale, W, PARTS, stride_kb, stride_kt, stride_vb, stride_vt, stride_valid, keep_stride, mix_stride, hidden_stride,
    C, H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, GP: tl.constexpr, HAS_KEEP: tl.constexpr,
    HAS_PROJ: tl.constexpr, RB: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (row n, KV head h): the new token's term (always in: a padding query sees itself) merged with the
    parts', the mix (with the router's read of the hidden state: no launch of its own), the output; then the new
    token written into its head's slot, and (h = 0) the row's valid flag and head moved on. ``PDL``: as the part
    kernel's."""
    _depend(PDL)
    G: tl.constexpr = H // Hkv
    i_nh = tl.program_id(0).to(tl.int64)
    n = i_nh // Hkv
    h = i_nh % Hkv
    rg = tl.arange(0, GP)
    rd = tl.arange(0, D)
    q, heads, in_group = _group_queries(q_ptr, i_nh, H, Hkv, D, GP)
    k_new = tl.load(k_ptr + i_nh * D + rd)
    v_new = tl.load(v_ptr + i_nh * D + rd)
    m = tl.sum(q * k_new.to(tl.float32)[None, :], axis=1) * scale
    den = tl.full([GP], 1.0, tl.float32)
    acc = tl.zeros([GP, D], dtype=tl.float32) + v_new.to(tl.float32)[None, :]
    for part in range(0, PARTS):
        at_part = (i_nh * PARTS + part) * GP + rg
        pm = tl.load(m_ptr + at_part)
        m_new = tl.maximum(m, pm)  # m is finite (the new token's), so m_new is
        a = tl.exp(m - m_new)
        b = tl.exp(pm - m_new)
        acc = acc * a[:, None] + b[:, None] * tl.load(acc_ptr + at_part[:, None] * D + rd[None, :])
        den = den * a + b * tl.load(den_ptr + at_part)
        m = m_new
    o_win = acc / den[:, None]
    o = tl.load(o_ptr + heads[:, None] * D + rd[None, :], mask=in_group[:, None], other=0.0).to(tl.float32)
    logit = tl.load(mix_ptr + n * mix_stride + h * G + rg, mask=in_group, other=0.0).to(tl.float32)
    if HAS_PROJ:  # the router's read of the token's hidden state, its group's rows of the weight
        read = tl.zeros([GP], dtype=tl.float32)
        for c0 in range(0, C, RB):
            rc = c0 + tl.arange(0, RB)
            x = tl.load(hidden_ptr + n * hidden_stride + rc, mask=rc < C, other=0.0).to(tl.float32)
            wp = tl.load(proj_ptr + (h * G + rg)[:, None] * C + rc[None, :], mask=in_group[:, None] & (rc < C)[None, :],
                         other=0.0)  # fmt: skip
            read += tl.sum(wp.to(tl.float32) * x[None, :], axis=1)
        logit += read
    w = tl.sigmoid(logit)
    out = o + w[:, None] * (o_win - o)
    tl.store(out_ptr + heads[:, None] * D + rd[None, :], out.to(out_ptr.dtype.element_ty), mask=in_group[:, None])
    at = tl.load(slot_ptr + i_nh)
    tl.store(pk_ptr + n * stride_kb + at * stride_kt + h * D + rd, k_new.to(pk_ptr.dtype.element_ty))
    tl.store(pv_ptr + n * stride_vb + at * stride_vt + h * D + rd, v_new.to(pv_ptr.dtype.element_ty))
    if h == 0:
        is_real = True
        if HAS_KEEP:
            is_real = tl.load(keep_ptr + n * keep_stride) != 0
        tl.store(pvalid_ptr + n * stride_valid + at, is_real)
        tl.store(head_ptr + n, at % W + 1)


def window_parts(rows: int, slots: int, sms: int, block: int = 32) -> int:
    """Programs per (row, KV head): enough for two per multiprocessor, at least one tile of ``block`` slots each."""
    return max(1, min(cdiv(slots, block), cdiv(2 * sms, rows)))


def window_decode_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: Window, keep: torch.Tensor | None, scale: float,
    o: torch.Tensor, mix_logits: torch.Tensor, mix_proj: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The contract of :func:`reference.window_decode_reference`: q [B, 1, H, D], k / v [B, 1, Hkv, D], the ring
    ``past`` updated in place (its last two dims contiguous), ``keep`` [B, 1] or None, ``o`` [B, 1, H, D],
    ``mix_logits`` [H] or [B, 1, H], ``mix_proj`` [H, C] with ``hidden`` [B, 1, C] or None."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    ring_k, ring_v, ring_valid, head = past
    S = ring_k.shape[1]
    if T != 1 or S < 2 or ring_valid.dtype != torch.bool or head.dtype != torch.long:
        raise ValueError("the fused window step takes one token per row on top of a carried ring (bool flags)")
    if ring_k.stride()[2:] != (D, 1) or ring_v.stride()[2:] != (D, 1) or ring_valid.stride(1) != 1:
        raise ValueError("the fused window step needs the ring's heads and dims contiguous")
    if head.stride(0) != 1:
        raise ValueError("the fused window step needs the ring's heads contiguous")
    q, k, v, o = (x.contiguous() for x in (q, k, v, o))
    mix = mix_logits.contiguous()
    proj = hidden_rows = None
    if mix_proj is not None:
        proj, hidden_rows = mix_proj.contiguous(), hidden.reshape(B, -1)
        if hidden_rows.stride(1) != 1:
            hidden_rows = hidden_rows.contiguous()
    keep_col = None if keep is None else keep[:, -1]
    GP = next_pow2(H // Hkv)
    block = WINDOW_BLOCK
    parts = window_parts(B * Hkv, S, multiprocessors(q.device), block)
    chunk = cdiv(cdiv(S, parts), block) * block
    parts = cdiv(S, chunk)
    part_m = torch.empty(B * Hkv * parts * GP, device=q.device, dtype=torch.float32)
    part_den = torch.empty_like(part_m)
    part_acc = torch.empty(B * Hkv * parts * GP * D, device=q.device, dtype=torch.float32)
    slot = torch.empty(B * Hkv, device=q.device, dtype=torch.long)
    strides = (ring_k.stride(0), ring_k.stride(1), ring_v.stride(0), ring_v.stride(1), ring_valid.stride(0))
    dependent = pdl(q.device)
    _window_part_kernel[(B * Hkv, parts)](
        q, ring_k, ring_v, ring_valid, head, part_m, part_den, part_acc, slot, float(scale), S, chunk, *strides,
        H=H, Hkv=Hkv, D=D, DP=max(16, D), GP=GP, QP=max(16, GP), BW=block, num_warps=WINDOW_WARPS,
        PREC=operand_precision(ring_k.dtype), PDL=dependent, launch_pdl=dependent,
    )  # fmt: skip
    out = torch.empty_like(o)
    _window_merge_kernel[(B * Hkv,)](
        q, k, v, ring_k, ring_v, ring_valid, head, q if keep_col is None else keep_col, part_m, part_den, part_acc,
        slot, o, mix, mix if proj is None else proj, mix if hidden_rows is None else hidden_rows, out, float(scale),
        S - 1, parts, *strides, 0 if keep_col is None else keep_col.stride(0), H if mix.dim() > 1 else 0,
        0 if hidden_rows is None else hidden_rows.stride(0), 0 if proj is None else proj.shape[1], H=H, Hkv=Hkv, D=D,
        GP=GP, HAS_KEEP=keep_col is not None, HAS_PROJ=proj is not None, RB=128, PDL=dependent, num_warps=4,
        launch_pdl=dependent,
    )  # fmt: skip
    return out


def _window_decode_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor,
    ring_valid: torch.Tensor, head: torch.Tensor, keep: torch.Tensor | None, scale: float, o: torch.Tensor,
    mix_logits: torch.Tensor, mix_proj: torch.Tensor | None, hidden: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    past = (ring_k, ring_v, ring_valid, head)
    return window_decode_triton(q, k, v, past, keep, scale, o, mix_logits, mix_proj, hidden)


# The step as a custom op that writes its ring, for torch.compile graphs (the compiled decoding step): Inductor
# keeps the two launches inside the graph and fuses the ops around them, where it would otherwise trace the
# PyTorch ring (about a dozen ops). Safe in CUDA graphs: everything it reads and writes is a device buffer. The
# namespace is the module's, as for the GSA op (t2r.kernels.chunk).
_NS = re.sub(r"\W", "_", __name__)
window_decode_op = torch.library.custom_op(
    f"{_NS}::window_decode",
    _window_decode_impl,
    mutates_args=("ring_k", "ring_v", "ring_valid", "head"),
)


@window_decode_op.register_fake
def _(q, k, v, ring_k, ring_v, ring_valid, head, keep, scale, o, mix_logits, mix_proj, hidden):
    return o.new_empty(o.shape)
