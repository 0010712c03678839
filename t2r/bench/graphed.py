"""A whole training step (forward, backward, optimizer) captured as one CUDA graph and replayed.

A small model's eager step is bound by the host: at SmolLM2-135M, 1 x 4k, both the student and the teacher keep
the GPU busy for about 35 of their 140-180 ms per step (H200, 2026-12-05). A replayed graph issues the step's
kernels in one call, so its time is the device's. Dense batches only: a packed batch's plan reads its sequence
bounds on the host. The optimizer must be built with ``capturable=True``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def dense_rows() -> Iterator[None]:
    """transformers looks at the position ids for packed rows by reading them on the host; under capture it cannot,
    so it assumes packing and builds a [T, T] mask, which turns SDPA's causal flash kernel into a masked one. The
    bench's rows are dense by construction (one sequence each), which is what the look would find."""
    from transformers import masking_utils

    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        yield
        return
    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def captured_step(
    forward_backward: Callable[[], None], zero_grad: Callable[[], None], warmup: int = 3
) -> Callable[[], None]:
    """Run ``warmup`` eager steps on a side stream (kernels compiled, the allocator and autocast warmed), then
    capture one (``forward_backward``: loss, backward and optimizer step, without zeroing) and return its replay.

    Gradients are set to None before the capture, so the captured backward writes them afresh in the graph's
    memory on every replay rather than adding to them."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            forward_backward()
            zero_grad()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    zero_grad()
    with dense_rows(), torch.cuda.graph(graph):
        forward_backward()
    return graph.replay
