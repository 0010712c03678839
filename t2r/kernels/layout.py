"""Row layouts the elementwise kernels read without a copy: a tensor's leading dims as rows of one stride, each
row contiguous (a projection's output, a slice of a wider merged one, the last tokens of longer rows)."""

from __future__ import annotations

import torch


def flat_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` [..., N] and the stride between its flattened rows; a contiguous copy where the rows have no one
    stride or the last dim is strided."""
    stride = _row_stride(x) if x.stride(-1) == 1 else None
    if stride is None:
        x = x.contiguous()
        stride = x.shape[-1]
    return x, stride


def row_warps(block: int, most: int = 16) -> int:
    """Warps for a program that holds a row block of ``block`` elements: one per 512, at least one."""
    return min(max(block // 512, 1), most)


def _row_stride(x: torch.Tensor) -> int | None:
    stride, span = None, None
    for size, st in zip(reversed(x.shape[:-1]), reversed(x.stride()[:-1]), strict=True):
        if size == 1:
            continue
        if stride is None:
            stride = st
        elif st != span:
            return None
        span = st * size
    return x.shape[-1] if stride is None else stride
