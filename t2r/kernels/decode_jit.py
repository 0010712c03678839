"""Triton JIT code of the fused in-place decode step (host side: decode.py)."""

from __future__ import annotations

try:  # a try block, so that transformers' trust_remote_code import check does not demand triton on CPU machines
    import triton
    import triton.language as tl
except ImportError as err:
    raise ImportError("the GSA Triton kernels need triton (pip install 't2r[cuda]')") from err

from .pdl import _depend


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
def _feature(x, FM: tl.constexpr):
    """A q/k feature map by code (decode.FEATURE_CODES): 0 identity, 1 swish, 2 relu."""
    if FM == 1:
        x = x * tl.sigmoid(x)
    elif FM == 2:
        x = tl.maximum(x, 0.0)
    return x


@triton.jit
def _log_gate(f, normalizer):
    """log alpha = logsigmoid(f) / normalizer, without overflow for logits of either sign."""
    return (tl.minimum(f, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f)))) / normalizer


@triton.jit
def _one_minus(a, g):
    """1 - alpha = -expm1(g) for alpha = exp(g), without 1 - exp(g)'s cancellation for gates near 1 (Kahan's
    expm1)."""
    exact = (a == 1.0) | (a == 0.0)  # 1 - alpha is -g or 1 there
    return tl.where(exact, tl.where(a == 1.0, -g, 1.0), (1.0 - a) * g / tl.log(tl.where(exact, 0.5, a)))


