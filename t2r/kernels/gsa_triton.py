"""Triton kernels for Gated Slot Attention: chunked forward/backward and a fused in-place decode step.

Same contract as :mod:`gsa_reference` (the oracle these are tested against): q [B, T, H, K], k [B, T, Hkv, K],
v [B, T, Hkv, V], s, g [B, T, Hkv, M], state (hk [N, Hkv, K, M], hv [N, Hkv, M, V]) in fp32, optional packed
sequences through ``cu_seqlens``. Every batch is handled as packed: a plain [B, T] batch is B sequences of T.
The autograd op is registered as torch.library custom ops (``gsa_fwd``, ``gsa_bwd``), so torch.compile keeps it
inside its graphs; eager calls run the same code and formula through an autograd.Function.

How the work is split (per KV head; the G query heads of a group share all state work):
- ``_segment_cumsum``: the log gates' running sum b within each segment (fp32), once in the forward and again
  in the backward unless g is fp32 (then the forward's sums are kept in g's place); every kernel below loads it
  instead of re-summing g (summing was half of a scan's time). A sub-chunk's own running sum is the difference to
  the row before it.
- ``_state_scan``: a sequential scan over segments of BS tokens that writes both memories at every segment start
  (and the final state), keys and values memory side by side in one launch. Its updates use only decays
  exp(b_last - b) <= 1, so nothing can overflow.
- The forward output, up to 64 slots: ``_slot_probs`` then ``_out_blocks``, one program per segment each, take
  the whole segment at once from its start state (the slot softmax p passes between them through memory), so
  every product has the segment's 64 rows, which Hopper's warpgroup matmuls need. A pair of tokens in one
  sub-chunk of BC tokens splits its decay exp(b_t - b_j) at the sub-chunk's midpoint r into exp(b_t - r) *
  exp(r - b_j), each factor at most exp(|sub-chunk decay| / 2); a key of an earlier sub-chunk reaches a query
  through that sub-chunk's end, both factors <= 1. With more slots, ``_out_fwd`` walks the sub-chunks instead,
  updating the memories in registers (16-row products, a chain of dependent steps).
- Backward: the scan again (or the forward's states, ``SAVE_STATES``). Up to 64 slots, from the forward's p
  and log-sum-exp (``SAVE_PROBS``, opt-in), ``_slot_grads`` takes dp, dz and the read side's gate summands
  a segment at a time and ``_out_blocks`` gives dq (the forward output's computation with dz, k and hk);
  otherwise ``_bwd_sweep`` walks the sub-chunks recomputing p (slot softmax, dp, dz, dq). Then the scan in
  reverse (the memories' gradients), ``_bwd_rev_memory`` once per memory (reverse walk: dk or dv, and the
  memory's shares of ds and of the gate gradient's carry into the segment, <memory, gradient> at the segment's
  end; one memory per launch keeps its registers from spilling), then ``_gate_grad`` adds the shares and takes
  every segment's reverse cumulative sum of the summands plus its carry: dg, all segments in parallel. The
  reverse walks stay walks: taken a segment at a time like the forward output, they were 13% slower on an H100,
  bound by spilled registers (docs/benchmarks.md).
- Decoding: ``_decode_step`` streams one token's update through the memories in blocks (``_decode`` takes a few
  tokens at once).

The gate gradient uses d/d b_t = dz_t * z_t + p_t * dp_t - s_t * ds_t (b the running sum of g), because b_t
scales every read at t by exp(b_t) and every write at t by exp(-b_t); dg is its reverse cumulative sum.

Exactness bound: a sub-chunk's factors stay finite while its total decay |b_last| <= 2 * EXP_CLAMP nats, i.e.
log alpha >= -7.5 per token on average over 16 tokens (with tau = 8: any slot-gate logit f >= -60). Beyond that
the factors are clamped (finite, not exact); the PyTorch reference stays exact for any gate. Taking sub-chunk
sums as differences of the segment's running sum costs at most ~3e-5 in an exponent at that bound (|b| <= 480).
"""

from __future__ import annotations

import functools
import os
import re

import torch

try:  # a try block, so that transformers' trust_remote_code import check does not demand triton on CPU machines
    import triton
    import triton.language as tl
except ImportError as err:
    raise ImportError("the GSA Triton kernels need triton (pip install 't2r[cuda]')") from err

from .gsa_memo import LastTensorMemo

State = tuple[torch.Tensor, torch.Tensor]
EXP_CLAMP = 60.0

# Tunables (chosen on an H100; see docs/benchmarks.md): segment length between stored states, sub-chunk length.
SEGMENT = int(os.environ.get("T2R_GSA_SEGMENT", "64"))
SUBCHUNK = int(os.environ.get("T2R_GSA_SUBCHUNK", "16"))
# Products of fp32 intermediates for bf16/fp16 inputs: "tf32", "half", or "half:GROUP,..." for half precision in
# some kernels only (groups: PREC_GROUPS). The default takes the forward walk's slot logits and memory updates in
# half precision (forward 6-13% faster on an H100, o's error unchanged at 2e-3); its output products in half took
# o to 1.1e-2 at tiny head dims, and the backward's walks in half double dg's error to 6e-3
# (benchmarks/precision_sweep.py, docs/benchmarks.md).
DOT_MODE = os.environ.get("T2R_GSA_DOT", "half:out")
# fp16 inputs take the half groups only when asked for: fp16 cannot hold the sub-chunk decay factors (up to
# exp(EXP_CLAMP) under strongly forgetting gates) that bf16 can.
HALF_FOR_FP16 = "T2R_GSA_DOT" in os.environ
# scan: the memories' forward scan (both passes); dscan: their gradients' reverse scan; out: the forward walk's
# slot logits and memory updates; o: the forward walk's output products; sweep: the backward's forward walk;
# rev: the backward's reverse walks.
PREC_GROUPS = ("scan", "dscan", "out", "o", "sweep", "rev")
STATE_BLOCK = int(os.environ.get("T2R_GSA_STATE_BLOCK", "64"))  # rows of a memory per scan program
NUM_STAGES = int(os.environ.get("T2R_GSA_STAGES", "2"))
NUM_WARPS = int(os.environ.get("T2R_GSA_WARPS", "0"))  # 0: by tile size
# Decoding: warps per (sequence, KV head) program; 4 was fastest on the H100 (docs/bench/decode_sweep_*), ahead of
# 8 and of splitting the value memory's columns over more programs.
DECODE_WARPS = int(os.environ.get("T2R_GSA_DECODE_WARPS", "4"))
# One-token decoding streams the memories in blocks of this many rows / columns (0: off, the all-at-once kernel).
DECODE_BLOCK = int(os.environ.get("T2R_GSA_DECODE_BLOCK", "32"))

# The forward output kernel: "blocks" (every product at the segment's full length, no walk) or "walk".
FWD_BLOCKS = os.environ.get("T2R_GSA_FWD", "blocks") == "blocks"
# More slots take the walk: at M = 128 the two kernels spill 1.4-1.6 KB per thread (offline, sm_90), 3-6x M = 64.
FWD_BLOCKS_MAX_SLOTS = 64
FWD_WARPS = int(os.environ.get("T2R_GSA_FWD_WARPS", "4"))
# Keep the forward's per-segment states for the backward instead of scanning again: fp32, (K + V) * M * 4 bytes per
# segment and KV head (at K = V = 128, M = 64: 1 KB per token and KV head, more than q, k and v take in bf16).
SAVE_STATES = os.environ.get("T2R_GSA_SAVE_STATES", "0") == "1"
# Keep the forward's slot softmax p (fp32, M * 4 bytes per token and query head: at M = 64 as much as q at K = 128
# in bf16) and its log-sum-exp for the backward, which then takes dz and dq a segment at a time instead of walking
# sub-chunks to recompute p (up to FWD_BLOCKS_MAX_SLOTS, where the forward has p). The forward's slot logits then
# take the backward's precision ("sweep"), not "out": a p from bf16 products took dg's error under strongly
# forgetting gates to 1.6e-2 (the bf16 bound is 1e-2). With the sweep's precision, fwd+bwd is 4-5% faster on an
# H100 (10-13% with SAVE_STATES too), the forward 7-10% slower; whole training steps gained nothing, so both stay
# off (docs/benchmarks.md, eleventh session).
SAVE_PROBS = os.environ.get("T2R_GSA_SAVE_PROBS", "0") == "1"

POISON = False  # tests: fill outputs with NaN before the kernels run, so that unwritten elements show

PREC_BF16, PREC_FP16, PREC_IEEE, PREC_TF32, PREC_BF16_EMULATED, PREC_FP16_EMULATED = range(6)
# Triton's CPU interpreter computes bf16/fp16 dots wrongly; there the operands are rounded and multiplied in fp32.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """Matmul with fp32 accumulation; operands in the precision chosen from the inputs' dtype."""
    if PREC == 0:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif PREC == 1:
        return tl.dot(a.to(tl.float16), b.to(tl.float16))
    elif PREC == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif PREC == 3:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    elif PREC == 4:
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a.to(tl.float16).to(tl.float32), b.to(tl.float16).to(tl.float32), input_precision="ieee")


@triton.jit
def _cols_ptrs(ptr, t, heads, head, D: tl.constexpr, d0, BD: tl.constexpr):
    """Pointers to columns d0 .. d0 + BD of the rows ``t`` of a token-major [T, heads, D] tensor."""
    return ptr + (t[:, None] * heads + head) * D + (d0 + tl.arange(0, BD))[None, :]


