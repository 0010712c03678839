"""Host side of the fused in-place decode step (decode_jit.py): one token (or a few) on top of the memories,
each memory read and written once per token. Its reference is :func:`reference.gsa_decode_reference`."""

from __future__ import annotations

import torch

try:  # a try block, so that transformers' trust_remote_code import check does not demand triton on CPU machines
    import triton
except ImportError as err:
    raise ImportError("the GSA Triton kernels need triton (pip install 't2r[cuda]')") from err

from .decode_jit import _decode_kernel, _decode_step_kernel
from .reference import State
from .tuning import TUNING, empty


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
    o = empty(B, T, H, V, dtype=q.dtype, device=q.device)
    scale = K**-0.5 if scale is None else float(scale)
    if T == 1 and TUNING.decode_block:
        _decode_step_kernel[(B * Hkv,)](q, k, v, s, g, o, hk, hv, scale, H=H, Hkv=Hkv, K=K, V=V, M=M,
                                        GP=triton.next_power_of_2(H // Hkv), BK=min(K, TUNING.decode_block),
                                        BV=min(V, TUNING.decode_block), num_warps=TUNING.decode_warps)  # fmt: skip
    else:
        _decode_kernel[(B * Hkv,)](q, k, v, s, g, o, hk, hv, scale, T, H=H, Hkv=Hkv, K=K, V=V, M=M,
                                   num_warps=TUNING.decode_warps)  # fmt: skip
    return o
