"""Capturing a CUDA graph after eager warm-up calls: the one recipe the decoding step, the graphed training step
and the training bench share.

The warm-up runs on a side stream, as a capture does: the first calls compile Triton kernels, pick cuBLAS
workspaces and grow the caching allocator, none of which a capture may do. Only then is one call captured."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def capture_after_warmup(
    call: Callable[[], T],
    warmup: int,
    device: torch.device | None = None,
    pool: tuple | None = None,
    between: Callable[[], None] | None = None,
) -> tuple[torch.cuda.CUDAGraph, T]:
    """``warmup`` eager calls of ``call`` on a side stream (each followed by ``between``, if given), then one
    captured into a new graph (in ``pool``, shared with other graphs, where given). Returns the graph and what the
    captured call returned: tensors the replays write to."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(warmup):
            call()
            if between is not None:
                between()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = call()
    return graph, out
