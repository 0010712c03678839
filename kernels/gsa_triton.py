"""Triton kernels for Gated Slot Attention: chunked forward/backward and a fused in-place decode step.

Same contract as :mod:`gsa_reference` (the oracle these are tested against): q [B, T, H, K], k [B, T, Hkv, K],
v [B, T, Hkv, V], s, g [B, T, Hkv, M], state (hk [N, Hkv, K, M], hv [N, Hkv, M, V]) in fp32, optional packed
sequences through ``cu_seqlens``. Every batch is handled as packed: a plain [B, T] batch is B sequences of T.

How the work is split (per KV head; the G query heads of a group share all state work):
- ``_state_fwd``: a sequential scan over segments of BS tokens that writes the memories at every segment
  start (and the final state). Its updates use only decays exp(b_last - b) <= 1, so nothing can overflow.
- Sweeps: one program per segment, starting from that segment's state, walks sub-chunks of BC tokens with
  one memory ([D, M] fp32, the scans' layout) in registers; sweeps carrying both memories were register- and
  latency-bound. Inside a sub-chunk the decay exp(b_t - b_j) is split at r = b_last / 2 into
  exp(b_t - r) * exp(r - b_j), so both passes are matmuls; each factor is at most exp(|b_last| / 2).
- The passes meet only at the slot softmax, so the forward runs ``_logits_fwd`` (hk: the logits z) then
  ``_out_v_fwd`` (hv: o), and keeps z (fp32) for the backward, which then never recomputes pass 1.
- Backward: ``_state_fwd`` again; ``_dz_sweep`` (hv: dp, dz, the read-side gate summands; it stores
  p = softmax(z) for the hv gradient's scan and ``_rev_v``) then ``_dq_sweep`` (hk); ``_state_bwd`` (reverse
  scans of the memories' gradients); ``_rev_k`` (dhk: dk, k's part of ds) then ``_rev_v`` (dhv: dv, the rest
  of ds, -s * ds into the gate summands); a per-sequence reverse cumulative sum turns the summands into dg.
  dp has pass 1's form (do, v as query and key) and dq pass 2's (dz as slot weights), so the four forward
  walks share two read helpers and the two reverse walks one body.

The gate gradient uses d/d b_t = dlog_t * z_t + p_t * dp_t - s_t * ds_t (z the slot logits, dlog their gradient,
b the running sum of g), because b_t scales every read at t by exp(b_t) and every write at t by exp(-b_t); dg
is its reverse cumulative sum; dz = scale * dlog is the gradient of the unscaled reads q . hk.

Exactness bound: a sub-chunk's factors stay finite while its total decay |b_last| <= 2 * EXP_CLAMP nats, i.e.
log alpha >= -7.5 per token on average over 16 tokens (with tau = 8: any slot-gate logit f >= -60). Beyond that
the factors are clamped (finite, not exact); the PyTorch reference stays exact for any gate.
"""

from __future__ import annotations

import os

import torch

try:  # a try block, so that transformers' trust_remote_code import check does not demand triton on CPU machines
    import triton
    import triton.language as tl
except ImportError as err:
    raise ImportError("the GSA Triton kernels need triton (pip install 't2r[cuda]')") from err

State = tuple[torch.Tensor, torch.Tensor]
EXP_CLAMP = 60.0

# Tunables (chosen on an H100; see docs/benchmarks.md): segment length between stored states, sub-chunk length.
SEGMENT = int(os.environ.get("T2R_GSA_SEGMENT", "64"))
SUBCHUNK = int(os.environ.get("T2R_GSA_SUBCHUNK", "16"))
DOT_MODE = os.environ.get("T2R_GSA_DOT", "tf32")  # "tf32" or "half" for bf16/fp16 inputs
STATE_BLOCK = int(os.environ.get("T2R_GSA_STATE_BLOCK", "32"))  # rows of a memory per scan program
NUM_STAGES = int(os.environ.get("T2R_GSA_STAGES", "2"))
NUM_WARPS = int(os.environ.get("T2R_GSA_WARPS", "0"))  # 0: by tile size
SWEEP_WARPS = int(os.environ.get("T2R_GSA_SWEEP_WARPS", "0"))  # the one-memory sweeps; 0: as T2R_GSA_WARPS

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
def _load_rows(ptr, t, valid, heads, head, D: tl.constexpr):
    """[len(t), D] tile of a token-major [T, heads, D] tensor, zero outside ``valid``, as fp32."""
    rd = tl.arange(0, D)
    x = tl.load(ptr + (t[:, None] * heads + head) * D + rd[None, :], mask=valid[:, None], other=0.0)
    return x.to(tl.float32)


