"""Host side of the chunked GSA kernels (chunk_jit.py): plans, precisions, launches, the autograd op.

Same contract as :func:`reference.gsa_chunk` (the oracle these are tested against): q [B, T, H, K], k [B, T, Hkv, K],
v [B, T, Hkv, V], s, g [B, T, Hkv, M], state (hk [N, Hkv, K, M], hv [N, Hkv, M, V]) in fp32, optional packed
sequences through ``cu_seqlens``. Every batch is handled as packed: a plain [B, T] batch is B sequences of T.
The autograd op is registered as torch.library custom ops (``gsa_fwd``, ``gsa_bwd``), so torch.compile keeps it
inside its graphs; eager calls run the same code and formula through an autograd.Function.

How the work is split (per KV head; the G query heads of a group share all state work):
- ``_segment_cumsum``: the log gates' running sum b within each segment (fp32), once in the forward and again
  in the backward unless g is fp32 (then the forward's sums are kept in g's place); every kernel below loads it
  instead of re-summing g, which had been much of a scan's time (docs/benchmarks.md). A sub-chunk's own running
  sum is the difference to the row before it.
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
  and log-sum-exp (``save_probs``, opt-in), ``_slot_grads`` takes dp, dz and the read side's gate summands
  a segment at a time and ``_out_blocks`` gives dq (the forward output's computation with dz, k and hk);
  otherwise ``_bwd_sweep`` walks the sub-chunks recomputing p (slot softmax, dp, dz, dq). Then the scan in
  reverse (the memories' gradients), ``_bwd_rev_memory`` once per memory (reverse walk: dk or dv, and the
  memory's shares of ds and of the gate gradient's carry into the segment, <memory, gradient> at the segment's
  end; one memory per program keeps its registers from spilling; ``merged_rev``: both memories' programs in one
  launch), then ``_gate_grad`` adds the shares and takes every segment's reverse cumulative sum of the summands
  plus its carry: dg, all segments in parallel. The reverse walks stay walks: a segment at a time, like the
  forward output, they spill registers and run slower (docs/benchmarks.md).

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
from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .chunk_jit import (
    PREC_BF16,
    PREC_BF16_EMULATED,
    PREC_FP16,
    PREC_FP16_EMULATED,
    PREC_IEEE,
    PREC_TF32,
    _bwd_rev_memories_kernel,
    _bwd_sweep_kernel,
    _gate_grad_kernel,
    _out_blocks_kernel,
    _out_fwd_kernel,
    _segment_cumsum_kernel,
    _slot_grads_kernel,
    _slot_probs_kernel,
    _state_carry_kernel,
    _state_parts_kernel,
    _state_scan_kernel,
)
from .layout import cdiv, multiprocessors
from .memo import LastTensorMemo
from .reference import State, check_inputs
from .tuning import PREC_GROUPS, TUNING, empty, half_groups

EXP_CLAMP = 60.0  # nats: a sub-chunk's decay factors are clamped beyond exp(EXP_CLAMP) (see the exactness bound)
# More slots take the walk: at M = 128 the block kernels spill (benchmarks/kernel_resources.py).
FWD_BLOCKS_MAX_SLOTS = 64
# Triton's CPU interpreter computes bf16/fp16 dots wrongly; there the operands are rounded and multiplied in fp32.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> bool:
    """Shapes the kernels handle: power-of-two head dims and slots of at least 16 (tensor-core tiles)."""

    def ok(n: int) -> bool:
        return n >= 16 and n & (n - 1) == 0 and n <= 256

    return ok(q.shape[-1]) and ok(v.shape[-1]) and ok(s.shape[-1]) and s.shape[-1] <= 128


def precision(dtype: torch.dtype) -> Mapping[str, int]:
    """Operand precisions of the kernels' matmuls: "in" for products of two input tensors, and one per kernel
    group (PREC_GROUPS) for the rest. Memoised on the settings it reads (asked three times per fwd+bwd: host time).

    Products of two half-precision inputs (q k^T, do v^T) are exact in half precision. The other products
    take fp32 intermediates (memories, slot weights, decay factors): in tf32 (10 mantissa bits instead of 7,
    about 8x less rounding) or, for the groups T2R_GSA_DOT names (by default "out", for bf16 inputs), in the
    inputs' half precision."""
    return _precision(dtype, TUNING.dot, TUNING.dot_fp16, torch.backends.cuda.matmul.allow_tf32)


