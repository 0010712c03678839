"""Triton JIT code of the chunked GSA forward and backward. The host side, which plans the packed layout, picks
precisions and launches these, is chunk.py; the work split and the exactness argument are in its docstring.

A program serves the G query heads of its KV head in a loop that is not unrolled (``tl.range``): unrolled, the
heads' tiles stayed live together and spilled. Offline for sm_90 (benchmarks/kernel_resources.py, Triton 3.9),
spilled bytes per thread at 4 warps, unrolled -> loop: SmolLM2's layer (G = 3, K = V = M = 64) ``_slot_probs``
2,280 -> 1,400, ``_slot_grads`` 3,720 -> 1,880, ``_out_blocks`` 1,976 -> 1,352, ``_bwd_sweep`` 1,216 -> 744, the
reverse walk 576 -> 32; Mistral-7B's (G = 4, K = V = 128) alike. With G = 1 the code is the same."""

from __future__ import annotations

try:  # a try block, so that transformers' trust_remote_code import check does not demand triton on CPU machines
    import triton
    import triton.language as tl
except ImportError as err:
    raise ImportError("the GSA Triton kernels need triton (pip install 't2r[cuda]')") from err

# Operand precisions of ``_mm`` (a constexpr the host chooses per kernel group; see chunk.precision).
PREC_BF16, PREC_FP16, PREC_IEEE, PREC_TF32, PREC_BF16_EMULATED, PREC_FP16_EMULATED = range(6)


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
    its last token), loaded rather than summed from g here, which was much of a scan's time (docs/benchmarks.md)."""
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
def _scan_part(cu_ptr, segoff_ptr, Hkv: tl.constexpr, BS: tl.constexpr, BM: tl.constexpr, parts):
    """A two-level scan program's slot columns, part p of ``parts``, (sequence x KV head) index, KV head, first token,
    end, first segment of the sequence, and its part's segments [first, last) of the sequence's."""
    m0 = tl.program_id(2) * BM
    p = tl.program_id(1) % parts
    i_nh = tl.program_id(1) // parts
    n = i_nh // Hkv
    bos = tl.load(cu_ptr + n).to(tl.int64)
    eos = tl.load(cu_ptr + n + 1).to(tl.int64)
    seg0 = tl.load(segoff_ptr + n).to(tl.int64)
    nseg = tl.cdiv(eos - bos, BS)
    length = tl.cdiv(nseg, parts)
    first = tl.minimum(p * length, nseg)
    return m0, p, i_nh, i_nh % Hkv, bos, eos, seg0, first, tl.minimum(first + length, nseg)


