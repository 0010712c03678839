"""Programmatic dependent launch (Hopper and later; ``TUNING.pdl``, on by default, T2R_GSA_PDL=0 turns it off):
a decoding step's kernels launched so that each may start while the one before it finishes. A captured decoding
step is hundreds of launches of a few microseconds, each paying ~1 us of replay before its first load
(docs/benchmarks.md, the launch row).

A kernel launched this way first reads only what the kernel before it does not write (weights, its own memories),
then :func:`_depend`: it waits for that kernel to finish (its writes visible), and only then lets the next kernel
launch. So the next kernel's early reads overlap this one's tail and nothing older. A kernel after a plain launch,
or a plain kernel after one of these, keeps stream order."""

from __future__ import annotations

import functools

import torch

try:  # a try block, so that transformers' trust_remote_code import check does not demand triton on CPU machines
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError as err:
    raise ImportError("the GSA Triton kernels need triton (pip install 't2r[cuda]')") from err

from .tuning import TUNING


@triton.jit
def _depend(PDL: tl.constexpr):
    """Wait for the kernel before this one, then let the next one launch (nothing without ``PDL``)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def pdl(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch as programmatic dependents: ``TUNING.pdl`` and compute capability 9+
    (the interpreter, off the GPU, has no such launch)."""
    return TUNING.pdl and device.type == "cuda" and _capability(device) >= 9


@functools.lru_cache(maxsize=8)
def _capability(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]