def operand_precision(dtype: torch.dtype) -> int:
    """Products of two tensors in ``dtype`` (the window step's, the grouped projections'): half precisions as they
    are (emulated under the interpreter, whose half-precision dots are wrong), fp32 exactly (not tf32)."""
    if dtype == torch.bfloat16:
        return PREC_BF16_EMULATED if INTERPRETED else PREC_BF16
    if dtype == torch.float16:
        return PREC_FP16_EMULATED if INTERPRETED else PREC_FP16
    return PREC_IEEE


@functools.lru_cache(maxsize=32)
def _precision(dtype: torch.dtype, dot: str, dot_fp16: bool, allow_tf32: bool) -> Mapping[str, int]:
    if dtype in (torch.bfloat16, torch.float16):
        half = PREC_BF16 if dtype == torch.bfloat16 else PREC_FP16
        if INTERPRETED:
            half = PREC_BF16_EMULATED if dtype == torch.bfloat16 else PREC_FP16_EMULATED
        halves = half_groups(dot) if dtype == torch.bfloat16 or dot_fp16 else set()
        rest = PREC_IEEE if INTERPRETED else PREC_TF32
        return MappingProxyType({"in": half} | {group: half if group in halves else rest for group in PREC_GROUPS})
    full = PREC_IEEE if INTERPRETED or not allow_tf32 else PREC_TF32
    return MappingProxyType(dict.fromkeys(("in", *PREC_GROUPS), full))


def _segments(cu: torch.Tensor, seg: int, capacity: int | None = None) -> tuple[torch.Tensor, ...]:
    """(segments per sequence, each sequence's first segment, the segments' (sequence, first token) [NS, 2]) of
    the sequence bounds ``cu`` [N + 1] (host, int64). ``capacity``: the list padded to that many segments with empty
    ones: the last sequence's, which must be empty, starting at the end (their programs read nothing, write
    nothing)."""
    lens = cu[1:] - cu[:-1]
    nseg = (lens + seg - 1) // seg
    segoff = torch.cumsum(nseg, 0) - nseg
    seq = torch.repeat_interleave(torch.arange(len(lens)), nseg)
    start = cu[seq] + (torch.arange(len(seq)) - segoff[seq]) * seg
    segs = torch.stack([seq, start], 1)
    if capacity is not None:
        if len(seq) > capacity or lens[-1] != 0:
            raise ValueError(f"{len(seq)} segments for a capacity of {capacity}, last sequence {int(lens[-1])} long")
        pad = torch.tensor([[len(lens) - 1, int(cu[-1])]]).expand(capacity - len(seq), 2)
        segs = torch.cat([segs, pad])
    return nseg, segoff, segs


