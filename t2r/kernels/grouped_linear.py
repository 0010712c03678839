"""Several linear maps of one input in one launch, without concatenating their weights (``TUNING.grouped_projections``;
decoding: a GSA layer's q, k, v and slot gates, an MLP's gate and up). A decoding step's GEMMs are a few rows each,
and cheap to read, yet at SmolLM2-135M's batch 16 they took 0.85 ms of a 1.57 ms step on an H100 (about 240 cuBLAS
launches, eight a layer: ~3.5 us each; docs/benchmarks.md). Training merges the same maps by concatenating the
weights at each call (t2r/models/projections.py), which decoding cannot afford: a second copy of the weights, or one
storage shared by several parameters, which ``save_pretrained`` refuses. Here every program takes a tile of one
weight's output columns, found from its index, and writes it into that map's own contiguous output (consumers
reshape q/k/v by heads: column views of one output would cost each a copy, as they did at batch 16).

Reference: :func:`reference.grouped_linear_reference`."""

from __future__ import annotations

import torch

try:  # a try block, so that transformers' trust_remote_code import check does not demand triton on CPU machines
    import triton
    import triton.language as tl
except ImportError as err:
    raise ImportError("the GSA Triton kernels need triton (pip install 't2r[cuda]')") from err

from .chunk import operand_precision
from .chunk_jit import _mm
from .layout import cdiv, flat_rows, multiprocessors, next_pow2
from .pdl import _depend, pdl

MAX_WEIGHTS = 4  # the kernel's weight pointers: a GSA layer's q, k, v and gates
MAX_ROWS = 64  # at most this many rows (decoding's batch): past it cuBLAS's tiles win
# (output columns per program, inner-dimension block, warps) for every call, in place of :func:`geometry`'s choice
# (benchmarks/gpu/grouped_tiles.py sets it to sweep them).
GROUPED_GEOMETRY: tuple[int, int, int] | None = None


def geometry(columns: int, rows: int, device: torch.device, glu: bool = False) -> tuple[int, int, int]:
    """(BN, BK, warps) of a grouped call with ``columns`` output columns in all (``glu``: two weights' tiles a
    program). From sweeps with cold weights (H100, 2026-12-06, docs/benchmarks.md) of SmolLM2-135M's and
    Mistral-7B's maps:

    - up to 16 rows, two warps and inner blocks of 256 (128 with ``glu``, where 256 spills), on 16-column tiles
      where 32-column ones would not fill one wave of programs (Mistral-7B's down projection: 1.27x 32 x 128);
    - past 16 rows, four warps; 16 x 256 tiles where 16-column ones fit one wave, else 32 x 128 (``glu``: 16 x 64,
      which the sm_90 compile does not spill; untimed)."""
    if GROUPED_GEOMETRY is not None:
        return GROUPED_GEOMETRY
    sms = multiprocessors(device)
    if rows <= 16:
        return (16 if cdiv(columns, 32) < sms else 32), (128 if glu else 256), 2
    if glu:
        return 16, 64, 4
    return (16, 256, 4) if cdiv(columns, 16) <= sms else (32, 128, 4)


@triton.jit
def _input(x_ptr, nw_ptr, rm, rk, rows, K, stride_x, NORM: tl.constexpr):
    """Inner block ``rk`` of the rows ``rm`` (times the norm's weight with ``NORM``), in the input's dtype, and the
    rows' sums of squares (zeros without ``NORM``)."""
    inner = rk < K
    x = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_x + rk[None, :], mask=rows[:, None] & inner[None, :],
                other=0.0)  # fmt: skip
    squares = tl.zeros([rm.shape[0]], dtype=tl.float32)
    if NORM:
        xf = x.to(tl.float32)
        squares = tl.sum(xf * xf, axis=1)
        x = (xf * tl.load(nw_ptr + rk, mask=inner, other=0.0).to(tl.float32)[None, :]).to(x_ptr.dtype.element_ty)
    return x, squares


@triton.jit
def _weights(w_ptr, rn, rk, cols, K):
    """Block [BN, BK] of a weight [N, K]: the output columns ``rn``, the inner block ``rk``."""
    return tl.load(w_ptr + rn[:, None].to(tl.int64) * K + rk[None, :], mask=cols[:, None] & (rk < K)[None, :],
                   other=0.0)  # fmt: skip