@triton.jit(do_not_specialize=["parts"])  # one program for every part count
def _state_parts_kernel(
    xk_ptr, yk_ptr, xv_ptr, yv_ptr, b_ptr, bk_ptr, bv_ptr, partk_ptr, partv_ptr, dec_ptr, cu_ptr, segoff_ptr,
    H: tl.constexpr, Hkv: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, BS: tl.constexpr,
    BD: tl.constexpr, BM: tl.constexpr, parts, REVERSE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """First level of the two-level scans (``TUNING.scan_parts``): each of a sequence's ``parts`` parts scanned from a
    zero state, in parallel (programs below K / BD: the keys memory, the rest: the values memory). Forward: x, y =
    k, s and v, s; REVERSE, the memories' gradients from a zero gradient at the part's end: x, y = q, dz and do, p."""
    pid = tl.program_id(0)
    if pid < K // BD:
        _state_part_block(xk_ptr, yk_ptr, b_ptr, bk_ptr, partk_ptr, dec_ptr, cu_ptr, segoff_ptr, pid * BD, True,
                          H, Hkv, K, M, BS, BD, BM, parts, REVERSE, PREC)  # fmt: skip
    else:
        _state_part_block(xv_ptr, yv_ptr, b_ptr, bv_ptr, partv_ptr, dec_ptr, cu_ptr, segoff_ptr, (pid - K // BD) * BD,
                          False, H, Hkv, V, M, BS, BD, BM, parts, REVERSE, PREC)  # fmt: skip


@triton.jit
def _state_part_block(
    x_ptr, y_ptr, b_ptr, buf_ptr, part_ptr, dec_ptr, cu_ptr, segoff_ptr, d0, STORE_DEC: tl.constexpr,
    H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, parts, REVERSE: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """A [BD, BM] block of one memory (or its gradient, REVERSE) over one part: each segment's state at its start
    (the gradient at its end) relative to the part's, into buf (completed by ``_state_carry_kernel``), the part's
    own end state (gradient at its start) into part [N * Hkv, parts, D, M] and, from the keys' first row block,
    its total log decay into dec [N * Hkv, parts, M]."""
    G: tl.constexpr = H // Hkv
    m0, p, i_nh, h, bos, eos, seg0, first, last = _scan_part(cu_ptr, segoff_ptr, Hkv, BS, BM, parts)
    internal = _state_ptrs(d0 * M + m0, BD, BM, M, 1)
    state = tl.zeros([BD, BM], dtype=tl.float32)
    dec = tl.zeros([BM], dtype=tl.float32)
    rt = tl.arange(0, BS)
    for j in range(last - first):
        i = last - 1 - j if REVERSE else first + j
        tl.store(buf_ptr + ((seg0 + i) * Hkv + h) * D * M + internal, state)
        t = bos + i * BS + rt
        valid = t < eos
        b, b_last = _segment_gates(b_ptr, t, valid, tl.minimum(bos + i * BS + BS, eos), Hkv, h, M, m0, BM)
        state = state * tl.exp(b_last)[None, :]
        if REVERSE:  # each query head's tokens add q (dz exp(b))^T, do (p exp(b))^T
            eb = tl.exp(b)
            for gi in tl.range(G):  # not unrolled (module docstring)
                x = _load_cols(x_ptr, t, valid, H, h * G + gi, D, d0, BD)
                y = _load_cols(y_ptr, t, valid, H, h * G + gi, M, m0, BM)
                state += _mm(tl.trans(x), y * eb, PREC)
        else:  # each token adds k (s exp(b_last - b))^T, v (...)^T
            x = _load_cols(x_ptr, t, valid, Hkv, h, D, d0, BD)
            y = _load_cols(y_ptr, t, valid, Hkv, h, M, m0, BM)
            state += _mm(tl.trans(x), y * tl.exp(b_last[None, :] - b), PREC)
        dec += b_last
    tl.store(part_ptr + (i_nh * parts + p) * D * M + internal, state)
    if STORE_DEC:  # noqa: SIM102  (a constexpr, then a runtime test: kept apart for Triton)
        if d0 == 0:
            tl.store(dec_ptr + (i_nh * parts + p) * M + m0 + tl.arange(0, BM), dec)


@triton.jit(do_not_specialize=["parts"])
def _state_carry_kernel(
    b_ptr, ik_ptr, iv_ptr, bk_ptr, bv_ptr, partk_ptr, partv_ptr, dec_ptr, ok_ptr, ov_ptr, cu_ptr, segoff_ptr,
    Hkv: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
    BM: tl.constexpr, parts, HAS_INIT: tl.constexpr, STORE_OUT: tl.constexpr, REVERSE: tl.constexpr,
):  # fmt: skip
    """Second level of the two-level scans (forward, or REVERSE: the gradients), both memories in one launch like
    the first."""
    pid = tl.program_id(0)
    if pid < K // BD:
        _state_carry_block(b_ptr, ik_ptr, bk_ptr, partk_ptr, dec_ptr, ok_ptr, cu_ptr, segoff_ptr, M, 1, pid * BD,
                           Hkv, K, M, BS, BD, BM, parts, HAS_INIT, STORE_OUT, REVERSE)  # fmt: skip
    else:
        _state_carry_block(b_ptr, iv_ptr, bv_ptr, partv_ptr, dec_ptr, ov_ptr, cu_ptr, segoff_ptr, 1, V,
                           (pid - K // BD) * BD, Hkv, V, M, BS, BD, BM, parts, HAS_INIT, STORE_OUT,
                           REVERSE)  # fmt: skip


@triton.jit
def _state_carry_block(
    b_ptr, init_ptr, hbuf_ptr, part_ptr, dec_ptr, out_ptr, cu_ptr, segoff_ptr, stride_pd, stride_pm, d0,
    Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
    parts, HAS_INIT: tl.constexpr, STORE_OUT: tl.constexpr, REVERSE: tl.constexpr,
):  # fmt: skip
    """A part's carry added to each of its segments' states times the decay between them. Forward: the carry is
    the state at the part's start (the initial state through the earlier parts' end states and decays), the
    decay that since the part's start, and the last part also stores the final state. REVERSE: the carry is the
    gradient at the part's end (the final state's through the later parts), the decay that of the part's later
    segments, and the first part stores the initial state's gradient. The decay is per slot, so this is
    elementwise; parts is small. Public layout: (stride_pd, stride_pm)."""
    m0, p, i_nh, h, bos, eos, seg0, first, last = _scan_part(cu_ptr, segoff_ptr, Hkv, BS, BM, parts)
    public = _state_ptrs(i_nh.to(tl.int64) * D * M + d0 * stride_pd + m0 * stride_pm, BD, BM, stride_pd, stride_pm)
    internal = _state_ptrs(d0 * M + m0, BD, BM, M, 1)
    rm = m0 + tl.arange(0, BM)
    if HAS_INIT:
        carry = tl.load(init_ptr + public).to(tl.float32)
    else:
        carry = tl.zeros([BD, BM], dtype=tl.float32)
    others = parts - 1 - p if REVERSE else p
    for j in range(others):
        q = parts - 1 - j if REVERSE else j
        decay = tl.exp(tl.load(dec_ptr + (i_nh * parts + q) * M + rm))
        carry = carry * decay[None, :] + tl.load(part_ptr + (i_nh * parts + q) * D * M + internal)
    cum = tl.zeros([BM], dtype=tl.float32)
    for j in range(last - first):
        i = last - 1 - j if REVERSE else first + j
        ptrs = hbuf_ptr + ((seg0 + i) * Hkv + h) * D * M + internal
        tl.store(ptrs, tl.load(ptrs) + carry * tl.exp(cum)[None, :])
        seg_end = tl.minimum(bos + i * BS + BS, eos)
        cum += tl.load(b_ptr + ((seg_end - 1) * Hkv + h) * M + rm)
    if STORE_OUT:  # noqa: SIM102  (a constexpr, then a runtime test: kept apart for Triton)
        if p == (0 if REVERSE else parts - 1):
            decay = tl.exp(tl.load(dec_ptr + (i_nh * parts + p) * M + rm))
            own = tl.load(part_ptr + (i_nh * parts + p) * D * M + internal)
            tl.store(out_ptr + public, carry * decay[None, :] + own)


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
        for gi in tl.range(G):  # not unrolled (module docstring)
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
        for gi in tl.range(G):  # not unrolled (module docstring)
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
    for gi in tl.range(G):  # not unrolled (module docstring)
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
    for gi in tl.range(G):  # not unrolled (module docstring)
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
    for gi in tl.range(G):  # not unrolled (module docstring)
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
        for gi in tl.range(G):  # not unrolled (module docstring)
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
def _bwd_rev_memories_kernel(
    k_ptr, q_ptr, dz_ptr, v_ptr, do_ptr, p_ptr, s_ptr, b_ptr, dbk_ptr, dbv_ptr, hk_ptr, hv_ptr, seg_ptr, cu_ptr,
    dk_ptr, dv_ptr, dsk_ptr, dsv_ptr, ck_ptr, cv_ptr,
    H: tl.constexpr, Hkv: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, BS: tl.constexpr,
    BC: tl.constexpr, PREC_IN: tl.constexpr, PREC: tl.constexpr, EXP_CLAMP: tl.constexpr, MEMORY: tl.constexpr,
):  # fmt: skip
    """The memories' reverse walks (``_bwd_rev_memory``): ``MEMORY`` 0 the keys memory, 1 the values memory, 2 both
    in one launch (program axis 2 picks: one launch fewer per backward, twice the programs to fill the device with;
    offline it spills about as much, benchmarks/kernel_resources.py)."""
    if MEMORY == 0 or (MEMORY == 2 and tl.program_id(2) == 0):
        _bwd_rev_memory(k_ptr, q_ptr, dz_ptr, s_ptr, b_ptr, dbk_ptr, hk_ptr, seg_ptr, cu_ptr, dk_ptr, dsk_ptr, ck_ptr,
                        H, Hkv, K, M, BS, BC, PREC_IN, PREC, EXP_CLAMP)  # fmt: skip
    else:
        _bwd_rev_memory(v_ptr, do_ptr, p_ptr, s_ptr, b_ptr, dbv_ptr, hv_ptr, seg_ptr, cu_ptr, dv_ptr, dsv_ptr, cv_ptr,
                        H, Hkv, V, M, BS, BC, PREC_IN, PREC, EXP_CLAMP)  # fmt: skip


@triton.jit
def _bwd_rev_memory(
    x_ptr, a_ptr, y_ptr, s_ptr, b_ptr, dbuf_ptr, mbuf_ptr, seg_ptr, cu_ptr, dx_ptr, dspart_ptr, cpart_ptr,
    H: tl.constexpr, Hkv: tl.constexpr, D: tl.constexpr, M: tl.constexpr, BS: tl.constexpr, BC: tl.constexpr,
    PREC_IN: tl.constexpr, PREC: tl.constexpr, EXP_CLAMP: tl.constexpr,
):  # fmt: skip
    """Reverse walk through one memory's side of the backward (keys memory: x = k, read by a = q with slot weights
    y = dz; values memory held as [V, M]: x = v, read by a = do with y = p): the gradient of x, and the memory's
    shares of ds (into dspart) and of the gate gradient's carry into the segment (into cpart).

    The carry is taken directly as <memory, its gradient> at the segment's end (the memory mbuf holds at the next
    segment's start; zero after a sequence's last segment, whose final state's share the caller adds), not summed
    from later segments' summands, whose rounding errors grow with T (benchmarks/precision_sweep.py). One memory
    per program keeps the register file from spilling (benchmarks/kernel_resources.py); ``_gate_grad_kernel``
    adds the two memories' shares (docs/benchmarks.md)."""
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
        for gi in tl.range(G):  # not unrolled (module docstring)
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
