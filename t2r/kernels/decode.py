"""Host side of the fused in-place decode step (decode_jit.py): one token (or a few) on top of the memories,
each memory read and written once per token. References: :func:`reference.gsa_decode_reference`, and for the
step that also does the layer's elementwise work, :func:`reference.gsa_decode_fused_reference`."""

from __future__ import annotations

import torch

from .decode_jit import (
    _decode_kernel,
    _decode_keys_kernel,
    _decode_step_kernel,
    _decode_values_kernel,
    _decode_whole_kernel,
)
from .layout import multiprocessors, next_pow2
from .pdl import pdl
from .reference import State
from .tuning import TUNING, empty


def gsa_decode_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor, g: torch.Tensor, scale: float | None,
    state: State,
) -> torch.Tensor:  # fmt: skip
    """A few new tokens on top of ``state``, which is updated in place (fp32, contiguous); returns o."""
    B, T, H, K = q.shape
    Hkv, V, M = k.shape[2], v.shape[3], s.shape[3]
    hk, hv = _check_state(state)
    q, k, v, s, g = (x.contiguous() for x in (q, k, v, s, g))
    o = empty(B, T, H, V, dtype=q.dtype, device=q.device)
    scale = K**-0.5 if scale is None else float(scale)
    if T == 1 and TUNING.decode_block:
        _step(q, k, v, s, g, o, state, scale, 1.0, None, raw=False, feature_map="identity")
    else:
        _decode_kernel[(B * Hkv,)](q, k, v, s, g, o, hk, hv, scale, T, H=H, Hkv=Hkv, K=K, V=V, M=M,
                                   num_warps=TUNING.decode_warps)  # fmt: skip
    return o


FEATURE_CODES = {"identity": 0, "swish": 1, "relu": 2}  # decode_jit._feature


def gsa_decode_fused_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: torch.Tensor, scale: float | None, state: State,
    feature_map: str, normalizer: float, keep: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """One token per sequence from the layer's projections, ``state`` updated in place; returns silu(o) (the
    contract of :func:`reference.gsa_decode_fused_reference`). One launch where the unfused step takes a dozen:
    a small model's decoding step is bound by launches (docs/benchmarks.md)."""
    B, T, H, _ = q.shape
    if T != 1 or not TUNING.decode_block:
        raise ValueError("the fused decode step takes one token per sequence and the blocked kernel")
    _check_state(state)
    q, k, v, f = (x.contiguous() for x in (q, k, v, f))
    o = empty(B, T, H, v.shape[3], dtype=q.dtype, device=q.device)
    if keep is not None:
        keep = keep[:, -1]
    _step(q, k, v, None, f, o, state, scale, normalizer, keep, raw=True, feature_map=feature_map)
    return o


def _check_state(state: State) -> State:
    hk, hv = state
    if not (hk.is_contiguous() and hv.is_contiguous() and hk.dtype == hv.dtype == torch.float32):
        raise ValueError("in-place decoding needs contiguous fp32 state tensors")
    return state


def split_step(rows: int, group: int, device: torch.device) -> bool:
    """Whether a one-token step splits over its memories' blocks (two launches): ``TUNING.decode_split`` is
    "on", or "auto" (the default) and either the rows (sequences x KV heads) fill fewer than the device's
    multiprocessors or each row serves a group of query heads (GQA). Timed as graph replays on an H200
    (docs/benchmarks.md, 2026-12-06): split, SmolLM2's and Mistral-7B's GQA layers were 1.1-2.1x faster at batch 1,
    16 and 64; the issue's layer without GQA 1.5x at batch 1 (32 rows) and 2-12% slower at 16 and 64."""
    mode = TUNING.decode_split
    return mode == "on" or (mode == "auto" and (rows < multiprocessors(device) or group > 1))


# Memory elements (K x M + M x V) a one-pass program holds whole: 64 fp32 registers a thread at 8 warps.
WHOLE_MAX = 128 * 64 * 2


def whole_step(K: int, V: int, M: int) -> bool:
    """Whether a one-token step runs in one pass with a row's memories whole in registers
    (``TUNING.decode_whole``): "on", where they fit (``WHOLE_MAX``). Off by default: built and checked without a
    GPU (the interpreter; sm_90 compiles without spills, every load before the first store), not yet timed."""
    return TUNING.decode_whole == "on" and (K + V) * M <= WHOLE_MAX


def _whole_warps(K: int, V: int, M: int) -> int:
    """``TUNING.decode_warps``, and at least 8 past half of ``WHOLE_MAX``, where 4 spill
    (benchmarks/kernel_resources.py)."""
    return TUNING.decode_warps if (K + V) * M <= WHOLE_MAX // 2 else max(8, TUNING.decode_warps)


def _step(q, k, v, s, g, o, state: State, scale, normalizer: float, keep, raw: bool, feature_map: str) -> None:
    B, _, H, K = q.shape
    Hkv, V, M = k.shape[2], v.shape[3], g.shape[3]
    scale = K**-0.5 if scale is None else float(scale)
    keep_ptr, keep_stride = (q, 0) if keep is None else (keep, keep.stride(0))
    GP, BK, BV = next_pow2(H // Hkv), min(K, TUNING.decode_block), min(V, TUNING.decode_block)
    dependent = pdl(q.device)
    if whole_step(K, V, M):
        _decode_whole_kernel[(B * Hkv,)](
            q, k, v, g if s is None else s, g, o, *state, keep_ptr, keep_stride, scale, float(normalizer),
            H=H, Hkv=Hkv, K=K, V=V, M=M, GP=GP, RAW=raw, FM=FEATURE_CODES[feature_map], HAS_KEEP=keep is not None,
            PDL=dependent, num_warps=_whole_warps(K, V, M), launch_pdl=dependent,
        )  # fmt: skip
        return
    if split_step(B * Hkv, H // Hkv, q.device):
        KB = K // BK
        part = torch.empty(B * Hkv * KB * GP * M, dtype=torch.float32, device=q.device)
        common = dict(RAW=raw, HAS_KEEP=keep is not None, PDL=dependent, num_warps=TUNING.decode_warps,
                      launch_pdl=dependent)  # fmt: skip
        s_ptr = g if s is None else s
        _decode_keys_kernel[(B * Hkv, KB)](
            q, k, s_ptr, g, state[0], part, keep_ptr, keep_stride, float(normalizer), H=H, Hkv=Hkv, K=K, M=M, GP=GP,
            BK=BK, FM=FEATURE_CODES[feature_map], **common,
        )  # fmt: skip
        _decode_values_kernel[(B * Hkv, V // BV)](
            v, s_ptr, g, o, state[1], part, keep_ptr, keep_stride, scale, float(normalizer), KB, H=H, Hkv=Hkv, V=V,
            M=M, GP=GP, BV=BV, **common,
        )  # fmt: skip
        return
    _decode_step_kernel[(B * Hkv,)](
        q, k, v, g if s is None else s, g, o, *state, keep_ptr, keep_stride, scale, float(normalizer),
        H=H, Hkv=Hkv, K=K, V=V, M=M, GP=GP, BK=BK, BV=BV, RAW=raw, FM=FEATURE_CODES[feature_map],
        HAS_KEEP=keep is not None, PDL=dependent, num_warps=TUNING.decode_warps, launch_pdl=dependent,
    )  # fmt: skip