@triton.jit
def _gates(s_ptr, g_ptr, keep_ptr, keep_stride, normalizer, i_nh, Hkv: tl.constexpr, M: tl.constexpr,
           RAW: tl.constexpr, HAS_KEEP: tl.constexpr):  # fmt: skip
    """Row i_nh's (alpha, 1 - alpha) over the slots: from the gate logits (``RAW``: log alpha = logsigmoid(f) /
    normalizer; padding rows, ``keep`` == 0, get alpha 1 and write nothing) or as given (s, log alpha)."""
    rm = tl.arange(0, M)
    if RAW:
        g = _log_gate(tl.load(g_ptr + i_nh * M + rm).to(tl.float32), normalizer)
        if HAS_KEEP:
            g = tl.where(tl.load(keep_ptr + (i_nh // Hkv) * keep_stride) != 0, g, 0.0)
        a = tl.exp(g)
        s = _one_minus(a, g)
    else:
        s = tl.load(s_ptr + i_nh * M + rm).to(tl.float32)
        a = tl.exp(tl.load(g_ptr + i_nh * M + rm).to(tl.float32))
    return a, s


@triton.jit
def _group(i_nh, H: tl.constexpr, Hkv: tl.constexpr, GP: tl.constexpr):
    """Row i_nh's query heads (rows of q and o, [GP, 1]) and which of the GP lanes are heads."""
    G: tl.constexpr = H // Hkv
    rg = tl.arange(0, GP)
    return (i_nh * G + rg)[:, None], rg[:, None] < G


@triton.jit
def _keys_ptrs(hk_ptr, i_nh, rk, K: tl.constexpr, M: tl.constexpr):
    """Pointers [BK, M] to rows ``rk`` of row i_nh's keys memory."""
    return hk_ptr + i_nh * K * M + rk[:, None] * M + tl.arange(0, M)[None, :]


@triton.jit
def _keys_update(q_ptr, k_ptr, ptrs, hk, i_nh, rk, a, s, heads, in_group, K: tl.constexpr, FM: tl.constexpr):
    """Rows ``rk`` of row i_nh's keys memory (``hk``, as loaded from ``ptrs``) decayed, written and stored; the
    group's slot logits over them."""
    kb = _feature(tl.load(k_ptr + i_nh * K + rk).to(tl.float32), FM)
    hk = hk * a[None, :] + kb[:, None] * s[None, :]
    tl.store(ptrs, hk)
    qb = _feature(tl.load(q_ptr + heads * K + rk[None, :], mask=in_group, other=0.0).to(tl.float32), FM)
    return tl.sum(qb[:, :, None] * hk[None, :, :], axis=1)  # [GP, M]


@triton.jit
def _keys_block(q_ptr, k_ptr, hk_ptr, i_nh, rk, a, s, heads, in_group, K: tl.constexpr, M: tl.constexpr,
                FM: tl.constexpr):  # fmt: skip
    """Rows ``rk`` of row i_nh's keys memory decayed, written and stored; the group's slot logits over them."""
    ptrs = _keys_ptrs(hk_ptr, i_nh, rk, K, M)
    return _keys_update(q_ptr, k_ptr, ptrs, tl.load(ptrs), i_nh, rk, a, s, heads, in_group, K, FM)


@triton.jit
def _slot_probs(logits, scale):
    logits = scale * logits
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def _values_ptrs(hv_ptr, i_nh, rv, M: tl.constexpr, V: tl.constexpr):
    """Pointers [M, BV] to columns ``rv`` of row i_nh's values memory."""
    return hv_ptr + i_nh * M * V + tl.arange(0, M)[:, None] * V + rv[None, :]


@triton.jit
def _values_update(v_ptr, o_ptr, ptrs, hv, i_nh, rv, a, s, p, heads, in_group, V: tl.constexpr, RAW: tl.constexpr):
    """Columns ``rv`` of row i_nh's values memory (``hv``, as loaded from ``ptrs``) decayed, written and stored; the
    group's output there."""
    vb = tl.load(v_ptr + i_nh * V + rv).to(tl.float32)
    if RAW:
        vb = vb * tl.sigmoid(vb)
    hv = hv * a[:, None] + s[:, None] * vb[None, :]
    tl.store(ptrs, hv)
    o = tl.sum(p[:, :, None] * hv[None, :, :], axis=1)  # [GP, BV]
    if RAW:
        o = o * tl.sigmoid(o)
    tl.store(o_ptr + heads * V + rv[None, :], o.to(o_ptr.dtype.element_ty), mask=in_group)


@triton.jit
def _values_block(v_ptr, hv_ptr, o_ptr, i_nh, rv, a, s, p, heads, in_group, M: tl.constexpr, V: tl.constexpr,
                  RAW: tl.constexpr):  # fmt: skip
    """Columns ``rv`` of row i_nh's values memory decayed, written and stored; the group's output there."""
    ptrs = _values_ptrs(hv_ptr, i_nh, rv, M, V)
    _values_update(v_ptr, o_ptr, ptrs, tl.load(ptrs), i_nh, rv, a, s, p, heads, in_group, V, RAW)


@triton.jit
def _decode_step_kernel(
    q_ptr, k_ptr, v_ptr, s_ptr, g_ptr, o_ptr, hk_ptr, hv_ptr, keep_ptr, keep_stride, scale, normalizer,
    H: tl.constexpr, Hkv: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, GP: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, RAW: tl.constexpr, FM: tl.constexpr, HAS_KEEP: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """One token per sequence (decoding proper), the memories streamed through registers in blocks: keys-memory
    rows (decay, write, store, and every query head's slot logits), then value-memory columns (decay, write,
    store, output). A block's load does not wait on the previous block's math, so the state's bytes flow at
    close to copy speed instead of one 64 KB load, then compute, then one store per program.

    ``RAW``: q, k, v are the projections and ``g_ptr`` holds the gate logits f; the layer's elementwise work
    happens here (feature map ``FM``, silu values, log alpha = logsigmoid(f) / normalizer, 1 - alpha, padding
    rows ``keep`` == 0 that neither write nor decay, and silu on the output) instead of in a dozen launches."""
    _depend(PDL)  # kernels/pdl.py
    i_nh = tl.program_id(0).to(tl.int64)  # = sequence * Hkv + KV head, the token's row in k, v, s, g
    heads, in_group = _group(i_nh, H, Hkv, GP)
    a, s = _gates(s_ptr, g_ptr, keep_ptr, keep_stride, normalizer, i_nh, Hkv, M, RAW, HAS_KEEP)
    logits = tl.zeros([GP, M], dtype=tl.float32)
    # Unrolled by 4: a little faster, the same bits (docs/benchmarks.md, the decode step).
    for k0 in tl.range(0, K, BK, loop_unroll_factor=4):
        logits += _keys_block(q_ptr, k_ptr, hk_ptr, i_nh, k0 + tl.arange(0, BK), a, s, heads, in_group, K, M, FM)
    p = _slot_probs(logits, scale)
    for v0 in tl.range(0, V, BV, loop_unroll_factor=4):
        _values_block(v_ptr, hv_ptr, o_ptr, i_nh, v0 + tl.arange(0, BV), a, s, p, heads, in_group, M, V, RAW)


# The step split over programs (``TUNING.decode_split``): where sequences x KV heads are fewer than the device's
# multiprocessors (batch 1; SmolLM2's 3 KV heads at batch 16: 48 programs of 132), the one-program-per-row step
# leaves most of them idle and each walks its memories serially. Here the keys memory's row blocks, then the values
# memory's column blocks, are programs of their own, in two launches: the first writes each block's partial slot
# logits, the second sums them (in the block order of the one-program step: the same bits), takes the softmax and
# produces the output. Each program recomputes the row's gates (M values).


@triton.jit
def _parts(part_ptr, i_nh, blk, blocks, GP: tl.constexpr, M: tl.constexpr):
    """Pointers [GP, M] to row i_nh's partial slot logits from keys block ``blk`` of ``blocks``."""
    rows = (i_nh * blocks + blk) * GP + tl.arange(0, GP)
    return part_ptr + rows[:, None] * M + tl.arange(0, M)[None, :]


@triton.jit
def _decode_keys_kernel(
    q_ptr, k_ptr, s_ptr, g_ptr, hk_ptr, part_ptr, keep_ptr, keep_stride, normalizer,
    H: tl.constexpr, Hkv: tl.constexpr, K: tl.constexpr, M: tl.constexpr, GP: tl.constexpr, BK: tl.constexpr,
    RAW: tl.constexpr, FM: tl.constexpr, HAS_KEEP: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (row i_nh, keys block b): rows [b BK, (b + 1) BK) of the keys memory decayed, written and stored, and
    every query head's slot logits over them, unscaled, into the workspace. ``PDL``: the memory block is read
    before waiting on the kernel before (which does not write it; kernels/pdl.py)."""
    i_nh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    rk = blk * BK + tl.arange(0, BK)
    ptrs = _keys_ptrs(hk_ptr, i_nh, rk, K, M)
    hk = tl.load(ptrs)
    _depend(PDL)
    heads, in_group = _group(i_nh, H, Hkv, GP)
    a, s = _gates(s_ptr, g_ptr, keep_ptr, keep_stride, normalizer, i_nh, Hkv, M, RAW, HAS_KEEP)
    part = _keys_update(q_ptr, k_ptr, ptrs, hk, i_nh, rk, a, s, heads, in_group, K, FM)
    tl.store(_parts(part_ptr, i_nh, blk, tl.num_programs(1), GP, M), part)


@triton.jit
def _decode_values_kernel(
    v_ptr, s_ptr, g_ptr, o_ptr, hv_ptr, part_ptr, keep_ptr, keep_stride, scale, normalizer, KB,
    H: tl.constexpr, Hkv: tl.constexpr, V: tl.constexpr, M: tl.constexpr, GP: tl.constexpr, BV: tl.constexpr,
    RAW: tl.constexpr, HAS_KEEP: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (row i_nh, values block b): the slot softmax from the KB keys blocks' partial logits, then columns
    [b BV, (b + 1) BV) of the values memory decayed, written and stored, and the output's columns. ``PDL``: the
    memory block is read before waiting on the keys kernel (which does not write it; kernels/pdl.py)."""
    i_nh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    rv = blk * BV + tl.arange(0, BV)
    ptrs = _values_ptrs(hv_ptr, i_nh, rv, M, V)
    hv = tl.load(ptrs)
    _depend(PDL)
    heads, in_group = _group(i_nh, H, Hkv, GP)
    a, s = _gates(s_ptr, g_ptr, keep_ptr, keep_stride, normalizer, i_nh, Hkv, M, RAW, HAS_KEEP)
    logits = tl.zeros([GP, M], dtype=tl.float32)
    for b in range(0, KB):
        logits += tl.load(_parts(part_ptr, i_nh, b, KB, GP, M))
    _values_update(v_ptr, o_ptr, ptrs, hv, i_nh, rv, a, s, _slot_probs(logits, scale), heads, in_group, V, RAW)


# The step in one pass (``TUNING.decode_whole``): a row's two memories held whole in registers (small states:
# SmolLM2's 2 x 64 x 64, Mistral-7B's 2 x 128 x 64), every load issued before any store. The blocked kernels above
# store a block before the next load, and a load may not pass a store to memory it might alias, so each block, the
# queries and the values memory cost a round trip to DRAM in turn; here there is one.


@triton.jit
def _decode_whole_kernel(
    q_ptr, k_ptr, v_ptr, s_ptr, g_ptr, o_ptr, hk_ptr, hv_ptr, keep_ptr, keep_stride, scale, normalizer,
    H: tl.constexpr, Hkv: tl.constexpr, K: tl.constexpr, V: tl.constexpr, M: tl.constexpr, GP: tl.constexpr,
    RAW: tl.constexpr, FM: tl.constexpr, HAS_KEEP: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One token of row i_nh (sequence x KV head): both memories loaded whole (before waiting on the kernel before,
    which does not write them), then the token's inputs; decay and write, every query head's slot softmax and
    output; then the stores. The same arithmetic as :func:`_decode_step_kernel` (``RAW``, ``FM``, ``HAS_KEEP`` as
    there), its sums taken whole instead of block by block."""
    i_nh = tl.program_id(0).to(tl.int64)
    rk, rv = tl.arange(0, K), tl.arange(0, V)
    hk_ptrs = _keys_ptrs(hk_ptr, i_nh, rk, K, M)
    hv_ptrs = _values_ptrs(hv_ptr, i_nh, rv, M, V)
    hk = tl.load(hk_ptrs)
    hv = tl.load(hv_ptrs)
    _depend(PDL)
    heads, in_group = _group(i_nh, H, Hkv, GP)
    a, s = _gates(s_ptr, g_ptr, keep_ptr, keep_stride, normalizer, i_nh, Hkv, M, RAW, HAS_KEEP)
    kb = _feature(tl.load(k_ptr + i_nh * K + rk).to(tl.float32), FM)
    vb = tl.load(v_ptr + i_nh * V + rv).to(tl.float32)
    qs = _feature(tl.load(q_ptr + heads * K + rk[None, :], mask=in_group, other=0.0).to(tl.float32), FM)  # [GP, K]
    if RAW:
        vb = vb * tl.sigmoid(vb)
    hk = hk * a[None, :] + kb[:, None] * s[None, :]
    hv = hv * a[:, None] + s[:, None] * vb[None, :]
    # One query head at a time: a [GP, K, M] product would not fit the registers beside the memories.
    lane = tl.arange(0, GP)[:, None]
    logits = tl.zeros([GP, M], dtype=tl.float32)
    for gi in tl.static_range(H // Hkv):
        qg = tl.sum(tl.where(lane == gi, qs, 0.0), axis=0)
        logits = tl.where(lane == gi, tl.sum(qg[:, None] * hk, axis=0)[None, :], logits)
    p = _slot_probs(logits, scale)
    o = tl.zeros([GP, V], dtype=tl.float32)
    for gi in tl.static_range(H // Hkv):
        pg = tl.sum(tl.where(lane == gi, p, 0.0), axis=0)
        o = tl.where(lane == gi, tl.sum(pg[:, None] * hv, axis=0)[None, :], o)
    if RAW:
        o = o * tl.sigmoid(o)
    tl.store(hk_ptrs, hk)
    tl.store(hv_ptrs, hv)
    tl.store(o_ptr + heads * V + rv[None, :], o.to(o_ptr.dtype.element_ty), mask=in_group)
