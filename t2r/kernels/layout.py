"""Launch geometry on the host: row layouts the elementwise kernels read without a copy (a tensor's leading dims as
rows of one stride, each row contiguous: a projection's output, a slice of a wider merged one, the last tokens of
longer rows), and block sizes."""

from __future__ import annotations

import functools

import torch


def flat_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` [..., N] and the stride between its flattened rows; a contiguous copy where the rows have no one
    stride or the last dim is strided."""
    stride = _row_stride(x) if x.stride(-1) == 1 else None
    if stride is None:
        x = x.contiguous()
        stride = x.shape[-1]
    return x, stride


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for 0, as Triton's). Plain Python: ``triton.next_power_of_2`` is a
    constexpr function that costs ~2 us per host call (Triton 3.9), and launchers ask it per call, per layer."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a >= 0, b > 0; plain Python, as :func:`next_pow2`."""
    return -(-a // b)


@functools.lru_cache(maxsize=8)
def multiprocessors(device: torch.device) -> int:
    """The device's multiprocessor count, which grids are sized against; 132 (an H100's / H200's) off the GPU,
    where Triton's interpreter runs the kernels (CPU tests)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


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