class _Plan:
    """Packed layout of a call: sequence bounds and the segments (sequence id, first token) of every sequence."""

    def __init__(self, B: int, T: int, cu_seqlens: torch.Tensor | None, device: torch.device, seg: int):
        if cu_seqlens is None:
            cu = torch.arange(B + 1, dtype=torch.int64) * T
        else:
            cu = cu_seqlens.detach().to("cpu", torch.int64)
        nseg, segoff, segs = _segments(cu, seg)
        # Segments of the longest sequence (the scans' parts): a dense batch's from its shape, reading no tensor.
        self.longest = int(nseg.max()) if cu_seqlens is not None and len(nseg) else (T + seg - 1) // seg
        self.N = len(nseg)
        self.NS = len(segs)
        self.seg = seg
        self.cu = cu.to(device, torch.int32)
        self.segoff = segoff.to(device, torch.int32)
        self.segs = segs.to(device, torch.int32).contiguous()
        self._nseg, self._segoff, self._device = nseg, segoff, device

    @functools.cached_property
    def last_segments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(non-empty sequences, their last segments) on the device; built only when a final-state gradient needs
        them, so that plain calls copy nothing more to the device."""
        seqs = (self._nseg > 0).nonzero().flatten()
        return seqs.to(self._device), (self._segoff + self._nseg - 1)[seqs].to(self._device)


class StaticPlan(_Plan):
    """A packed layout of fixed capacity in fixed device buffers, refilled from the host before each call: what a
    CUDA graph of a training step needs, since its kernels keep the grids and buffers of their capture. Up to
    ``sequences - 1`` documents over ``rows`` x ``length`` tokens (the last sequence stays empty: the padding's),
    in as many segments as any such layout can need. Calls whose ``cu_seqlens`` is :attr:`bounds` take this plan
    without reading it back (:func:`_plan`)."""

    def __init__(self, rows: int, length: int, sequences: int, device: torch.device, seg: int):
        self.N, self.seg = sequences, seg
        self.NS = cdiv(rows * length, seg) + sequences  # each document wastes less than one segment
        self.longest = cdiv(length, seg)  # documents do not cross rows
        self.total = rows * length
        self.bounds = torch.full((sequences + 1,), self.total, dtype=torch.int64, device=device)
        self.cu = torch.empty(sequences + 1, dtype=torch.int32, device=device)
        self.segoff = torch.empty(sequences, dtype=torch.int32, device=device)
        self.segs = torch.empty(self.NS, 2, dtype=torch.int32, device=device)
        self._device = device
        _STATIC_PLANS[self.bounds] = self

    def fill(self, cu: torch.Tensor) -> None:
        """Take the documents' bounds ``cu`` (host, int64, from 0 to rows x length): padded with empty sequences,
        copied into the buffers (asynchronously from pinned memory on a GPU)."""
        if len(cu) > self.N or int(cu[0]) != 0 or int(cu[-1]) != self.total:
            raise ValueError(
                f"{len(cu) - 1} documents over {int(cu[-1])} tokens do not fit {self.N - 1} over {self.total}"
            )
        cu = torch.cat([cu, cu.new_full((self.N + 1 - len(cu),), self.total)])
        nseg, segoff, segs = _segments(cu, self.seg, self.NS)
        self._nseg, self._segoff = nseg, segoff
        self.__dict__.pop("last_segments", None)
        pinned = self._device.type == "cuda"
        for buffer, host in ((self.bounds, cu), (self.cu, cu), (self.segoff, segoff), (self.segs, segs)):
            host = host.to(buffer.dtype)
            buffer.copy_(host.pin_memory() if pinned else host, non_blocking=pinned)


_STATIC_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()


# A plan's copies to the device wait for the device (pageable memory), and reading cu_seqlens back does too; the
# layers of a model share one layout, so plans are reused: by shape for plain batches, by tensor for packed ones.
@functools.lru_cache(maxsize=64)
def _dense_plan(B: int, T: int, device: torch.device, seg: int) -> _Plan:
    return _Plan(B, T, None, device, seg)


_packed_plan = LastTensorMemo(lambda cu_seqlens, device, seg: _Plan(1, 0, cu_seqlens, device, seg))


def _plan(B: int, T: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> _Plan:
    if cu_seqlens is None:
        return _dense_plan(B, T, device, TUNING.segment)
    static = _STATIC_PLANS.get(cu_seqlens)
    if static is not None and static.seg == TUNING.segment:
        return static
    return _packed_plan(cu_seqlens, device, TUNING.segment)


def _launch_cfg(K: int, V: int, M: int) -> dict:
    big = max(K, V) * M >= 128 * 64
    return {"num_warps": TUNING.warps or (8 if big else 4), "num_stages": TUNING.stages}


def _scan_blocks(K: int, V: int, M: int, Hkv: int, plan: _Plan) -> tuple[int, int, int]:
    """(rows, slot columns, pipeline stages) of a scan program (both memories). Few sequences x heads (long
    sequences) give too few programs to fill the device, so the slots are split in two, or in four when very few
    (a small model's KV heads, or one long sequence), with a third pipeline stage where the blocks fit its shared
    memory (M = 128 does not). benchmarks/scan_probe.py and docs/benchmarks.md have the measurements."""
    BD = min(K, V, TUNING.state_block)
    blocks = plan.N * Hkv * ((K + V) // BD)
    if blocks >= 1024 or M <= 16:
        return BD, M, TUNING.stages
    BM = max(16, M // (4 if blocks < 64 else 2))
    return BD, BM, 3 if BD * BM <= 64 * 32 else TUNING.stages


# Automatic scan parts (T2R_GSA_SCAN_PARTS=0): split until the scan programs fill the device twice over, keeping
# at least this many segments per part of the longest sequence (each part costs a carry pass over its states).
MIN_SEGMENTS_PER_PART = 8


def auto_scan_parts(programs: int, longest: int, sms: int) -> int:
    """Parts per sequence for a scan of ``programs`` one-walk programs over sequences of at most ``longest``
    segments on a device of ``sms`` multiprocessors: a power of two, 1 when the walks already fill the device."""
    parts = 1
    while programs * parts < 2 * sms and longest // (2 * parts) >= MIN_SEGMENTS_PER_PART:
        parts *= 2
    return parts


def _segment_cumsum(g: torch.Tensor, plan: _Plan) -> torch.Tensor:
    b = empty(*g.shape, dtype=torch.float32, device=g.device)
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
    bufs = (empty(max(plan.NS, 1), Hkv, K, M, **f32), empty(max(plan.NS, 1), Hkv, V, M, **f32))
    outs = (empty(plan.N, Hkv, K, M, **f32), empty(plan.N, Hkv, M, V, **f32)) if store_out else bufs
    BD, BM, stages = _scan_blocks(K, V, M, Hkv, plan)
    P = TUNING.scan_parts
    if P == 0:
        programs = (K + V) // BD * plan.N * Hkv * (M // BM)
        P = auto_scan_parts(programs, plan.longest, multiprocessors(xk.device))
    if P > 1 and plan.NS:  # in two levels: P parts per sequence in parallel, then their carries
        parts = (empty(plan.N * Hkv, P, K, M, **f32), empty(plan.N * Hkv, P, V, M, **f32))
        dec = empty(plan.N * Hkv, P, M, **f32)
        grid = ((K + V) // BD, plan.N * Hkv * P, M // BM)
        common = dict(Hkv=Hkv, K=K, V=V, M=M, BS=plan.seg, BD=BD, BM=BM, parts=P)
        _state_parts_kernel[grid](xk, yk, xv, yv, b, *bufs, *parts, dec, plan.cu, plan.segoff, **common, H=H,
                                  REVERSE=reverse, PREC=prec, num_warps=4, num_stages=stages)  # fmt: skip
        _state_carry_kernel[grid](b, *(init if init is not None else bufs), *bufs, *parts, dec, *outs, plan.cu,
                                  plan.segoff, **common, HAS_INIT=init is not None, STORE_OUT=store_out,
                                  REVERSE=reverse)  # fmt: skip
        return bufs, (outs if store_out else None)
    _state_scan_kernel[((K + V) // BD, plan.N * Hkv, M // BM)](
        xk, yk, xv, yv, b, *(init if init is not None else bufs), *bufs, *outs, plan.cu, plan.segoff,
        H=H, Hkv=Hkv, K=K, V=V, M=M, BS=plan.seg, BD=BD, BM=BM, HAS_INIT=init is not None, STORE_OUT=store_out,
        REVERSE=reverse, PREC=prec, num_warps=4, num_stages=stages,
    )  # fmt: skip
    return bufs, (outs if store_out else None)


def _wide(prec: Mapping[str, int], group: str, M: int) -> int:
    """A segment-at-once kernel's product precision: their bf16 products with fewer than 64 slot columns came out
    wrong (Triton 3.6; docs/benchmarks.md), so those take tf32."""
    return prec[group] if M >= 64 or prec[group] != PREC_BF16 else PREC_TF32


def _forward(q, k, v, s, b, scale, h0, final, plan, prec, keep_probs=False):
    """o and the final states (if ``final``), the per-segment states (hk_buf, hv_buf), and with ``keep_probs``
    the slot softmax and its log-sum-exp where the segment-at-once kernels run (else None); b: the running sums
    of the log gates (``_segment_cumsum``)."""
    Hkv, K, V, M = k.shape[1], k.shape[2], v.shape[2], s.shape[2]
    H = q.shape[1]
    (hk_buf, hv_buf), hT = _state_scan(k, s, v, s, b, h0, plan, prec["scan"], Hkv, M, final, reverse=False)
    o = empty(q.shape[0], H, V, dtype=q.dtype, device=q.device)
    probs = None
    if not plan.NS:
        return o, hT, (hk_buf, hv_buf), probs
    if TUNING.fwd_blocks and M <= FWD_BLOCKS_MAX_SLOTS:
        p = empty(q.shape[0], H, M, dtype=torch.float32, device=q.device)
        lse = empty(q.shape[0], H, dtype=torch.float32, device=q.device) if keep_probs else p  # p: not written
        probs = (p, lse) if keep_probs else None
        cfg = dict(H=H, Hkv=Hkv, M=M, BS=plan.seg, BC=TUNING.subchunk, EXP_CLAMP=EXP_CLAMP, num_warps=TUNING.fwd_warps,
                   num_stages=TUNING.stages)  # fmt: skip
        _slot_probs_kernel[(plan.NS, Hkv)](q, k, s, b, p, lse, hk_buf, plan.segs, plan.cu, scale, K=K,
                                           PREC_IN=prec["in"], PREC=_wide(prec, "sweep" if keep_probs else "out", M),
                                           STORE_LSE=keep_probs,
                                           **cfg)  # fmt: skip
        _out_blocks_kernel[(plan.NS, Hkv)](p, v, s, b, o, hv_buf, plan.segs, plan.cu, V=V, PREC=_wide(prec, "o", M),
                                           **cfg)  # fmt: skip
    else:
        _out_fwd_kernel[(plan.NS, Hkv)](
            q, k, v, s, b, o, hk_buf, hv_buf, plan.segs, plan.cu, scale,
            H=H, Hkv=Hkv, K=K, V=V, M=M, BS=plan.seg, BC=TUNING.subchunk, PREC_IN=prec["in"], PREC=prec["out"],
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
    dq = empty(*q.shape, dtype=q.dtype, device=q.device)
    dz = empty(q.shape[0], H, M, **f32)
    db = empty(q.shape[0], Hkv, M, **f32)
    side = dict(H=H, Hkv=Hkv, M=M, BS=plan.seg, BC=TUNING.subchunk, PREC_IN=prec["in"], EXP_CLAMP=EXP_CLAMP)
    cfg = dict(side, K=K, V=V, PREC=prec["sweep"])
    if probs is not None:
        p, lse = probs
        blocks = dict(side, PREC=_wide(prec, "sweep", M), num_warps=TUNING.fwd_warps, num_stages=TUNING.stages)
        _slot_grads_kernel[(plan.NS, Hkv)](do, v, s, b, hv_buf, p, lse, plan.segs, plan.cu, scale, dz, db, V=V,
                                           **blocks)  # fmt: skip
        del blocks["PREC_IN"]
        _out_blocks_kernel[(plan.NS, Hkv)](dz, k, s, b, dq, hk_buf, plan.segs, plan.cu, V=K, **blocks)  # dq
    else:
        p = empty(q.shape[0], H, M, **f32)
        if plan.NS:
            _bwd_sweep_kernel[(plan.NS, Hkv)](
                q, k, v, s, b, do, hk_buf, hv_buf, plan.segs, plan.cu, scale, dq, p, dz, db, **cfg,
                **_launch_cfg(K, V, M),
            )  # fmt: skip
    dbufs, dh0 = _state_scan(q, dz, do, p, b, dhT, plan, prec["dscan"], Hkv, M, store_out=True, reverse=True)
    dk, dv, ds = (empty(*x.shape, dtype=x.dtype, device=x.device) for x in (k, v, s))
    if not plan.NS:
        return dq, dk, dv, ds, db, dh0
    dsk, dsv = empty(2, *s.shape, **f32)  # the two memories' shares of ds
    ck, cv = empty(2, plan.NS, Hkv, M, **f32)  # ... and of dg's carries into the segments
    args = (k, q, dz, v, do, p, s, b, *dbufs, hk_buf, hv_buf, plan.segs, plan.cu, dk, dv, dsk, dsv, ck, cv)
    rev = dict(K=K, V=V, PREC=prec["rev"], **side, **_launch_cfg(K, V, M))
    for memory in (2,) if TUNING.merged_rev else (0, 1):
        _bwd_rev_memories_kernel[(plan.NS, Hkv, 2 if memory == 2 else 1)](*args, MEMORY=memory, **rev)
    if need_final:  # the final state's gradient reaches every gate of the sequence through exp(b_T)
        final = (hT[0] * dhT[0]).sum(2) + (hT[1] * dhT[1]).sum(3)  # [N, Hkv, M]
        seqs, last = plan.last_segments
        ck[last] += final[seqs]
    _gate_grad_kernel[(plan.NS, Hkv)](db, s, dsk, dsv, ds, ck, cv, plan.segs, plan.cu, Hkv=Hkv, M=M, BS=plan.seg)
    return dq, dk, dv, ds, db, dh0


# The autograd op as torch.library custom ops: eager calls and torch.compile graphs run the same code, and a
# compiled layer keeps the op inside its graph (Dynamo cannot trace the host side: the plans' memos), so Inductor
# fuses the small ops around it instead of breaking the graph there (docs/benchmarks.md, torch.compile with the
# kernels inside the graph). The namespace is the module's name, so that a saved model's copy of these kernels
# (trust_remote_code) registers its own ops beside the installed package's.
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
        keep and TUNING.save_states,
        keep and TUNING.save_probs and TUNING.fwd_blocks and M <= FWD_BLOCKS_MAX_SLOTS,
    )


def _gsa_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor, g: torch.Tensor, B: int, scale: float,
    hk0: torch.Tensor | None, hv0: torch.Tensor | None, cu_seqlens: torch.Tensor | None, final: bool, keep: bool,
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """The B rows' tokens flattened ([B * T, heads, dim]) -> (o, hkT, hvT, and for a backward (``keep``): the
    running sums, hk_buf, hv_buf, p, lse); None for what is not computed or kept."""
    plan = _plan(B, q.shape[0] // B, cu_seqlens, q.device)
    sums, states, probs = _kept(keep, g.dtype, s.shape[2])
    b = _segment_cumsum(g, plan)
    h0 = (hk0, hv0) if hk0 is not None else None
    o, hT, bufs, kept_probs = _forward(q, k, v, s, b, scale, h0, final, plan, precision(q.dtype), probs)
    none = (None, None)
    return o, *(hT or none), b if sums else None, *(bufs if states else none), *(kept_probs or none)


def _gsa_fwd_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor, g: torch.Tensor, B: int, scale: float,
    hk0: torch.Tensor | None, hv0: torch.Tensor | None, cu_seqlens: torch.Tensor | None, final: bool, keep: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:  # fmt: skip
    """:func:`_gsa_forward` as an op, which returns a fixed number of tensors: an empty one for each None (a new one
    each: outputs may not alias). Eager calls skip these allocations (host time)."""
    outputs = _gsa_forward(q, k, v, s, g, B, scale, hk0, hv0, cu_seqlens, final, keep)
    return tuple(q.new_empty(0) if x is None else x for x in outputs)


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
            max(B * cdiv(BT // B, TUNING.segment), 1)
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
    dq, dk, dv, ds, dg, dh0 = _backward(q, k, v, s, b, scale, h0, plan, precision(q.dtype), do, dhT, saved, probs)
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
    """Eager calls: the ops' own code and autograd formula, skipping the dispatcher's round trips (host time, which
    bounds a small model's step)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _gsa_forward(*inputs)
        _gsa_setup_context(ctx, inputs, output)
        return output[:3]  # what it keeps need not be outputs here (autograd tracks each output: host time)

    @staticmethod
    def backward(ctx, *grads):
        return _gsa_backward(ctx, *grads, bwd=_gsa_bwd_impl)


def gsa_chunk_triton(
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
    """Chunked GSA forward and backward in Triton; the contract of :func:`reference.gsa_chunk`."""
    check_inputs(q, k, v, s, g, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else float(scale)
    flat = [x.reshape(B * T, *x.shape[2:]).contiguous() for x in (q, k, v, s, g)]
    hk0, hv0 = (x.float().contiguous() for x in initial_state) if initial_state is not None else (None, None)
    keep = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, s, g, hk0, hv0))
    op = _gsa_fwd if torch.compiler.is_compiling() else _GSAFunction.apply  # see _GSAFunction
    o, hkT, hvT, *_ = op(*flat, B, scale, hk0, hv0, cu_seqlens, output_final_state, keep)
    return o.view(B, T, H, -1), ((hkT, hvT) if output_final_state else None)