@triton.jit
def _load_cols(ptr, t, valid, heads, head, D: tl.constexpr, d0, BD: tl.constexpr):
    """Columns d0 .. d0 + BD of a token-major [T, heads, D] tensor, as fp32."""
    rd = d0 + tl.arange(0, BD)
    x = tl.load(ptr + (t[:, None] * heads + head) * D + rd[None, :], mask=valid[:, None], other=0.0)
    return x.to(tl.float32)


@triton.jit
def _store_rows(ptr, x, t, valid, heads, head, D: tl.constexpr):
    rd = tl.arange(0, D)
    tl.store(ptr + (t[:, None] * heads + head) * D + rd[None, :], x.to(ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _state_ptrs(base, D: tl.constexpr, M: tl.constexpr, stride_d, stride_m):
    rd = tl.arange(0, D)
    rm = tl.arange(0, M)
    return base + rd[:, None] * stride_d + rm[None, :] * stride_m


@triton.jit
def _subchunk_gates(s, g, EXP_CLAMP: tl.constexpr):
    """Decay factors of one sub-chunk (rows = tokens, columns = slots): query side exp(b - r), key side
    exp(r - b) (times s: ``ek``; without: ``erb``), to the sub-chunk start exp(b), to its end s * exp(b_last - b),
    and the whole sub-chunk's decay exp(b_last)."""
    b = tl.cumsum(g, axis=0)
    b_last = tl.sum(g, axis=0)
    r = 0.5 * b_last
    eq = tl.exp(tl.minimum(b - r[None, :], EXP_CLAMP))
    erb = tl.exp(tl.minimum(r[None, :] - b, EXP_CLAMP))
    eb = tl.exp(b)
    eend = tl.exp(b_last[None, :] - b)
    return eq, erb, s * erb, eb, eend, s * eend, tl.exp(b_last)


# ----------------------------------------------------------------------------------------------------------
# Scans over segments: forward memories, and their gradients in reverse.


@triton.jit
def _scan_setup(cu_ptr, segoff_ptr, stride_pd, stride_pm, Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr,
                BD: tl.constexpr):  # fmt: skip
    """A scan program's rows (d0), KV head, sequence bounds, first segment, and its block's offsets in the public
    state layout and in the per-segment buffers."""
    d0 = tl.program_id(0) * BD
    i_nh = tl.program_id(1)
    n = i_nh // Hkv
    bos = tl.load(cu_ptr + n).to(tl.int64)
    eos = tl.load(cu_ptr + n + 1).to(tl.int64)
    seg0 = tl.load(segoff_ptr + n).to(tl.int64)
    public = _state_ptrs(i_nh.to(tl.int64) * D * M + d0 * stride_pd, BD, M, stride_pd, stride_pm)
    internal = _state_ptrs(d0 * M, BD, M, M, 1)
    return d0, i_nh % Hkv, bos, eos, seg0, public, internal


@triton.jit
def _state_fwd_kernel(
    x_ptr, s_ptr, g_ptr, h0_ptr, hbuf_ptr, hT_ptr, cu_ptr, segoff_ptr,
    stride_pd, stride_pm,
    Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Rows d0 .. d0 + BD of one memory (hk with x = k, or hv transposed with x = v) of one sequence and KV head:
    the state at each segment start into hbuf [NS, Hkv, D, M]; h0/hT in the public layout given by
    (stride_pd, stride_pm)."""
    d0, h, bos, eos, seg0, public, internal = _scan_setup(cu_ptr, segoff_ptr, stride_pd, stride_pm, Hkv, D, M, BD)
    if HAS_H0:
        state = tl.load(h0_ptr + public).to(tl.float32)
    else:
        state = tl.zeros([BD, M], dtype=tl.float32)
    rt = tl.arange(0, BS)
    nseg = tl.cdiv(eos - bos, BS)
    for i in range(nseg):
        tl.store(hbuf_ptr + ((seg0 + i) * Hkv + h) * D * M + internal, state)
        t = bos + i * BS + rt
        valid = t < eos
        x = _load_cols(x_ptr, t, valid, Hkv, h, D, d0, BD)
        s = _load_rows(s_ptr, t, valid, Hkv, h, M)
        g = _load_rows(g_ptr, t, valid, Hkv, h, M)
        b = tl.cumsum(g, axis=0)
        b_last = tl.sum(g, axis=0)
        w = s * tl.exp(b_last[None, :] - b)
        state = state * tl.exp(b_last)[None, :] + _mm(tl.trans(x), w, PREC)
    if STORE_FINAL:
        tl.store(hT_ptr + public, state)


@triton.jit
def _state_bwd_kernel(
    x_ptr, y_ptr, g_ptr, dhT_ptr, dbuf_ptr, dh0_ptr, cu_ptr, segoff_ptr,
    stride_pd, stride_pm,
    H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Reverse scan of one memory's gradient (rows d0 .. d0 + BD): the gradient at each segment end into
    dbuf [NS, Hkv, D, M]; each token t of query head h adds x_t (y_t * exp(b_t))^T (x = q, y = dz for hk;
    x = do, y = p for hv)."""
    G: tl.constexpr = H // Hkv
    d0, h, bos, eos, seg0, public, internal = _scan_setup(cu_ptr, segoff_ptr, stride_pd, stride_pm, Hkv, D, M, BD)
    if HAS_DHT:
        dstate = tl.load(dhT_ptr + public).to(tl.float32)
    else:
        dstate = tl.zeros([BD, M], dtype=tl.float32)
    rt = tl.arange(0, BS)
    nseg = tl.cdiv(eos - bos, BS)
    for j in range(nseg):
        i = nseg - 1 - j
        tl.store(dbuf_ptr + ((seg0 + i) * Hkv + h) * D * M + internal, dstate)
        t = bos + i * BS + rt
        valid = t < eos
        g = _load_rows(g_ptr, t, valid, Hkv, h, M)
        eb = tl.exp(tl.cumsum(g, axis=0))
        dstate = dstate * tl.exp(tl.sum(g, axis=0))[None, :]
        for gi in tl.static_range(G):
            x = _load_cols(x_ptr, t, valid, H, h * G + gi, D, d0, BD)
            y = _load_rows(y_ptr, t, valid, H, h * G + gi, M)
            dstate += _mm(tl.trans(x), y * eb, PREC)
    if STORE_DH0:
        tl.store(dh0_ptr + public, dstate)


# ----------------------------------------------------------------------------------------------------------
# Per-segment walks over sub-chunks, each carrying one memory (or its gradient) as [D, M].


@triton.jit
def _segment_start(seg_ptr, cu_ptr, mem_ptr, Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr):
    """A sweep program's KV head, first token, sequence end, and the memory it carries at its segment's start
    (for a reverse walk: the memory's gradient at the segment's end)."""
    i_s = tl.program_id(0)
    h = tl.program_id(1)
    n = tl.load(seg_ptr + 2 * i_s)
    t0 = tl.load(seg_ptr + 2 * i_s + 1).to(tl.int64)
    eos = tl.load(cu_ptr + n + 1).to(tl.int64)
    mem = tl.load(mem_ptr + (i_s.to(tl.int64) * Hkv + h) * D * M + _state_ptrs(0, D, M, M, 1))
    return h, t0, eos, mem


@triton.jit
def _load_subchunk(x_ptr, s_ptr, g_ptr, t, valid, Hkv: tl.constexpr, h, D: tl.constexpr, M: tl.constexpr):
    """A sub-chunk's keys (k or v), write weights and log gates of KV head h (fp32, zero past the sequence)."""
    xc = _load_rows(x_ptr, t, valid, Hkv, h, D)
    sc = _load_rows(s_ptr, t, valid, Hkv, h, M)
    gc = _load_rows(g_ptr, t, valid, Hkv, h, M)
    return xc, sc, gc


@triton.jit
def _causal_mm(a, b, BC: tl.constexpr, PREC: tl.constexpr):
    """a b^T without the entries of later keys than queries: a sub-chunk's reads of its own writes."""
    rc = tl.arange(0, BC)
    return tl.where(rc[:, None] >= rc[None, :], _mm(a, tl.trans(b), PREC), 0.0)


@triton.jit
def _to_slots(x, xk, mem, eq, ek, eb, BC: tl.constexpr, PREC_IN: tl.constexpr, PREC: tl.constexpr):
    """Reads of the memory [D, M] by the rows of x [BC, D], each at its own token (the sub-chunk's earlier
    writes, keys xk, included): pass 1's q -> logits; in the backward, do -> dp."""
    return _mm(x, mem, PREC) * eb + _mm(_causal_mm(x, xk, BC, PREC_IN), ek, PREC) * eq


@triton.jit
def _from_slots(y, xk, mem, eq, ek, eb, BC: tl.constexpr, PREC: tl.constexpr):
    """The transposed read: slot weights y [BC, M] through the memory [D, M] and the sub-chunk's keys xk:
    pass 2's p -> o; in the backward, dz -> dq."""
    return _mm(y * eb, tl.trans(mem), PREC) + _mm(_causal_mm(y * eq, ek, BC, PREC), xk, PREC)


@triton.jit
def _advance(mem, xk, w, decay, PREC: tl.constexpr):
    """The memory [D, M] from a sub-chunk's start to its end."""
    return mem * decay[None, :] + _mm(tl.trans(xk), w, PREC)


@triton.jit
def _softmax(z):
    """The slot softmax of logits z [BC, M], row-wise."""
    e = tl.exp(z - tl.max(z, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _logits_fwd_kernel(
    seg_ptr, cu_ptr, hk_ptr, q_ptr, k_ptr, s_ptr, g_ptr, z_ptr, scale,
    H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr,
    BS: tl.constexpr, BC: tl.constexpr, PREC_IN: tl.constexpr, PREC: tl.constexpr, EXP_CLAMP: tl.constexpr,
):  # fmt: skip
    """Pass 1 (carries hk): the slot logits z = scale * q . hk of every query head, fp32."""
    G: tl.constexpr = H // Hkv
    h, t0, eos, hk = _segment_start(seg_ptr, cu_ptr, hk_ptr, Hkv, D, M)
    for c in range(0, BS, BC):
        t = t0 + c + tl.arange(0, BC)
        valid = t < eos
        kc, sc, gc = _load_subchunk(k_ptr, s_ptr, g_ptr, t, valid, Hkv, h, D, M)
        eq, _, ek, eb, _, w, decay = _subchunk_gates(sc, gc, EXP_CLAMP)
        for gi in tl.static_range(G):
            qc = _load_rows(q_ptr, t, valid, H, h * G + gi, D)
            z = scale * _to_slots(qc, kc, hk, eq, ek, eb, BC, PREC_IN, PREC)
            _store_rows(z_ptr, z, t, valid, H, h * G + gi, M)
        hk = _advance(hk, kc, w, decay, PREC)


@triton.jit
def _from_slots_walk(seg_ptr, cu_ptr, mem_ptr, y_ptr, x_ptr, s_ptr, g_ptr, out_ptr,
                     H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BS: tl.constexpr,
                     BC: tl.constexpr, PREC: tl.constexpr, EXP_CLAMP: tl.constexpr, SOFTMAX: tl.constexpr):  # fmt: skip
    """A forward walk writing out = _from_slots(y) for every query head (y = softmax of the loaded rows if
    SOFTMAX), keys x, carrying the memory of x."""
    G: tl.constexpr = H // Hkv
    h, t0, eos, mem = _segment_start(seg_ptr, cu_ptr, mem_ptr, Hkv, D, M)
    for c in range(0, BS, BC):
        t = t0 + c + tl.arange(0, BC)
        valid = t < eos
        xc, sc, gc = _load_subchunk(x_ptr, s_ptr, g_ptr, t, valid, Hkv, h, D, M)
        eq, _, ek, eb, _, w, decay = _subchunk_gates(sc, gc, EXP_CLAMP)
        for gi in tl.static_range(G):
            y = _load_rows(y_ptr, t, valid, H, h * G + gi, M)
            if SOFTMAX:
                y = _softmax(y)
            out = _from_slots(y, xc, mem, eq, ek, eb, BC, PREC)
            _store_rows(out_ptr, out, t, valid, H, h * G + gi, D)
        mem = _advance(mem, xc, w, decay, PREC)


@triton.jit
def _out_v_fwd_kernel(
    seg_ptr, cu_ptr, hv_ptr, z_ptr, v_ptr, s_ptr, g_ptr, o_ptr,
    H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr,
    BS: tl.constexpr, BC: tl.constexpr, PREC_IN: tl.constexpr, PREC: tl.constexpr, EXP_CLAMP: tl.constexpr,
):  # fmt: skip
    """Pass 2 (carries hv): o from p = softmax(z)."""
    _from_slots_walk(seg_ptr, cu_ptr, hv_ptr, z_ptr, v_ptr, s_ptr, g_ptr, o_ptr, H, Hkv, D, M, BS, BC, PREC,
                     EXP_CLAMP, True)  # fmt: skip


@triton.jit
def _dz_sweep_kernel(
    seg_ptr, cu_ptr, hv_ptr, do_ptr, z_ptr, v_ptr, s_ptr, g_ptr, p_ptr, dz_ptr, db_ptr, scale,
    H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr,
    BS: tl.constexpr, BC: tl.constexpr, PREC_IN: tl.constexpr, PREC: tl.constexpr, EXP_CLAMP: tl.constexpr,
):  # fmt: skip
    """Backward of pass 2 and the softmax (carries hv): p, dp (pass 1's form with do and v as query and key),
    dz = scale * p * (dp - sum(p dp)), and the read-side gate summands dlog * z + p * dp."""
    G: tl.constexpr = H // Hkv
    h, t0, eos, hv = _segment_start(seg_ptr, cu_ptr, hv_ptr, Hkv, D, M)
    for c in range(0, BS, BC):
        t = t0 + c + tl.arange(0, BC)
        valid = t < eos
        vc, sc, gc = _load_subchunk(v_ptr, s_ptr, g_ptr, t, valid, Hkv, h, D, M)
        eq, _, ek, eb, _, w, decay = _subchunk_gates(sc, gc, EXP_CLAMP)
        db = tl.zeros([BC, M], dtype=tl.float32)
        for gi in tl.static_range(G):
            z = _load_rows(z_ptr, t, valid, H, h * G + gi, M)
            p = _softmax(z)
            doc = _load_rows(do_ptr, t, valid, H, h * G + gi, D)
            dp = _to_slots(doc, vc, hv, eq, ek, eb, BC, PREC_IN, PREC)
            dlog = p * (dp - tl.sum(p * dp, axis=1)[:, None])
            _store_rows(p_ptr, p, t, valid, H, h * G + gi, M)
            _store_rows(dz_ptr, scale * dlog, t, valid, H, h * G + gi, M)
            db += dlog * z + p * dp
        _store_rows(db_ptr, db, t, valid, Hkv, h, M)
        hv = _advance(hv, vc, w, decay, PREC)


@triton.jit
def _dq_sweep_kernel(
    seg_ptr, cu_ptr, hk_ptr, dz_ptr, k_ptr, s_ptr, g_ptr, dq_ptr,
    H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr,
    BS: tl.constexpr, BC: tl.constexpr, PREC_IN: tl.constexpr, PREC: tl.constexpr, EXP_CLAMP: tl.constexpr,
):  # fmt: skip
    """Backward of pass 1 into q (carries hk): dq, pass 2's form with dz as the slot weights."""
    _from_slots_walk(seg_ptr, cu_ptr, hk_ptr, dz_ptr, k_ptr, s_ptr, g_ptr, dq_ptr, H, Hkv, D, M, BS, BC, PREC,
                     EXP_CLAMP, False)  # fmt: skip


@triton.jit
def _rev_subchunk(x_ptr, y_ptr, xk_ptr, s_ptr, g_ptr, dmem, t, valid,
                  H: tl.constexpr, Hkv: tl.constexpr, h, D: tl.constexpr, M: tl.constexpr, BC: tl.constexpr,
                  PREC_IN: tl.constexpr, PREC: tl.constexpr, EXP_CLAMP: tl.constexpr):  # fmt: skip
    """One sub-chunk of a reverse walk over one memory (x, y, keys xk = q, dz, k for hk; do, p, v for hv): the
    keys' gradient, this memory's share of ds, s, and dmem carried back to the sub-chunk's start."""
    G: tl.constexpr = H // Hkv
    xk, sc, gc = _load_subchunk(xk_ptr, s_ptr, g_ptr, t, valid, Hkv, h, D, M)
    eq, erb, ek, eb, eend, w, decay = _subchunk_gates(sc, gc, EXP_CLAMP)
    dxk = _mm(w, tl.trans(dmem), PREC)
    ds = eend * _mm(xk, dmem, PREC)
    ds_in = tl.zeros([BC, M], dtype=tl.float32)
    dmem = dmem * decay[None, :]
    for gi in tl.static_range(G):
        x = _load_rows(x_ptr, t, valid, H, h * G + gi, D)
        y = _load_rows(y_ptr, t, valid, H, h * G + gi, M)
        dxk += _mm(tl.trans(_causal_mm(y * eq, ek, BC, PREC)), x, PREC)
        ds_in += _mm(tl.trans(_causal_mm(x, xk, BC, PREC_IN)), y * eq, PREC)
        dmem += _mm(tl.trans(x), y * eb, PREC)
    return dxk, ds + ds_in * erb, sc, dmem


@triton.jit
def _rev_k_kernel(
    seg_ptr, cu_ptr, dhk_ptr, q_ptr, dz_ptr, k_ptr, s_ptr, g_ptr, dk_ptr, ds_ptr,
    H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr,
    BS: tl.constexpr, BC: tl.constexpr, PREC_IN: tl.constexpr, PREC: tl.constexpr, EXP_CLAMP: tl.constexpr,
):  # fmt: skip
    """Reverse walk carrying dhk: dk, and k's share of ds (fp32, completed by _rev_v_kernel)."""
    h, t0, eos, dhk = _segment_start(seg_ptr, cu_ptr, dhk_ptr, Hkv, D, M)
    for j in range(0, BS, BC):
        t = t0 + BS - BC - j + tl.arange(0, BC)
        valid = t < eos
        dk, ds, _, dhk = _rev_subchunk(q_ptr, dz_ptr, k_ptr, s_ptr, g_ptr, dhk, t, valid, H, Hkv, h, D, M, BC,
                                       PREC_IN, PREC, EXP_CLAMP)  # fmt: skip
        _store_rows(dk_ptr, dk, t, valid, Hkv, h, D)
        _store_rows(ds_ptr, ds, t, valid, Hkv, h, M)


@triton.jit
def _rev_v_kernel(
    seg_ptr, cu_ptr, dhv_ptr, do_ptr, p_ptr, v_ptr, s_ptr, g_ptr, ds_k_ptr, dv_ptr, ds_ptr, db_ptr,
    H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr,
    BS: tl.constexpr, BC: tl.constexpr, PREC_IN: tl.constexpr, PREC: tl.constexpr, EXP_CLAMP: tl.constexpr,
):  # fmt: skip
    """Reverse walk carrying dhv: dv, ds (v's share added to k's), and the gate summands' -s * ds."""
    h, t0, eos, dhv = _segment_start(seg_ptr, cu_ptr, dhv_ptr, Hkv, D, M)
    for j in range(0, BS, BC):
        t = t0 + BS - BC - j + tl.arange(0, BC)
        valid = t < eos
        dv, ds, sc, dhv = _rev_subchunk(do_ptr, p_ptr, v_ptr, s_ptr, g_ptr, dhv, t, valid, H, Hkv, h, D, M, BC,
                                        PREC_IN, PREC, EXP_CLAMP)  # fmt: skip
        ds += _load_rows(ds_k_ptr, t, valid, Hkv, h, M)
        _store_rows(dv_ptr, dv, t, valid, Hkv, h, D)
        _store_rows(ds_ptr, ds, t, valid, Hkv, h, M)
        db = _load_rows(db_ptr, t, valid, Hkv, h, M) - sc * ds
        _store_rows(db_ptr, db, t, valid, Hkv, h, M)


@triton.jit
def _rev_cumsum_kernel(x_ptr, init_ptr, cu_ptr, Hkv: tl.constexpr, M: tl.constexpr, BT: tl.constexpr,
                       HAS_INIT: tl.constexpr):  # fmt: skip
    """In place: x_t <- init + sum_{t' >= t} x_t' within each sequence (the gate gradient from its summands)."""
    i_nh = tl.program_id(0)
    n = i_nh // Hkv
    h = i_nh % Hkv
    bos = tl.load(cu_ptr + n).to(tl.int64)
    eos = tl.load(cu_ptr + n + 1).to(tl.int64)
    rm = tl.arange(0, M)
    if HAS_INIT:
        carry = tl.load(init_ptr + i_nh * M + rm)
    else:
        carry = tl.zeros([M], dtype=tl.float32)
    rt = tl.arange(0, BT)
    for i in range(tl.cdiv(eos - bos, BT)):
        t = eos - (i + 1) * BT + rt
        valid = t >= bos
        x = _load_rows(x_ptr, t, valid, Hkv, h, M)
        _store_rows(x_ptr, tl.cumsum(x, axis=0, reverse=True) + carry[None, :], t, valid, Hkv, h, M)
        carry += tl.sum(x, axis=0)


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


# ----------------------------------------------------------------------------------------------------------
# Host side.


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> bool:
    """Shapes the kernels handle: power-of-two head dims and slots of at least 16 (tensor-core tiles)."""

    def ok(n: int) -> bool:
        return n >= 16 and n & (n - 1) == 0 and n <= 256

    return ok(q.shape[-1]) and ok(v.shape[-1]) and ok(s.shape[-1]) and s.shape[-1] <= 128


def _precision(dtype: torch.dtype) -> tuple[int, int]:
    """Operand precisions of the kernels' matmuls: (products of two input tensors, everything else).

    Products of two half-precision inputs (q k^T, do v^T) are exact in half precision. The other products
    take fp32 intermediates (memories, slot weights, decay factors): in tf32 by default (10 mantissa bits
    instead of 7, about 8x less rounding) or, with T2R_GSA_DOT=half, in the inputs' half precision."""
    if dtype in (torch.bfloat16, torch.float16):
        half = PREC_BF16 if dtype == torch.bfloat16 else PREC_FP16
        if INTERPRETED:
            half = PREC_BF16_EMULATED if dtype == torch.bfloat16 else PREC_FP16_EMULATED
        rest = half if DOT_MODE == "half" else (PREC_IEEE if INTERPRETED else PREC_TF32)
        return half, rest
    if INTERPRETED or not torch.backends.cuda.matmul.allow_tf32:
        return PREC_IEEE, PREC_IEEE
    return PREC_TF32, PREC_TF32


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


def _launch_cfg(D: int, M: int, warps: int = 0) -> dict:
    """Warps: ``warps``, else T2R_GSA_WARPS, else by the largest memory a program keeps in registers (D x M)."""
    return {"num_warps": warps or NUM_WARPS or (8 if D * M >= 128 * 64 else 4), "num_stages": NUM_STAGES}


def _state_scan(x, s, g, h0, plan, public_strides, prec, final: bool):
    """Memory states at every segment start [NS, Hkv, D, M] (and the final state in the public layout)."""
    Hkv, D, M = x.shape[1], x.shape[2], s.shape[2]
    hbuf = _empty(max(plan.NS, 1), Hkv, D, M, dtype=torch.float32, device=x.device)
    shape = (plan.N, Hkv, D, M) if public_strides == (M, 1) else (plan.N, Hkv, M, D)
    hT = _empty(*shape, dtype=torch.float32, device=x.device) if final else hbuf
    BD = min(D, STATE_BLOCK)
    _state_fwd_kernel[(D // BD, plan.N * Hkv)](
        x, s, g, h0 if h0 is not None else hbuf, hbuf, hT, plan.cu, plan.segoff, *public_strides,
        Hkv=Hkv, D=D, M=M, BS=plan.seg, BD=BD, HAS_H0=h0 is not None, STORE_FINAL=final, PREC=prec[1],
        num_warps=4, num_stages=NUM_STAGES,
    )  # fmt: skip
    return hbuf, (hT if final else None)


def _sweep(kernel, plan, D, mem, *args, H, Hkv, M, prec):
    """One program per (segment, KV head), carrying one memory [D, M] from ``mem`` [NS, Hkv, D, M]."""
    if plan.NS:
        kernel[(plan.NS, Hkv)](
            plan.segs, plan.cu, mem, *args,
            H=H, Hkv=Hkv, D=D, M=M, BS=plan.seg, BC=SUBCHUNK, PREC_IN=prec[0], PREC=prec[1], EXP_CLAMP=EXP_CLAMP,
            **_launch_cfg(D, M, SWEEP_WARPS),
        )  # fmt: skip


def _forward(q, k, v, s, g, scale, h0, final, plan, prec):
    """o, the slot logits z [T, H, M] (fp32, for the backward) and the final state."""
    H, Hkv, K, V, M = q.shape[1], k.shape[1], k.shape[2], v.shape[2], s.shape[2]
    hk_buf, hkT = _state_scan(k, s, g, h0[0] if h0 else None, plan, (M, 1), prec, final)
    hv_buf, hvT = _state_scan(v, s, g, h0[1] if h0 else None, plan, (1, V), prec, final)
    z = _empty(q.shape[0], H, M, dtype=torch.float32, device=q.device)
    o = _empty(q.shape[0], H, V, dtype=q.dtype, device=q.device)
    dims = dict(H=H, Hkv=Hkv, M=M, prec=prec)
    _sweep(_logits_fwd_kernel, plan, K, hk_buf, q, k, s, g, z, scale, **dims)
    _sweep(_out_v_fwd_kernel, plan, V, hv_buf, z, v, s, g, o, **dims)
    return o, z, ((hkT, hvT) if final else None)


def _backward(q, k, v, s, g, z, scale, h0, plan, prec, do, dhT):
    H, Hkv, K, V, M = q.shape[1], k.shape[1], k.shape[2], v.shape[2], s.shape[2]
    need_final = dhT is not None
    hk_buf, hkT = _state_scan(k, s, g, h0[0] if h0 else None, plan, (M, 1), prec, need_final)
    hv_buf, hvT = _state_scan(v, s, g, h0[1] if h0 else None, plan, (1, V), prec, need_final)
    f32 = dict(dtype=torch.float32, device=q.device)
    dq = _empty(*q.shape, dtype=q.dtype, device=q.device)
    p = _empty(q.shape[0], H, M, **f32)
    dz = _empty(q.shape[0], H, M, **f32)
    db = _empty(q.shape[0], Hkv, M, **f32)
    dims = dict(H=H, Hkv=Hkv, M=M, prec=prec)
    _sweep(_dz_sweep_kernel, plan, V, hv_buf, do, z, v, s, g, p, dz, db, scale, **dims)
    _sweep(_dq_sweep_kernel, plan, K, hk_buf, dz, k, s, g, dq, **dims)
    dh0 = (_empty(plan.N, Hkv, K, M, **f32), _empty(plan.N, Hkv, M, V, **f32))
    dbufs = []
    for x, y, dh, d0, strides, D in ((q, dz, dhT[0] if dhT else None, dh0[0], (M, 1), K),
                                     (do, p, dhT[1] if dhT else None, dh0[1], (1, V), V)):  # fmt: skip
        dbuf = _empty(max(plan.NS, 1), Hkv, D, M, **f32)
        BD = min(D, STATE_BLOCK)
        _state_bwd_kernel[(D // BD, plan.N * Hkv)](
            x, y, g, dh if dh is not None else dbuf, dbuf, d0, plan.cu, plan.segoff, *strides,
            H=H, Hkv=Hkv, D=D, M=M, BS=plan.seg, BD=BD, HAS_DHT=dh is not None, STORE_DH0=True, PREC=prec[1],
            num_warps=4, num_stages=NUM_STAGES,
        )  # fmt: skip
        dbufs.append(dbuf)
    dk, dv, ds = (_empty(*x.shape, dtype=x.dtype, device=x.device) for x in (k, v, s))
    # k's share of ds stays fp32 until _rev_v_kernel adds v's (in place when ds itself is fp32).
    ds_k = ds if ds.dtype == torch.float32 else _empty(*ds.shape, **f32)
    _sweep(_rev_k_kernel, plan, K, dbufs[0], q, dz, k, s, g, dk, ds_k, **dims)
    _sweep(_rev_v_kernel, plan, V, dbufs[1], do, p, v, s, g, ds_k, dv, ds, db, **dims)
    # The final state's gradient reaches every gate of the sequence through exp(b_T).
    init = None
    if need_final:
        init = (hkT * dhT[0]).sum(2) + (hvT * dhT[1]).sum(3)  # [N, Hkv, M]
        init = init.contiguous()
    _rev_cumsum_kernel[(plan.N * Hkv,)](db, init if init is not None else db, plan.cu, Hkv=Hkv, M=M, BT=64,
                                        HAS_INIT=init is not None)  # fmt: skip
    return dq, dk, dv, ds, db.to(g.dtype), dh0


class _GSAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, s, g, scale, hk0, hv0, final, plan):
        prec = _precision(q.dtype)
        h0 = (hk0, hv0) if hk0 is not None else None
        o, z, hT = _forward(q, k, v, s, g, scale, h0, final, plan, prec)
        ctx.save_for_backward(q, k, v, s, g, z, hk0, hv0)
        ctx.scale, ctx.plan, ctx.prec = scale, plan, prec
        hkT, hvT = hT if hT is not None else (None, None)
        return o, hkT, hvT

    @staticmethod
    def backward(ctx, do, dhkT, dhvT):
        q, k, v, s, g, z, hk0, hv0 = ctx.saved_tensors
        h0 = (hk0, hv0) if hk0 is not None else None
        # With output_final_state both final-state gradients arrive (autograd materialises unused ones as zeros).
        dhT = (dhkT.contiguous(), dhvT.contiguous()) if dhkT is not None else None
        dq, dk, dv, ds, dg, dh0 = _backward(q, k, v, s, g, z, ctx.scale, h0, ctx.plan, ctx.prec, do.contiguous(),
                                            dhT)  # fmt: skip
        dhk0, dhv0 = dh0 if h0 is not None else (None, None)
        return dq, dk, dv, ds, dg, None, dhk0, dhv0, None, None


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
    plan = _Plan(B, T, cu_seqlens, q.device, SEGMENT)
    flat = [x.reshape(B * T, *x.shape[2:]).contiguous() for x in (q, k, v, s, g)]
    hk0, hv0 = (x.float().contiguous() for x in initial_state) if initial_state is not None else (None, None)
    o, hkT, hvT = _GSAFunction.apply(*flat, scale, hk0, hv0, output_final_state, plan)
    o = o.view(B, T, H, -1)
    return o, ((hkT, hvT) if output_final_state else None)


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
    _decode_kernel[(B * Hkv,)](q, k, v, s, g, o, hk, hv, scale, T, H=H, Hkv=Hkv, K=K, V=V, M=M,
                               **_launch_cfg(max(K, V), M))  # fmt: skip
    return o