@triton.jit
def _load_cols(ptr, t, valid, heads, head, D: tl.constexpr, d0, BD: tl.constexpr):
    """Columns d0 .. d0 + BD of a token-major [T, heads, D] tensor, zero outside ``valid``, as fp32."""
    return tl.load(_cols_ptrs(ptr, t, heads, head, D, d0, BD), mask=valid[:, None], other=0.0).to(tl.float32)


@triton.jit
def _store_cols(ptr, x, t, valid, heads, head, D: tl.constexpr, d0, BD: tl.constexpr):
    tl.store(_cols_ptrs(ptr, t, heads, head, D, d0, BD), x.to(ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _load_rows(ptr, t, valid, heads, head, D: tl.constexpr):
    """[len(t), D] tile of a token-major [T, heads, D] tensor, zero outside ``valid``, as fp32."""
    return _load_cols(ptr, t, valid, heads, head, D, 0, D)


@triton.jit
def _load_raw(ptr, t, valid, heads, head, D: tl.constexpr):
    """``_load_rows`` in the tensor's own dtype: an input tile that only feeds matmuls, in half the registers."""
    return tl.load(_cols_ptrs(ptr, t, heads, head, D, 0, D), mask=valid[:, None], other=0.0)


@triton.jit
def _store_rows(ptr, x, t, valid, heads, head, D: tl.constexpr):
    _store_cols(ptr, x, t, valid, heads, head, D, 0, D)


@triton.jit
def _state_ptrs(base, D: tl.constexpr, M: tl.constexpr, stride_d, stride_m):
    rd = tl.arange(0, D)
    rm = tl.arange(0, M)
    return base + rd[:, None] * stride_d + rm[None, :] * stride_m


@triton.jit
def _subchunk_gates(s, b, b_last, EXP_CLAMP: tl.constexpr):
    """Decay factors of one sub-chunk (rows = tokens, columns = slots) from its running log decay b and total
    b_last: query side exp(b - r), key side exp(r - b) (times s: ``ek``; without: ``erb``), to the sub-chunk start
    exp(b), to its end s * exp(b_last - b), and the whole sub-chunk's decay exp(b_last)."""
    r = 0.5 * b_last
    eq = tl.exp(tl.minimum(b - r[None, :], EXP_CLAMP))
    erb = tl.exp(tl.minimum(r[None, :] - b, EXP_CLAMP))
    eb = tl.exp(b)
    eend = tl.exp(b_last[None, :] - b)
    return eq, erb, s * erb, eb, eend, s * eend, tl.exp(b_last)


# ----------------------------------------------------------------------------------------------------------
# Scans over segments: forward memories, and their gradients in reverse.


@triton.jit
def _scan_setup(d0, cu_ptr, segoff_ptr, stride_pd, stride_pm, Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr,
                BD: tl.constexpr, BM: tl.constexpr):  # fmt: skip
    """A scan program's slot columns (m0 .. m0 + BM; its rows start at d0), KV head, sequence bounds, first
    segment, and its block's offsets in the public state layout and in the per-segment buffers."""
    m0 = tl.program_id(2) * BM
    i_nh = tl.program_id(1)
    n = i_nh // Hkv
    bos = tl.load(cu_ptr + n).to(tl.int64)
    eos = tl.load(cu_ptr + n + 1).to(tl.int64)
    seg0 = tl.load(segoff_ptr + n).to(tl.int64)
    public = _state_ptrs(i_nh.to(tl.int64) * D * M + d0 * stride_pd + m0 * stride_pm, BD, BM, stride_pd, stride_pm)
    internal = _state_ptrs(d0 * M + m0, BD, BM, M, 1)
    return m0, i_nh % Hkv, bos, eos, seg0, public, internal


@triton.jit
def _segment_cumsum_kernel(g_ptr, b_ptr, seg_ptr, cu_ptr, Hkv: tl.constexpr, M: tl.constexpr, BS: tl.constexpr):
    """b = the log gates' running sum within each segment (fp32), computed once for every scan."""
    _, t0, eos = _segment_start(seg_ptr, cu_ptr)
    h = tl.program_id(1)
    t = t0 + tl.arange(0, BS)
    valid = t < eos
    _store_rows(b_ptr, tl.cumsum(_load_rows(g_ptr, t, valid, Hkv, h, M), axis=0), t, valid, Hkv, h, M)


@triton.jit
def _segment_gates(b_ptr, t, valid, seg_end, Hkv: tl.constexpr, h, M: tl.constexpr, m0, BM: tl.constexpr):
    """Slots m0 .. m0 + BM of a segment's running log decay b (rows = tokens) and of its total b_last (the row of
    its last token). Loading b instead of summing g here halved the scans' time (H100, 2026-11-23)."""
    b = _load_cols(b_ptr, t, valid, Hkv, h, M, m0, BM)
    b_last = tl.load(b_ptr + ((seg_end - 1) * Hkv + h) * M + m0 + tl.arange(0, BM))
    return b, b_last


@triton.jit
def _state_scan_kernel(
    xk_ptr, yk_ptr, xv_ptr, yv_ptr, b_ptr, ik_ptr, iv_ptr, bk_ptr, bv_ptr, ok_ptr, ov_ptr, cu_ptr, segoff_ptr,
    H: tl.constexpr, Hkv: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, BS: tl.constexpr,
    BD: tl.constexpr, BM: tl.constexpr, HAS_INIT: tl.constexpr, STORE_OUT: tl.constexpr, REVERSE: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    """Both memories in one launch (programs below K / BD: the keys memory, the rest: the values memory), so that a
    long sequence's few programs per memory run side by side instead of one launch after the other. Forward
    (x, y = k, s and v, s): states from the initial ones (i) into segment buffers (b*) and final states (o*);
    REVERSE (x, y = q, dz and do, p): gradients from the final states' (i) into buffers and the initial's (o*)."""
    pid = tl.program_id(0)
    keys = pid < K // BD
    d0 = tl.where(keys, pid, pid - K // BD) * BD
    if REVERSE:
        if keys:
            _state_bwd_block(xk_ptr, yk_ptr, b_ptr, ik_ptr, bk_ptr, ok_ptr, cu_ptr, segoff_ptr, M, 1, d0,
                             H, Hkv, K, M, BS, BD, BM, HAS_INIT, PREC)  # fmt: skip
        else:
            _state_bwd_block(xv_ptr, yv_ptr, b_ptr, iv_ptr, bv_ptr, ov_ptr, cu_ptr, segoff_ptr, 1, V,
                             d0, H, Hkv, V, M, BS, BD, BM, HAS_INIT, PREC)  # fmt: skip
    elif keys:
        _state_fwd_block(xk_ptr, yk_ptr, b_ptr, ik_ptr, bk_ptr, ok_ptr, cu_ptr, segoff_ptr, M, 1, d0,
                         Hkv, K, M, BS, BD, BM, HAS_INIT, STORE_OUT, PREC)  # fmt: skip
    else:
        _state_fwd_block(xv_ptr, yv_ptr, b_ptr, iv_ptr, bv_ptr, ov_ptr, cu_ptr, segoff_ptr, 1, V,
                         d0, Hkv, V, M, BS, BD, BM, HAS_INIT, STORE_OUT, PREC)  # fmt: skip


@triton.jit
def _state_fwd_block(
    x_ptr, s_ptr, b_ptr, h0_ptr, hbuf_ptr, hT_ptr, cu_ptr, segoff_ptr, stride_pd, stride_pm, d0,
    Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """A [BD, BM] block (rows from d0) of one memory (hk with x = k, or hv transposed with x = v) of one sequence
    and KV head: the state at each segment start into hbuf [NS, Hkv, D, M]; h0/hT in the public layout given by
    (stride_pd, stride_pm)."""
    m0, h, bos, eos, seg0, public, internal = _scan_setup(d0, cu_ptr, segoff_ptr, stride_pd, stride_pm, Hkv, D, M,
                                                          BD, BM)  # fmt: skip
    if HAS_H0:
        state = tl.load(h0_ptr + public).to(tl.float32)
    else:
        state = tl.zeros([BD, BM], dtype=tl.float32)
    rt = tl.arange(0, BS)
    nseg = tl.cdiv(eos - bos, BS)
    for i in range(nseg):
        tl.store(hbuf_ptr + ((seg0 + i) * Hkv + h) * D * M + internal, state)
        t = bos + i * BS + rt
        valid = t < eos
        x = _load_cols(x_ptr, t, valid, Hkv, h, D, d0, BD)
        s = _load_cols(s_ptr, t, valid, Hkv, h, M, m0, BM)
        b, b_last = _segment_gates(b_ptr, t, valid, tl.minimum(bos + i * BS + BS, eos), Hkv, h, M, m0, BM)
        w = s * tl.exp(b_last[None, :] - b)
        state = state * tl.exp(b_last)[None, :] + _mm(tl.trans(x), w, PREC)
    if STORE_FINAL:
        tl.store(hT_ptr + public, state)


@triton.jit
def _state_bwd_block(
    x_ptr, y_ptr, b_ptr, dhT_ptr, dbuf_ptr, dh0_ptr, cu_ptr, segoff_ptr, stride_pd, stride_pm, d0,
    H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, HAS_DHT: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Reverse scan of one memory's gradient (a [BD, BM] block, rows from d0): the gradient at each segment end
    into dbuf [NS, Hkv, D, M] and the initial state's into dh0; each token t of query head h adds
    x_t (y_t * exp(b_t))^T (x = q, y = dz for hk; x = do, y = p for hv)."""
    G: tl.constexpr = H // Hkv
    m0, h, bos, eos, seg0, public, internal = _scan_setup(d0, cu_ptr, segoff_ptr, stride_pd, stride_pm, Hkv, D, M,
                                                          BD, BM)  # fmt: skip
    if HAS_DHT:
        dstate = tl.load(dhT_ptr + public).to(tl.float32)
    else:
        dstate = tl.zeros([BD, BM], dtype=tl.float32)
    rt = tl.arange(0, BS)
    nseg = tl.cdiv(eos - bos, BS)
    for j in range(nseg):
        i = nseg - 1 - j
        tl.store(dbuf_ptr + ((seg0 + i) * Hkv + h) * D * M + internal, dstate)
        t = bos + i * BS + rt
        valid = t < eos
        b, b_last = _segment_gates(b_ptr, t, valid, tl.minimum(bos + i * BS + BS, eos), Hkv, h, M, m0, BM)
        eb = tl.exp(b)
        dstate = dstate * tl.exp(b_last)[None, :]
        for gi in tl.static_range(G):
            x = _load_cols(x_ptr, t, valid, H, h * G + gi, D, d0, BD)
            y = _load_cols(y_ptr, t, valid, H, h * G + gi, M, m0, BM)
            dstate += _mm(tl.trans(x), y * eb, PREC)
    tl.store(dh0_ptr + public, dstate)


# ----------------------------------------------------------------------------------------------------------
# Per-segment walks over sub-chunks.


@triton.jit
def _segment_start(seg_ptr, cu_ptr):
    i_s = tl.program_id(0)
    n = tl.load(seg_ptr + 2 * i_s)
    t0 = tl.load(seg_ptr + 2 * i_s + 1).to(tl.int64)
    eos = tl.load(cu_ptr + n + 1).to(tl.int64)
    return i_s.to(tl.int64), t0, eos


@triton.jit
def _load_subchunk(k_ptr, v_ptr, s_ptr, b_ptr, t0, c, eos, Hkv: tl.constexpr, h, K: tl.constexpr, V: tl.constexpr,
                   M: tl.constexpr, BC: tl.constexpr):  # fmt: skip
    """``_subchunk_decay`` plus the sub-chunk's keys, values and write weights (fp32, zero past the sequence)."""
    t, valid, bc, b_last = _subchunk_decay(b_ptr, t0, c, eos, Hkv, h, M, BC)
    kc = _load_rows(k_ptr, t, valid, Hkv, h, K)
    vc = _load_rows(v_ptr, t, valid, Hkv, h, V)
    sc = _load_rows(s_ptr, t, valid, Hkv, h, M)
    return t, valid, kc, vc, sc, bc, b_last


@triton.jit
def _subchunk_decay(b_ptr, t0, c, eos, Hkv: tl.constexpr, h, M: tl.constexpr, BC: tl.constexpr):
    """Tokens and validity of the sub-chunk at offset c of the segment starting at t0, with its running log decay
    and total: the segment's running sum b minus its value before the sub-chunk (flat past the sequence's end,
    where nothing is written)."""
    t = t0 + c + tl.arange(0, BC)
    valid = t < eos
    rm = tl.arange(0, M)
    # The mask is a tensor comparison: in Triton's interpreter c is a Python int, and tensor & bool is refused.
    before = tl.load(b_ptr + ((tl.minimum(t0 + c, eos) - 1) * Hkv + h) * M + rm, mask=(rm * 0 + c) > 0, other=0.0)
    b_last = tl.load(b_ptr + ((tl.minimum(t0 + c + BC, eos) - 1) * Hkv + h) * M + rm) - before
    bc = tl.where(valid[:, None], _load_rows(b_ptr, t, valid, Hkv, h, M) - before[None, :], b_last[None, :])
    return t, valid, bc, b_last


@triton.jit
def _out_fwd_kernel(
    q_ptr, k_ptr, v_ptr, s_ptr, b_ptr, o_ptr, hk_ptr, hv_ptr, seg_ptr, cu_ptr, scale,
    H: tl.constexpr, Hkv: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
    BS: tl.constexpr, BC: tl.constexpr, PREC_IN: tl.constexpr, PREC: tl.constexpr, PREC_O: tl.constexpr,
    EXP_CLAMP: tl.constexpr,
):  # fmt: skip
    """The forward walk: slot logits and memory updates in PREC, the output's products in PREC_O."""
    G: tl.constexpr = H // Hkv
    i_s, t0, eos = _segment_start(seg_ptr, cu_ptr)
    h = tl.program_id(1)
    base = i_s * Hkv + h
    hk = tl.load(hk_ptr + base * K * M + _state_ptrs(0, K, M, M, 1))  # [K, M]
    hv = tl.load(hv_ptr + base * V * M + _state_ptrs(0, M, V, 1, M))  # [M, V] (stored [V, M])
    rc = tl.arange(0, BC)
    causal = rc[:, None] >= rc[None, :]
    for c in range(0, BS, BC):
        t, valid, kc, vc, sc, bc, bl = _load_subchunk(k_ptr, v_ptr, s_ptr, b_ptr, t0, c, eos, Hkv, h, K, V, M, BC)
        eq, _, ek, eb, _, w, decay = _subchunk_gates(sc, bc, bl, EXP_CLAMP)
        for gi in tl.static_range(G):
            qc = _load_rows(q_ptr, t, valid, H, h * G + gi, K)
            A = tl.where(causal, _mm(qc, tl.trans(kc), PREC_IN), 0.0)
            logits = scale * (_mm(qc, hk, PREC) * eb + _mm(A, ek, PREC) * eq)
            e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
            p = e / tl.sum(e, axis=1)[:, None]
            A2 = tl.where(causal, _mm(p * eq, tl.trans(ek), PREC_O), 0.0)
            o = _mm(p * eb, hv, PREC_O) + _mm(A2, vc, PREC_O)
            _store_rows(o_ptr, o, t, valid, H, h * G + gi, V)
        hk = hk * decay[None, :] + _mm(tl.trans(kc), w, PREC)
        hv = hv * decay[:, None] + _mm(tl.trans(w), vc, PREC)


@triton.jit
def _segment_block_bounds(b_ptr, t0, eos, Hkv: tl.constexpr, h, M: tl.constexpr, BS: tl.constexpr,
                          BC: tl.constexpr):  # fmt: skip
    """A segment's running log decay b [BS, M] (flat past the sequence's end) and, per row, its sub-chunk's
    midpoint r = (b before the sub-chunk + b at its end) / 2, the reference that splits decays inside a sub-chunk."""
    rt = tl.arange(0, BS)
    cols = tl.arange(0, M)[None, :]
    b = tl.load(b_ptr + (tl.minimum(t0 + rt, eos - 1) * Hkv + h)[:, None] * M + cols)
    first = t0 + (rt // BC) * BC  # first token of the row's sub-chunk
    before = tl.load(b_ptr + ((tl.minimum(first, eos) - 1) * Hkv + h)[:, None] * M + cols,
                     mask=(first > t0)[:, None], other=0.0)  # fmt: skip
    end = tl.load(b_ptr + ((tl.minimum(first + BC, eos) - 1) * Hkv + h)[:, None] * M + cols)
    return b, 0.5 * (before + end)


@triton.jit
def _block_factor(b_ptr, b, t0, eos, j, Hkv: tl.constexpr, h, M: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr):
    """exp(-|b - e|) with e = b at the end of sub-chunk j: the decay from a key of sub-chunk j to that end, and
    from that end to a query of a later sub-chunk (both <= 1, exact for any gate), and the row masks of both."""
    e = tl.load(b_ptr + ((tl.minimum(t0 + (j + 1) * BC, eos) - 1) * Hkv + h) * M + tl.arange(0, M))
    blk = tl.arange(0, BS) // BC
    return tl.exp(-tl.abs(b - e[None, :])), blk == j, blk > j


@triton.jit
def _segment_rows(seg_ptr, cu_ptr, BS: tl.constexpr, BC: tl.constexpr):
    """A segment program's tokens, their validity, and its causal and same-sub-chunk causal masks."""
    i_s, t0, eos = _segment_start(seg_ptr, cu_ptr)
    rt = tl.arange(0, BS)
    causal = rt[:, None] >= rt[None, :]
    return i_s, t0, eos, t0 + rt, t0 + rt < eos, causal, causal & ((rt // BC)[:, None] == (rt // BC)[None, :])


@triton.jit
def _segment_reads(xc, yc, s_ptr, b_ptr, state_ptr, i_s, t0, eos, t, valid, causal, diag, Hkv: tl.constexpr, h,
                   D: tl.constexpr, M: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr, PREC_IN: tl.constexpr,
                   PREC: tl.constexpr, EXP_CLAMP: tl.constexpr):  # fmt: skip
    """What the segment's queries xc [BS, D] read from one memory, before any softmax: the segment-start memory
    ([D, M] at state_ptr, per segment) decayed to each token, plus every write of the segment up to the token (keys
    yc, write weights s). Pass 1's slot logits with (q, k, hk); their gradient dp with (do, v, hv). Two tokens of
    one sub-chunk take the midpoint split (bounded like the walk's); a key of an earlier sub-chunk j reaches a
    query through the end of j (exact)."""
    NB: tl.constexpr = BS // BC
    A = tl.where(causal, _mm(xc, tl.trans(yc), PREC_IN), 0.0)
    b, r = _segment_block_bounds(b_ptr, t0, eos, Hkv, h, M, BS, BC)
    sc = _load_rows(s_ptr, t, valid, Hkv, h, M)
    state = tl.load(state_ptr + (i_s * Hkv + h) * D * M + _state_ptrs(0, D, M, M, 1))  # [D, M]
    R = _mm(xc, state, PREC) * tl.exp(b)
    ek = sc * tl.exp(tl.minimum(r - b, EXP_CLAMP))
    R += _mm(tl.where(diag, A, 0.0), ek, PREC) * tl.exp(tl.minimum(b - r, EXP_CLAMP))
    for j in range(NB - 1):
        x, key, later = _block_factor(b_ptr, b, t0, eos, j, Hkv, h, M, BS, BC)
        R += _mm(A, tl.where(key[:, None], sc * x, 0.0), PREC) * tl.where(later[:, None], x, 0.0)
    return R


@triton.jit
def _slot_probs_kernel(
    q_ptr, k_ptr, s_ptr, b_ptr, p_ptr, lse_ptr, hk_ptr, seg_ptr, cu_ptr, scale,
    H: tl.constexpr, Hkv: tl.constexpr, K: tl.constexpr, M: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr,
    PREC_IN: tl.constexpr, PREC: tl.constexpr, EXP_CLAMP: tl.constexpr, STORE_LSE: tl.constexpr,
):  # fmt: skip
    """Pass 1 of the forward without a walk: the slot softmax p of a whole segment at once, every product at its
    full BS rows against the segment-start keys memory, no memory update inside the segment. p goes through
    memory to ``_out_blocks_kernel`` (both passes in one program spill: benchmarks/kernel_resources.py); with
    STORE_LSE also each row's log-sum-exp, so that the backward can take p and the logits from here."""
    G: tl.constexpr = H // Hkv
    i_s, t0, eos, t, valid, causal, diag = _segment_rows(seg_ptr, cu_ptr, BS, BC)
    h = tl.program_id(1)
    kc = _load_raw(k_ptr, t, valid, Hkv, h, K)
    for gi in tl.static_range(G):
        qc = _load_raw(q_ptr, t, valid, H, h * G + gi, K)
        logits = _segment_reads(qc, kc, s_ptr, b_ptr, hk_ptr, i_s, t0, eos, t, valid, causal, diag, Hkv, h, K, M, BS,
                                BC, PREC_IN, PREC, EXP_CLAMP)  # fmt: skip
        logits *= scale
        top = tl.max(logits, axis=1)
        e = tl.exp(logits - top[:, None])
        total = tl.sum(e, axis=1)
        _store_rows(p_ptr, e / total[:, None], t, valid, H, h * G + gi, M)
        if STORE_LSE:
            tl.store(lse_ptr + t * H + h * G + gi, top + tl.log(total), mask=valid)


@triton.jit
def _slot_grads_kernel(
    do_ptr, v_ptr, s_ptr, b_ptr, hv_ptr, p_ptr, lse_ptr, seg_ptr, cu_ptr, scale, dz_ptr, db_ptr,
    H: tl.constexpr, Hkv: tl.constexpr, V: tl.constexpr, M: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr,
    PREC_IN: tl.constexpr, PREC: tl.constexpr, EXP_CLAMP: tl.constexpr,
):  # fmt: skip
    """The backward's slot-softmax gradient without a walk, from the forward's p and log-sum-exp: dp (pass 2's
    gradient: the reads of ``_segment_reads`` with do and v as query and key, against the values memory), dz =
    scale * p * (dp - sum(p dp)) and the read side's gate summands dlog * logits + p * dp, with the logits taken
    as log p + lse (where p underflowed to 0 the summand is 0 either way)."""
    G: tl.constexpr = H // Hkv
    i_s, t0, eos, t, valid, causal, diag = _segment_rows(seg_ptr, cu_ptr, BS, BC)
    h = tl.program_id(1)
    vc = _load_raw(v_ptr, t, valid, Hkv, h, V)
    db = tl.zeros([BS, M], dtype=tl.float32)
    for gi in tl.static_range(G):
        doc = _load_raw(do_ptr, t, valid, H, h * G + gi, V)
        dp = _segment_reads(doc, vc, s_ptr, b_ptr, hv_ptr, i_s, t0, eos, t, valid, causal, diag, Hkv, h, V, M, BS,
                            BC, PREC_IN, PREC, EXP_CLAMP)  # fmt: skip
        p = _load_rows(p_ptr, t, valid, H, h * G + gi, M)
        dlog = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        _store_rows(dz_ptr, scale * dlog, t, valid, H, h * G + gi, M)
        lse = tl.load(lse_ptr + t * H + h * G + gi, mask=valid, other=0.0)
        logits = tl.where(p > 0, tl.log(p) + lse[:, None], 0.0)
        db += dlog * logits + p * dp
    _store_rows(db_ptr, db, t, valid, Hkv, h, M)


@triton.jit
def _out_blocks_kernel(
    p_ptr, v_ptr, s_ptr, b_ptr, o_ptr, hv_ptr, seg_ptr, cu_ptr,
    H: tl.constexpr, Hkv: tl.constexpr, V: tl.constexpr, M: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr,
    PREC: tl.constexpr, EXP_CLAMP: tl.constexpr,
):  # fmt: skip
    """Pass 2 of the forward without a walk: o from the slot softmax p against the segment-start values memory,
    split like ``_slot_probs_kernel``."""
    G: tl.constexpr = H // Hkv
    NB: tl.constexpr = BS // BC
    i_s, t0, eos, t, valid, _, diag = _segment_rows(seg_ptr, cu_ptr, BS, BC)
    h = tl.program_id(1)
    b, r = _segment_block_bounds(b_ptr, t0, eos, Hkv, h, M, BS, BC)
    sc = _load_rows(s_ptr, t, valid, Hkv, h, M)
    eq = tl.exp(tl.minimum(b - r, EXP_CLAMP))
    ek = sc * tl.exp(tl.minimum(r - b, EXP_CLAMP))
    for gi in tl.static_range(G):
        p = _load_rows(p_ptr, t, valid, H, h * G + gi, M)
        A2 = tl.where(diag, _mm(p * eq, tl.trans(ek), PREC), 0.0)
        for j in range(NB - 1):
            x, key, later = _block_factor(b_ptr, b, t0, eos, j, Hkv, h, M, BS, BC)
            A2 += _mm(tl.where(later[:, None], p * x, 0.0), tl.trans(tl.where(key[:, None], sc * x, 0.0)), PREC)
        hv = tl.load(hv_ptr + (i_s * Hkv + h) * V * M + _state_ptrs(0, M, V, 1, M))  # [M, V] (stored [V, M])
        o = _mm(p * tl.exp(b), hv, PREC) + _mm(A2, _load_raw(v_ptr, t, valid, Hkv, h, V), PREC)
        _store_rows(o_ptr, o, t, valid, H, h * G + gi, V)


@triton.jit
def _bwd_sweep_kernel(
    q_ptr, k_ptr, v_ptr, s_ptr, b_ptr, do_ptr, hk_ptr, hv_ptr, seg_ptr, cu_ptr, scale,
    dq_ptr, p_ptr, dz_ptr, db_ptr,
    H: tl.constexpr, Hkv: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
    BS: tl.constexpr, BC: tl.constexpr, PREC_IN: tl.constexpr, PREC: tl.constexpr, EXP_CLAMP: tl.constexpr,
):  # fmt: skip
    """Forward walk of the backward pass: recompute p; dp (pass 2's gradient, same form as pass 1 with do and
    v as query and key), dz = scale * p * (dp - sum(p dp)), dq; and the read-side gate summands."""
    G: tl.constexpr = H // Hkv
    i_s, t0, eos = _segment_start(seg_ptr, cu_ptr)
    h = tl.program_id(1)
    base = i_s * Hkv + h
    hk = tl.load(hk_ptr + base * K * M + _state_ptrs(0, K, M, M, 1))
    hv = tl.load(hv_ptr + base * V * M + _state_ptrs(0, M, V, 1, M))
    rc = tl.arange(0, BC)
    causal = rc[:, None] >= rc[None, :]
    for c in range(0, BS, BC):
        t, valid, kc, vc, sc, bc, bl = _load_subchunk(k_ptr, v_ptr, s_ptr, b_ptr, t0, c, eos, Hkv, h, K, V, M, BC)
        eq, _, ek, eb, _, w, decay = _subchunk_gates(sc, bc, bl, EXP_CLAMP)
        db = tl.zeros([BC, M], dtype=tl.float32)
        for gi in tl.static_range(G):
            qc = _load_rows(q_ptr, t, valid, H, h * G + gi, K)
            doc = _load_rows(do_ptr, t, valid, H, h * G + gi, V)
            A = tl.where(causal, _mm(qc, tl.trans(kc), PREC_IN), 0.0)
            logits = scale * (_mm(qc, hk, PREC) * eb + _mm(A, ek, PREC) * eq)
            e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
            p = e / tl.sum(e, axis=1)[:, None]
            Adv = tl.where(causal, _mm(doc, tl.trans(vc), PREC_IN), 0.0)
            dp = _mm(doc, tl.trans(hv), PREC) * eb + _mm(Adv, ek, PREC) * eq
            dlog = p * (dp - tl.sum(p * dp, axis=1)[:, None])
            dz = scale * dlog
            A3 = tl.where(causal, _mm(dz * eq, tl.trans(ek), PREC), 0.0)
            dq = _mm(dz * eb, tl.trans(hk), PREC) + _mm(A3, kc, PREC)
            _store_rows(dq_ptr, dq, t, valid, H, h * G + gi, K)
            _store_rows(p_ptr, p, t, valid, H, h * G + gi, M)
            _store_rows(dz_ptr, dz, t, valid, H, h * G + gi, M)
            db += dlog * logits + p * dp
        _store_rows(db_ptr, db, t, valid, Hkv, h, M)
        hk = hk * decay[None, :] + _mm(tl.trans(kc), w, PREC)
        hv = hv * decay[:, None] + _mm(tl.trans(w), vc, PREC)


@triton.jit
def _bwd_rev_memory_kernel(
    x_ptr, a_ptr, y_ptr, s_ptr, b_ptr, dbuf_ptr, mbuf_ptr, seg_ptr, cu_ptr, dx_ptr, dspart_ptr, cpart_ptr,
    H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr,
    PREC_IN: tl.constexpr, PREC: tl.constexpr, EXP_CLAMP: tl.constexpr,
):  # fmt: skip
    """Reverse walk through one memory's side of the backward, the two sides being the same computation:
    keys memory (x = k, read by a = q with slot weights y = dz) and values memory held as [V, M] (x = v, read by
    a = do with y = p). Gradient of x from reads inside the sub-chunk and, through the memory's gradient at its
    end, from every later token; its share of ds (into dspart).

    Also its share of the gate gradient's carry into the segment (into cpart), the sum over later tokens of the
    summands, taken directly as <memory, its gradient> at the segment's end (the memory mbuf holds at the next
    segment's start): what scaling that memory by exp(delta) does to the loss; zero after a sequence's last
    segment, whose final state's share the caller adds. Summing the later segments' summands instead gives the
    same value in exact arithmetic, but their rounding errors add up over the whole sequence (dg's error grew
    with T, 8.9e-3 at 4k; benchmarks/precision_sweep.py). ``_gate_grad_kernel`` adds the two memories' shares:
    finishing ds and the summands in the values side's walk, as before, made fwd+bwd 2-6% slower (H100,
    docs/benchmarks.md). One memory per program keeps the register file from spilling
    (benchmarks/kernel_resources.py)."""
    G: tl.constexpr = H // Hkv
    i_s, t0, eos = _segment_start(seg_ptr, cu_ptr)
    h = tl.program_id(1)
    base = i_s * Hkv + h
    dmem = tl.load(dbuf_ptr + base * D * M + _state_ptrs(0, D, M, M, 1))  # [D, M]
    more = tl.zeros([D, M], dtype=tl.int32) + (t0 + BS < eos)  # a tensor mask, for the interpreter
    mem = tl.load(mbuf_ptr + (base + Hkv) * D * M + _state_ptrs(0, D, M, M, 1), mask=more > 0, other=0.0)
    carry = tl.sum(mem * dmem, axis=0)  # [M]
    rc = tl.arange(0, BC)
    causal = rc[:, None] >= rc[None, :]
    for j in range(0, BS, BC):
        c = BS - BC - j
        t, valid, bc, bl = _subchunk_decay(b_ptr, t0, c, eos, Hkv, h, M, BC)
        xc = _load_rows(x_ptr, t, valid, Hkv, h, D)
        sc = _load_rows(s_ptr, t, valid, Hkv, h, M)
        eq, erb, ek, eb, eend, w, decay = _subchunk_gates(sc, bc, bl, EXP_CLAMP)
        dx = _mm(w, tl.trans(dmem), PREC)
        ds = eend * _mm(xc, dmem, PREC)
        ds_in = tl.zeros([BC, M], dtype=tl.float32)
        dmem = dmem * decay[None, :]
        for gi in tl.static_range(G):
            ac = _load_rows(a_ptr, t, valid, H, h * G + gi, D)
            yc = _load_rows(y_ptr, t, valid, H, h * G + gi, M)
            A = tl.where(causal, _mm(ac, tl.trans(xc), PREC_IN), 0.0)
            Ay = tl.where(causal, _mm(yc * eq, tl.trans(ek), PREC), 0.0)
            dx += _mm(tl.trans(Ay), ac, PREC)
            ds_in += _mm(tl.trans(A), yc * eq, PREC)
            dmem += _mm(tl.trans(ac), yc * eb, PREC)
        ds += ds_in * erb
        _store_rows(dx_ptr, dx, t, valid, Hkv, h, D)
        _store_rows(dspart_ptr, ds, t, valid, Hkv, h, M)
    tl.store(cpart_ptr + base * M + tl.arange(0, M), carry)


@triton.jit
def _gate_grad_kernel(db_ptr, s_ptr, dsk_ptr, dsv_ptr, ds_ptr, ck_ptr, cv_ptr, seg_ptr, cu_ptr, Hkv: tl.constexpr,
                      M: tl.constexpr, BS: tl.constexpr):  # fmt: skip
    """The backward's last step, one program per segment and KV head, all segments in parallel: ds = the two
    memories' shares; the gate summands (db: the read side) get the write side's -s * ds; dg_t = their reverse
    cumulative sum within the segment plus the segment's carry (the two memories' shares: the rest of the
    sequence, and the final state's share), written over db."""
    i_s, t0, eos = _segment_start(seg_ptr, cu_ptr)
    h = tl.program_id(1)
    t = t0 + tl.arange(0, BS)
    valid = t < eos
    ds = _load_rows(dsk_ptr, t, valid, Hkv, h, M) + _load_rows(dsv_ptr, t, valid, Hkv, h, M)
    _store_rows(ds_ptr, ds, t, valid, Hkv, h, M)
    x = _load_rows(db_ptr, t, valid, Hkv, h, M) - _load_rows(s_ptr, t, valid, Hkv, h, M) * ds
    rm = (i_s * Hkv + h) * M + tl.arange(0, M)
    carry = tl.load(ck_ptr + rm) + tl.load(cv_ptr + rm)
    _store_rows(db_ptr, tl.cumsum(x, axis=0, reverse=True) + carry[None, :], t, valid, Hkv, h, M)


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, s_ptr, g_ptr, o_ptr, hk_ptr, hv_ptr, scale, T,
    H: tl.constexpr, Hkv: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr,
):  # fmt: skip
    """A few tokens per sequence, token by token, the memories updated in place (decoding)."""
    G: tl.constexpr = H // Hkv
    i_nh = tl.program_id(0).to(tl.int64)
    n = i_nh // Hkv
    h = i_nh % Hkv
    rk = tl.arange(0, K)
    rv = tl.arange(0, V)
    rm = tl.arange(0, M)
    hk_ptrs = hk_ptr + i_nh * K * M + rk[:, None] * M + rm[None, :]
    hv_ptrs = hv_ptr + i_nh * M * V + rm[:, None] * V + rv[None, :]
    hk = tl.load(hk_ptrs)
    hv = tl.load(hv_ptrs)
    for i in range(T):
        tok = n * T + i
        k = tl.load(k_ptr + (tok * Hkv + h) * K + rk).to(tl.float32)
        v = tl.load(v_ptr + (tok * Hkv + h) * V + rv).to(tl.float32)
        s = tl.load(s_ptr + (tok * Hkv + h) * M + rm).to(tl.float32)
        a = tl.exp(tl.load(g_ptr + (tok * Hkv + h) * M + rm).to(tl.float32))
        hk = hk * a[None, :] + k[:, None] * s[None, :]
        hv = hv * a[:, None] + s[:, None] * v[None, :]
        for gi in tl.static_range(G):
            q = tl.load(q_ptr + (tok * H + h * G + gi) * K + rk).to(tl.float32)
            logits = scale * tl.sum(q[:, None] * hk, axis=0)
            e = tl.exp(logits - tl.max(logits, axis=0))
            p = e / tl.sum(e, axis=0)
            o = tl.sum(p[:, None] * hv, axis=0)
            tl.store(o_ptr + (tok * H + h * G + gi) * V + rv, o.to(o_ptr.dtype.element_ty))
    tl.store(hk_ptrs, hk)
    tl.store(hv_ptrs, hv)


@triton.jit
def _decode_step_kernel(
    q_ptr, k_ptr, v_ptr, s_ptr, g_ptr, o_ptr, hk_ptr, hv_ptr, scale,
    H: tl.constexpr, Hkv: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, GP: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """One token per sequence (decoding proper), the memories streamed through registers in blocks: keys-memory
    rows (decay, write, store, and every query head's slot logits), then value-memory columns (decay, write,
    store, output). A block's load does not wait on the previous block's math, so the state's bytes flow at
    close to copy speed instead of one 64 KB load, then compute, then one store per program."""
    G: tl.constexpr = H // Hkv
    i_nh = tl.program_id(0).to(tl.int64)  # = sequence * Hkv + KV head, the token's row in k, v, s, g
    rg = tl.arange(0, GP)
    rm = tl.arange(0, M)
    heads = (i_nh * G + rg)[:, None]  # query heads of this KV head: rows of q and o
    in_group = rg[:, None] < G
    s = tl.load(s_ptr + i_nh * M + rm).to(tl.float32)
    a = tl.exp(tl.load(g_ptr + i_nh * M + rm).to(tl.float32))
    logits = tl.zeros([GP, M], dtype=tl.float32)
    # Unrolled by 4: 1-4% faster on the H100, the same bits (docs/bench/decode_probe_2026-11-23_h100.json).
    for k0 in tl.range(0, K, BK, loop_unroll_factor=4):
        rk = k0 + tl.arange(0, BK)
        ptrs = hk_ptr + i_nh * K * M + rk[:, None] * M + rm[None, :]
        kb = tl.load(k_ptr + i_nh * K + rk).to(tl.float32)
        hk = tl.load(ptrs) * a[None, :] + kb[:, None] * s[None, :]
        tl.store(ptrs, hk)
        qb = tl.load(q_ptr + heads * K + rk[None, :], mask=in_group, other=0.0).to(tl.float32)  # [GP, BK]
        logits += tl.sum(qb[:, :, None] * hk[None, :, :], axis=1)
    logits = scale * logits
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    for v0 in tl.range(0, V, BV, loop_unroll_factor=4):
        rv = v0 + tl.arange(0, BV)
        ptrs = hv_ptr + i_nh * M * V + rm[:, None] * V + rv[None, :]
        vb = tl.load(v_ptr + i_nh * V + rv).to(tl.float32)
        hv = tl.load(ptrs) * a[:, None] + s[:, None] * vb[None, :]
        tl.store(ptrs, hv)
        o = tl.sum(p[:, :, None] * hv[None, :, :], axis=1)  # [GP, BV]
        tl.store(o_ptr + heads * V + rv[None, :], o.to(o_ptr.dtype.element_ty), mask=in_group)


# ----------------------------------------------------------------------------------------------------------
# Host side.


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> bool:
    """Shapes the kernels handle: power-of-two head dims and slots of at least 16 (tensor-core tiles)."""

    def ok(n: int) -> bool:
        return n >= 16 and n & (n - 1) == 0 and n <= 256

    return ok(q.shape[-1]) and ok(v.shape[-1]) and ok(s.shape[-1]) and s.shape[-1] <= 128


def _half_groups(mode: str) -> set[str]:
    if mode in ("tf32", "half"):
        return set(PREC_GROUPS) if mode == "half" else set()
    names = set(mode.removeprefix("half:").split(","))
    if not mode.startswith("half:") or not names <= set(PREC_GROUPS):
        raise ValueError(f"T2R_GSA_DOT={mode!r}: expected tf32, half or half:GROUP,... with groups {PREC_GROUPS}")
    return names


def _precision(dtype: torch.dtype) -> dict[str, int]:
    """Operand precisions of the kernels' matmuls: "in" for products of two input tensors, and one per kernel
    group (PREC_GROUPS) for the rest.

    Products of two half-precision inputs (q k^T, do v^T) are exact in half precision. The other products
    take fp32 intermediates (memories, slot weights, decay factors): in tf32 (10 mantissa bits instead of 7,
    about 8x less rounding) or, for the groups T2R_GSA_DOT names (by default "out", for bf16 inputs), in the
    inputs' half precision."""
    if dtype in (torch.bfloat16, torch.float16):
        half = PREC_BF16 if dtype == torch.bfloat16 else PREC_FP16
        if INTERPRETED:
            half = PREC_BF16_EMULATED if dtype == torch.bfloat16 else PREC_FP16_EMULATED
        halves = _half_groups(DOT_MODE) if dtype == torch.bfloat16 or HALF_FOR_FP16 else set()
        rest = PREC_IEEE if INTERPRETED else PREC_TF32
        return {"in": half} | {group: half if group in halves else rest for group in PREC_GROUPS}
    full = PREC_IEEE if INTERPRETED or not torch.backends.cuda.matmul.allow_tf32 else PREC_TF32
    return dict.fromkeys(("in", *PREC_GROUPS), full)


def _empty(*shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON else out


class _Plan:
    """Packed layout of a call: sequence bounds and the segments (sequence id, first token) of every sequence."""

    def __init__(self, B: int, T: int, cu_seqlens: torch.Tensor | None, device: torch.device, seg: int):
        if cu_seqlens is None:
            lens = torch.full((B,), T, dtype=torch.int64)
            cu = torch.arange(B + 1, dtype=torch.int64) * T
        else:
            cu = cu_seqlens.detach().to("cpu", torch.int64)
            lens = cu[1:] - cu[:-1]
        nseg = (lens + seg - 1) // seg
        segoff = torch.cumsum(nseg, 0) - nseg
        seq = torch.repeat_interleave(torch.arange(len(lens)), nseg)
        start = cu[seq] + (torch.arange(len(seq)) - segoff[seq]) * seg
        self.N = len(lens)
        self.NS = len(seq)
        self.seg = seg
        self.cu = cu.to(device, torch.int32)
        self.segoff = segoff.to(device, torch.int32)
        self.segs = torch.stack([seq, start], 1).to(device, torch.int32).contiguous()
        self._nseg, self._segoff, self._device = nseg, segoff, device

    @functools.cached_property
    def last_segments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(non-empty sequences, their last segments) on the device; built only when a final-state gradient needs
        them, so that plain calls copy nothing more to the device."""
        seqs = (self._nseg > 0).nonzero().flatten()
        return seqs.to(self._device), (self._segoff + self._nseg - 1)[seqs].to(self._device)


# A plan's copies to the device wait for the device (pageable memory), and reading cu_seqlens back does too; the
# layers of a model share one layout, so plans are reused: by shape for plain batches, by tensor for packed ones.
@functools.lru_cache(maxsize=64)
def _dense_plan(B: int, T: int, device: torch.device, seg: int) -> _Plan:
    return _Plan(B, T, None, device, seg)


_packed_plan = LastTensorMemo(lambda cu_seqlens, device, seg: _Plan(1, 0, cu_seqlens, device, seg))


def _plan(B: int, T: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> _Plan:
    if cu_seqlens is None:
        return _dense_plan(B, T, device, SEGMENT)
    return _packed_plan(cu_seqlens, device, SEGMENT)


def _launch_cfg(K: int, V: int, M: int) -> dict:
    big = max(K, V) * M >= 128 * 64
    return {"num_warps": NUM_WARPS or (8 if big else 4), "num_stages": NUM_STAGES}


def _scan_blocks(K: int, V: int, M: int, Hkv: int, plan: _Plan) -> tuple[int, int, int]:
    """(rows, slot columns, pipeline stages) of a scan program (both memories). Measured on an H100
    (benchmarks/scan_probe.py, 2026-11-23): 64-row blocks beat 32; few sequences x heads (long sequences) also want
    the slots split in two, with a third pipeline stage where the blocks are small enough for its shared memory
    (M = 128 is not). Very few (SmolLM2's 3 KV heads x 2 rows: 12 row blocks; Mistral-7B's 8 KV heads, one row:
    32) want them split in four: the three scans 845 -> 647 us at 2 x 8k and 1895 -> 1559 us at 1 x 16k, fwd+bwd
    kernels 12% and 5% faster (H100, docs/benchmarks.md, eleventh session)."""
    BD = min(K, V, STATE_BLOCK)
    blocks = plan.N * Hkv * ((K + V) // BD)
    if blocks >= 1024 or M <= 16:
        return BD, M, NUM_STAGES
    BM = max(16, M // (4 if blocks < 64 else 2))
    return BD, BM, 3 if BD * BM <= 64 * 32 else NUM_STAGES


def _segment_cumsum(g: torch.Tensor, plan: _Plan) -> torch.Tensor:
    b = _empty(*g.shape, dtype=torch.float32, device=g.device)
    if plan.NS:
        _segment_cumsum_kernel[(plan.NS, g.shape[1])](g, b, plan.segs, plan.cu, Hkv=g.shape[1], M=g.shape[2],
                                                       BS=plan.seg)  # fmt: skip
    return b


def _state_scan(xk, yk, xv, yv, b, init, plan, prec, Hkv: int, M: int, store_out: bool, reverse: bool):
    """Both memories scanned over segments in one launch (``_state_scan_kernel``). Forward (x, y = k, s and v, s):
    the states at every segment start, hk [NS, Hkv, K, M] and hv [NS, Hkv, V, M], from the initial ones, and the
    final states in the public layout ([N, Hkv, K, M], [N, Hkv, M, V]) if ``store_out``. Reverse (x, y = q, dz and
    do, p): the memories' gradients at every segment end from the final states', and the initial states'."""
    H, K, V = xk.shape[1], xk.shape[2], xv.shape[2]
    f32 = dict(dtype=torch.float32, device=xk.device)
    bufs = (_empty(max(plan.NS, 1), Hkv, K, M, **f32), _empty(max(plan.NS, 1), Hkv, V, M, **f32))
    outs = (_empty(plan.N, Hkv, K, M, **f32), _empty(plan.N, Hkv, M, V, **f32)) if store_out else bufs
    BD, BM, stages = _scan_blocks(K, V, M, Hkv, plan)
    _state_scan_kernel[((K + V) // BD, plan.N * Hkv, M // BM)](
        xk, yk, xv, yv, b, *(init if init is not None else bufs), *bufs, *outs, plan.cu, plan.segoff,
        H=H, Hkv=Hkv, K=K, V=V, M=M, BS=plan.seg, BD=BD, BM=BM, HAS_INIT=init is not None, STORE_OUT=store_out,
        REVERSE=reverse, PREC=prec, num_warps=4, num_stages=stages,
    )  # fmt: skip
    return bufs, (outs if store_out else None)


def _wide(prec: dict[str, int], group: str, M: int) -> int:
    """A segment-at-once kernel's product precision. Their bf16 products with fewer than 64 slot columns came out
    wrong on an H100 (Triton 3.6: o off by 0.1-0.3 at M = 16 and 32, while fp16, tf32 and M = 64 were exact;
    docs/benchmarks.md): those take tf32."""
    return prec[group] if M >= 64 or prec[group] != PREC_BF16 else PREC_TF32


def _forward(q, k, v, s, b, scale, h0, final, plan, prec, keep_probs=False):
    """o and the final states (if ``final``), the per-segment states (hk_buf, hv_buf), and with ``keep_probs``
    the slot softmax and its log-sum-exp where the segment-at-once kernels run (else None); b: the running sums
    of the log gates (``_segment_cumsum``)."""
    Hkv, K, V, M = k.shape[1], k.shape[2], v.shape[2], s.shape[2]
    H = q.shape[1]
    (hk_buf, hv_buf), hT = _state_scan(k, s, v, s, b, h0, plan, prec["scan"], Hkv, M, final, reverse=False)
    o = _empty(q.shape[0], H, V, dtype=q.dtype, device=q.device)
    probs = None
    if not plan.NS:
        return o, hT, (hk_buf, hv_buf), probs
    if FWD_BLOCKS and M <= FWD_BLOCKS_MAX_SLOTS:
        p = _empty(q.shape[0], H, M, dtype=torch.float32, device=q.device)
        lse = _empty(q.shape[0], H, dtype=torch.float32, device=q.device) if keep_probs else p  # p: not written
        probs = (p, lse) if keep_probs else None
        cfg = dict(H=H, Hkv=Hkv, M=M, BS=plan.seg, BC=SUBCHUNK, EXP_CLAMP=EXP_CLAMP, num_warps=FWD_WARPS,
                   num_stages=NUM_STAGES)  # fmt: skip
        _slot_probs_kernel[(plan.NS, Hkv)](q, k, s, b, p, lse, hk_buf, plan.segs, plan.cu, scale, K=K,
                                           PREC_IN=prec["in"], PREC=_wide(prec, "sweep" if keep_probs else "out", M),
                                           STORE_LSE=keep_probs,
                                           **cfg)  # fmt: skip
        _out_blocks_kernel[(plan.NS, Hkv)](p, v, s, b, o, hv_buf, plan.segs, plan.cu, V=V, PREC=_wide(prec, "o", M),
                                           **cfg)  # fmt: skip
    else:
        _out_fwd_kernel[(plan.NS, Hkv)](
            q, k, v, s, b, o, hk_buf, hv_buf, plan.segs, plan.cu, scale,
            H=H, Hkv=Hkv, K=K, V=V, M=M, BS=plan.seg, BC=SUBCHUNK, PREC_IN=prec["in"], PREC=prec["out"],
            PREC_O=prec["o"], EXP_CLAMP=EXP_CLAMP, **_launch_cfg(K, V, M),
        )  # fmt: skip
    return o, hT, (hk_buf, hv_buf), probs


def _backward(q, k, v, s, b, scale, h0, plan, prec, do, dhT, saved=None, probs=None):
    """The gradients (dg in fp32); b: the log gates' running sums; ``saved``: the forward's per-segment states
    and final states, else scanned again; ``probs``: the forward's slot softmax and log-sum-exp, else recomputed
    in a walk."""
    H, K = q.shape[1], q.shape[2]
    Hkv, V, M = k.shape[1], v.shape[2], s.shape[2]
    need_final = dhT is not None
    if saved is not None:
        (hk_buf, hv_buf), hT = saved
    else:
        (hk_buf, hv_buf), hT = _state_scan(k, s, v, s, b, h0, plan, prec["scan"], Hkv, M, need_final, reverse=False)
    f32 = dict(dtype=torch.float32, device=q.device)
    dq = _empty(*q.shape, dtype=q.dtype, device=q.device)
    dz = _empty(q.shape[0], H, M, **f32)
    db = _empty(q.shape[0], Hkv, M, **f32)
    side = dict(H=H, Hkv=Hkv, M=M, BS=plan.seg, BC=SUBCHUNK, PREC_IN=prec["in"], EXP_CLAMP=EXP_CLAMP)
    cfg = dict(side, K=K, V=V, PREC=prec["sweep"])
    if probs is not None:
        p, lse = probs
        blocks = dict(side, PREC=_wide(prec, "sweep", M), num_warps=FWD_WARPS, num_stages=NUM_STAGES)
        _slot_grads_kernel[(plan.NS, Hkv)](do, v, s, b, hv_buf, p, lse, plan.segs, plan.cu, scale, dz, db, V=V,
                                           **blocks)  # fmt: skip
        del blocks["PREC_IN"]
        _out_blocks_kernel[(plan.NS, Hkv)](dz, k, s, b, dq, hk_buf, plan.segs, plan.cu, V=K, **blocks)  # dq
    else:
        p = _empty(q.shape[0], H, M, **f32)
        if plan.NS:
            _bwd_sweep_kernel[(plan.NS, Hkv)](
                q, k, v, s, b, do, hk_buf, hv_buf, plan.segs, plan.cu, scale, dq, p, dz, db, **cfg,
                **_launch_cfg(K, V, M),
            )  # fmt: skip
    dbufs, dh0 = _state_scan(q, dz, do, p, b, dhT, plan, prec["dscan"], Hkv, M, store_out=True, reverse=True)
    dk, dv, ds = (_empty(*x.shape, dtype=x.dtype, device=x.device) for x in (k, v, s))
    if not plan.NS:
        return dq, dk, dv, ds, db, dh0
    dsk, dsv = _empty(2, *s.shape, **f32)  # the two memories' shares of ds
    ck, cv = _empty(2, plan.NS, Hkv, M, **f32)  # ... and of dg's carries into the segments
    for x, a, y, dbuf, mbuf, dx, dspart, cpart, D in (
        (k, q, dz, dbufs[0], hk_buf, dk, dsk, ck, K),
        (v, do, p, dbufs[1], hv_buf, dv, dsv, cv, V),
    ):
        _bwd_rev_memory_kernel[(plan.NS, Hkv)](
            x, a, y, s, b, dbuf, mbuf, plan.segs, plan.cu, dx, dspart, cpart, D=D, PREC=prec["rev"], **side,
            **_launch_cfg(K, V, M),
        )  # fmt: skip
    if need_final:  # the final state's gradient reaches every gate of the sequence through exp(b_T)
        final = (hT[0] * dhT[0]).sum(2) + (hT[1] * dhT[1]).sum(3)  # [N, Hkv, M]
        seqs, last = plan.last_segments
        ck[last] += final[seqs]
    _gate_grad_kernel[(plan.NS, Hkv)](db, s, dsk, dsv, ds, ck, cv, plan.segs, plan.cu, Hkv=Hkv, M=M, BS=plan.seg)
    return dq, dk, dv, ds, db, dh0


# The autograd op as torch.library custom ops: eager calls and torch.compile graphs run the same code, and a
# compiled layer keeps the op inside its graph (Dynamo cannot trace the host side: the plans' memos). Measured
# on the SmolLM2-135M shape with compiled layers (batch 2, 2k / 4k / 8k tokens), a training step took 0.161 /
# 0.166 / 0.184 s with a graph break around the op, 0.120 / 0.120 / 0.156 s with the op in the graph (H100,
# docs/benchmarks.md, twelfth session). The namespace is the module's name, so that a saved model's copy of these
# kernels (trust_remote_code) registers its own ops beside the installed package's.
_NS = re.sub(r"\W", "_", __name__)
# Not for CUDA graphs: a replay would reuse the plan recorded with the graph, i.e. a packed batch's document layout
# from the recording, whatever the new cu_seqlens hold. With the tag, Inductor leaves the op outside its graphs.
_OP_TAGS = {"tags": (torch.Tag.cudagraph_unsafe,)} if hasattr(torch.Tag, "cudagraph_unsafe") else {}


def _kept(keep: bool, g_dtype: torch.dtype, M: int) -> tuple[bool, bool, bool]:
    """What a forward keeps for its backward: the gates' running sums (fp32 g: in a model g is an intermediate
    that only this op holds, so the sums take its place at no extra memory), the per-segment states, the slot
    softmax."""
    return (
        keep and g_dtype == torch.float32,
        keep and SAVE_STATES,
        keep and SAVE_PROBS and FWD_BLOCKS and M <= FWD_BLOCKS_MAX_SLOTS,
    )


def _gsa_fwd_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor, g: torch.Tensor, B: int, scale: float,
    hk0: torch.Tensor | None, hv0: torch.Tensor | None, cu_seqlens: torch.Tensor | None, final: bool, keep: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:  # fmt: skip
    """The B rows' tokens flattened ([B * T, heads, dim]) -> (o, hkT, hvT, and for a backward (``keep``): the
    running sums, hk_buf, hv_buf, p, lse); what is not computed or kept comes back empty (an op returns a fixed
    number of tensors)."""
    plan = _plan(B, q.shape[0] // B, cu_seqlens, q.device)
    sums, states, probs = _kept(keep, g.dtype, s.shape[2])
    b = _segment_cumsum(g, plan)
    h0 = (hk0, hv0) if hk0 is not None else None
    o, hT, bufs, kept_probs = _forward(q, k, v, s, b, scale, h0, final, plan, _precision(q.dtype), probs)
    none = q.new_empty  # outputs may not alias one another: a new empty tensor each
    return (
        o, *(hT if hT is not None else (none(0), none(0))), b if sums else none(0),
        *(bufs if states else (none(0), none(0))), *(kept_probs or (none(0), none(0))),
    )  # fmt: skip


_gsa_fwd = torch.library.custom_op(f"{_NS}::gsa_fwd", _gsa_fwd_impl, mutates_args=(), **_OP_TAGS)


@_gsa_fwd.register_fake
def _(q, k, v, s, g, B, scale, hk0, hv0, cu_seqlens, final, keep):
    BT, H, K = q.shape
    Hkv, V, M = k.shape[1], v.shape[2], s.shape[2]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    f32 = torch.float32
    none = q.new_empty  # as in the op: no two outputs alias
    sums, states, probs = _kept(keep, g.dtype, M)
    if states:  # a packed batch's segment count depends on cu_seqlens' values
        NS = (
            max(B * triton.cdiv(BT // B, SEGMENT), 1)
            if cu_seqlens is None
            else torch.library.get_ctx().new_dynamic_size()
        )
    return (
        none(BT, H, V),
        *((none(N, Hkv, K, M, dtype=f32), none(N, Hkv, M, V, dtype=f32)) if final else (none(0), none(0))),
        none(BT, Hkv, M, dtype=f32) if sums else none(0),
        *((none(NS, Hkv, K, M, dtype=f32), none(NS, Hkv, V, M, dtype=f32)) if states else (none(0), none(0))),
        *((none(BT, H, M, dtype=f32), none(BT, H, dtype=f32)) if probs else (none(0), none(0))),
    )  # fmt: skip


def _gsa_bwd_impl(
    do: torch.Tensor, dhkT: torch.Tensor | None, dhvT: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
    v: torch.Tensor, s: torch.Tensor, gates: torch.Tensor, gates_are_sums: bool, B: int, scale: float,
    hk0: torch.Tensor | None, hv0: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
    hk_buf: torch.Tensor | None, hv_buf: torch.Tensor | None, hkT: torch.Tensor | None, hvT: torch.Tensor | None,
    p: torch.Tensor | None, lse: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:  # fmt: skip
    """(dq, dk, dv, ds, dg in fp32, dhk0, dhv0; the last two empty without an initial state). ``gates``: the
    running sums if ``gates_are_sums``, else g; the kept states and softmax, where the forward kept them."""
    plan = _plan(B, q.shape[0] // B, cu_seqlens, q.device)
    b = gates if gates_are_sums else _segment_cumsum(gates, plan)
    h0 = (hk0, hv0) if hk0 is not None else None
    dhT = (dhkT, dhvT) if dhkT is not None else None
    saved = ((hk_buf, hv_buf), (hkT, hvT) if hkT is not None else None) if hk_buf is not None else None
    probs = (p, lse) if p is not None else None
    dq, dk, dv, ds, dg, dh0 = _backward(q, k, v, s, b, scale, h0, plan, _precision(q.dtype), do, dhT, saved, probs)
    return dq, dk, dv, ds, dg, *(dh0 if h0 is not None else (q.new_empty(0), q.new_empty(0)))


_gsa_bwd = torch.library.custom_op(f"{_NS}::gsa_bwd", _gsa_bwd_impl, mutates_args=(), **_OP_TAGS)


@_gsa_bwd.register_fake
def _(do, dhkT, dhvT, q, k, v, s, gates, gates_are_sums, B, scale, hk0, hv0, cu_seqlens, *kept):
    dh0 = (torch.empty_like(hk0), torch.empty_like(hv0)) if hk0 is not None else (q.new_empty(0), q.new_empty(0))
    return (*(torch.empty_like(x) for x in (q, k, v, s)), torch.empty_like(gates, dtype=torch.float32), *dh0)


def _gsa_setup_context(ctx, inputs, output) -> None:
    q, k, v, s, g, B, scale, hk0, hv0, cu_seqlens, final, keep = inputs
    _, hkT, hvT, sums, hk_buf, hv_buf, p, lse = output
    ctx.kept = _kept(keep, g.dtype, s.shape[2])
    kept_sums, kept_states, kept_probs = ctx.kept
    states = (hk_buf, hv_buf, *((hkT, hvT) if final else (None, None))) if kept_states else (None,) * 4
    ctx.save_for_backward(q, k, v, s, sums if kept_sums else g, hk0, hv0, cu_seqlens, *states,
                          *((p, lse) if kept_probs else (None, None)))  # fmt: skip
    ctx.B, ctx.scale, ctx.g_dtype = B, scale, g.dtype
    ctx.set_materialize_grads(False)  # an unused output then costs the backward nothing


def _gsa_backward(ctx, do, dhkT, dhvT, *_kept_outputs, bwd=_gsa_bwd):
    q, k, v, s, gates, hk0, hv0, cu_seqlens, *kept = ctx.saved_tensors
    do = q.new_zeros(*q.shape[:2], v.shape[2]) if do is None else do.contiguous()
    if dhkT is not None or dhvT is not None:  # one final state used: the other's gradient is zero
        N = ctx.B if cu_seqlens is None else cu_seqlens.shape[0] - 1
        Hkv, K, V, M = k.shape[1], k.shape[2], v.shape[2], s.shape[2]
        dhkT = q.new_zeros(N, Hkv, K, M, dtype=torch.float32) if dhkT is None else dhkT.contiguous()
        dhvT = q.new_zeros(N, Hkv, M, V, dtype=torch.float32) if dhvT is None else dhvT.contiguous()
    dq, dk, dv, ds, dg, dhk0, dhv0 = bwd(do, dhkT, dhvT, q, k, v, s, gates, ctx.kept[0], ctx.B, ctx.scale, hk0, hv0,
                                         cu_seqlens, *kept)  # fmt: skip
    dh0 = (dhk0, dhv0) if hk0 is not None else (None, None)
    return dq, dk, dv, ds, dg.to(ctx.g_dtype), None, None, *dh0, None, None, None


_gsa_fwd.register_autograd(_gsa_backward, setup_context=_gsa_setup_context)


class _GSAFunction(torch.autograd.Function):
    """Eager calls: the ops' own code and autograd formula without the dispatcher's round trips, which cost about
    0.4 ms of host time per fwd+bwd (a small model's step is bound by host time; twelfth session)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _gsa_fwd_impl(*inputs)
        _gsa_setup_context(ctx, inputs, output)
        return output[:3]  # what it keeps need not be outputs here (autograd tracks each output: host time)

    @staticmethod
    def backward(ctx, *grads):
        return _gsa_backward(ctx, *grads, bwd=_gsa_bwd_impl)


def gsa_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Chunked GSA forward and backward in Triton; the contract of ``gsa_reference.gsa_recurrent``."""
    from .gsa_reference import _check

    _check(q, k, v, s, g, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else float(scale)
    flat = [x.reshape(B * T, *x.shape[2:]).contiguous() for x in (q, k, v, s, g)]
    hk0, hv0 = (x.float().contiguous() for x in initial_state) if initial_state is not None else (None, None)
    keep = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, s, g, hk0, hv0))
    op = _gsa_fwd if torch.compiler.is_compiling() else _GSAFunction.apply  # see _GSAFunction
    o, hkT, hvT, *_ = op(*flat, B, scale, hk0, hv0, cu_seqlens, output_final_state, keep)
    return o.view(B, T, H, -1), ((hkT, hvT) if output_final_state else None)


def gsa_decode_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor, g: torch.Tensor, scale: float | None,
    state: State,
) -> torch.Tensor:  # fmt: skip
    """A few new tokens on top of ``state``, which is updated in place (fp32, contiguous); returns o."""
    B, T, H, K = q.shape
    Hkv, V, M = k.shape[2], v.shape[3], s.shape[3]
    hk, hv = state
    if not (hk.is_contiguous() and hv.is_contiguous() and hk.dtype == hv.dtype == torch.float32):
        raise ValueError("in-place decoding needs contiguous fp32 state tensors")
    q, k, v, s, g = (x.contiguous() for x in (q, k, v, s, g))
    o = _empty(B, T, H, V, dtype=q.dtype, device=q.device)
    scale = K**-0.5 if scale is None else float(scale)
    if T == 1 and DECODE_BLOCK:
        _decode_step_kernel[(B * Hkv,)](q, k, v, s, g, o, hk, hv, scale, H=H, Hkv=Hkv, K=K, V=V, M=M,
                                        GP=triton.next_power_of_2(H // Hkv), BK=min(K, DECODE_BLOCK),
                                        BV=min(V, DECODE_BLOCK), num_warps=DECODE_WARPS)  # fmt: skip
    else:
        _decode_kernel[(B * Hkv,)](q, k, v, s, g, o, hk, hv, scale, T, H=H, Hkv=Hkv, K=K, V=V, M=M,
                                   num_warps=DECODE_WARPS)  # fmt: skip
    return o