@triton.jit
def _grouped_linear_kernel(
    x_ptr, w0_ptr, w1_ptr, w2_ptr, w3_ptr, b0_ptr, b1_ptr, b2_ptr, b3_ptr, out_ptr, nw_ptr, r_ptr, eps,
    M, K, stride_x, stride_r, N0, N1, N2, N3, T0, T1, T2, HB0, HB1, HB2, HB3,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr,
    RES: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Program (column tile t, row block r): tile t is weight i's tile t - (T0 + ... + T(i-1)); its BN output columns
    of the rows in block r, x @ w_i^T (+ b_i where HB_i) with fp32 accumulation, stored in weight i's [M, N_i]
    block of the output buffer (at M * (N_0 + ... + N_(i-1))).

    The decoding step's neighbours folded in, each a launch saved: ``NORM``, x is RMS-normalised and scaled by
    ``nw`` (the statistics summed over the same blocks the product reads, the row's 1 / rms applied to the sums at
    the end: it is a common factor); ``GLU``, an MLP's gate (weight 0) and up (weight 1) in one program a tile, which
    stores only silu(gate) * up (T0 tiles, one [M, N0] output); ``RES``, the residual stream (one weight) is added to
    the output. ``PDL``: the first weight blocks are read before waiting on the kernel before (kernels/pdl.py)."""
    t = tl.program_id(0)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    w_ptr, b_ptr, hb, N, tile, col0 = w0_ptr, b0_ptr, HB0, N0, t, N0 * 0
    # Weights past the last one have no tiles (T = 0), so no program reaches their branch.
    if t >= T0:
        w_ptr, b_ptr, hb, N, tile, col0 = w1_ptr, b1_ptr, HB1, N1, t - T0, N0
    if t >= T0 + T1:
        w_ptr, b_ptr, hb, N, tile, col0 = w2_ptr, b2_ptr, HB2, N2, t - T0 - T1, N0 + N1
    if t >= T0 + T1 + T2:
        w_ptr, b_ptr, hb, N, tile, col0 = w3_ptr, b3_ptr, HB3, N3, t - T0 - T1 - T2, N0 + N1 + N2
    rn = tile * BN + tl.arange(0, BN)
    rows, cols = rm < M, rn < N
    # The first inner block outside the loop: its weights are read before waiting on the kernel before (PDL), and
    # the loop's software pipelining cannot lift an input's load above that wait.
    rk = tl.arange(0, BK)
    w = _weights(w_ptr, rn, rk, cols, K)
    up = tl.zeros([BM, BN], dtype=tl.float32)
    if GLU:
        wu = _weights(w1_ptr, rn, rk, cols, K)
    _depend(PDL)
    x, squares = _input(x_ptr, nw_ptr, rm, rk, rows, K, stride_x, NORM)
    acc = _mm(x, tl.trans(w), PREC)
    if GLU:
        up = _mm(x, tl.trans(wu), PREC)
    for k0 in range(BK, K, BK):
        rk = k0 + tl.arange(0, BK)
        w = _weights(w_ptr, rn, rk, cols, K)
        if GLU:
            wu = _weights(w1_ptr, rn, rk, cols, K)
        x, part_squares = _input(x_ptr, nw_ptr, rm, rk, rows, K, stride_x, NORM)
        acc += _mm(x, tl.trans(w), PREC)
        if GLU:
            up += _mm(x, tl.trans(wu), PREC)
        squares += part_squares
    if NORM:
        scale = tl.rsqrt(squares / K + eps)[:, None]
        acc *= scale
        up *= scale
    if hb != 0:
        acc += tl.load(b_ptr + rn, mask=cols, other=0.0).to(tl.float32)[None, :]
    if GLU:
        if HB1 != 0:
            up += tl.load(b1_ptr + rn, mask=cols, other=0.0).to(tl.float32)[None, :]
        # The separate calls' roundings: gate and up as stored, silu(gate) rounded before the product
        # (kernels/swiglu.py).
        gate = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        up = up.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32) * up
    if RES:
        r = tl.load(r_ptr + rm[:, None].to(tl.int64) * stride_r + rn[None, :], mask=rows[:, None] & cols[None, :],
                    other=0.0)  # fmt: skip
        acc += r.to(tl.float32)
    # int32 offsets: the buffer holds at most MAX_ROWS * sum(N_i) elements. M and N may arrive as constexprs (Triton
    # specializes an argument equal to 1), so no tensor methods on them.
    out = out_ptr + col0 * M + rm[:, None] * N + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rows[:, None] & cols[None, :])


def grouped_linear_triton(
    x: torch.Tensor, weights: tuple[torch.Tensor, ...], biases: tuple[torch.Tensor | None, ...], *,
    norm: tuple[torch.Tensor, float] | None = None, glu: bool = False, residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The contract of :func:`reference.grouped_linear_reference` for up to MAX_WEIGHTS contiguous weights [N_i, K]
    in ``x``'s dtype and at most MAX_ROWS rows of ``x`` [..., K], each with its bias or none (Qwen2's q/k/v have
    them, the gates not), optionally with the norm before (its weight [K] in ``x``'s dtype), the activation of
    two maps' outputs, or the residual after (in the output's dtype and shape). Each output is contiguous (a block
    of one buffer)."""
    if not 1 <= len(weights) <= MAX_WEIGHTS or len(biases) != len(weights):
        raise ValueError(f"the grouped projection takes 1 to {MAX_WEIGHTS} weights, each with its bias or None")
    K = x.shape[-1]
    if any(w.shape[1] != K or not w.is_contiguous() or w.dtype != x.dtype for w in weights):
        raise ValueError("the grouped projection needs contiguous weights [N, K] in the input's dtype")
    if any(
        b is not None and (b.shape != (w.shape[0],) or b.dtype != x.dtype) for w, b in zip(weights, biases, strict=True)
    ):
        raise ValueError("the grouped projection needs each bias [N] in the input's dtype")
    _check_neighbours(x, weights, norm, glu, residual)
    rows, stride = flat_rows(x)
    M = rows.numel() // K if K else 0
    if M > MAX_ROWS:
        raise ValueError(f"the grouped projection takes at most {MAX_ROWS} rows (decoding), got {M}")
    sizes = [w.shape[0] for w in weights]
    outputs = sizes[:1] if glu else sizes  # the activation: one output, both weights' columns in each program
    y = torch.empty(M * sum(outputs), dtype=x.dtype, device=x.device)
    bn, bk, warps = geometry(sum(outputs), M, x.device, glu)
    tiles = [cdiv(n, bn) for n in outputs]
    if M and sum(tiles):
        pad = MAX_WEIGHTS - len(weights)
        w = list(weights) + [weights[0]] * pad
        b = [bias if bias is not None else x for bias in biases] + [x] * pad
        flags = [int(bias is not None) for bias in biases] + [0] * pad
        n = sizes + [0] * pad
        t = tiles + [0] * (MAX_WEIGHTS - len(tiles))
        bm = max(16, next_pow2(M))
        r, stride_r = flat_rows(residual) if residual is not None else (rows, 0)
        nw, eps = norm if norm is not None else (rows, 0.0)
        dependent = pdl(x.device)
        _grouped_linear_kernel[(sum(tiles), cdiv(M, bm))](
            rows, *w, *b, y, nw, r, float(eps), M, K, stride, stride_r, *n, *t[:3], *flags, BM=bm, BN=bn, BK=bk,
            PREC=operand_precision(x.dtype), NORM=norm is not None, GLU=glu, RES=residual is not None, PDL=dependent,
            num_warps=warps, launch_pdl=dependent,
        )  # fmt: skip
    parts = y.split([M * n for n in outputs])
    return tuple(part.view(*x.shape[:-1], n) for part, n in zip(parts, outputs, strict=True))


def _check_neighbours(x, weights, norm, glu, residual) -> None:
    if norm is not None and (norm[0].shape != (x.shape[-1],) or norm[0].dtype != x.dtype):
        raise ValueError("the grouped projection's norm weight must be [K] in the input's dtype")
    if glu and (len(weights) != 2 or weights[0].shape != weights[1].shape):
        raise ValueError("the grouped projection's activation takes two maps of one shape: an MLP's gate and up")
    if residual is not None and (
        len(weights) != 1 or residual.shape != (*x.shape[:-1], weights[0].shape[0]) or residual.dtype != x.dtype
    ):
        raise ValueError("the grouped projection adds a residual to one map's output, of its shape and dtype")
