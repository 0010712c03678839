"""A whole training step (forward, backward, optimizer) captured as one CUDA graph and replayed.

A small model's eager step is bound by the host: at SmolLM2-135M, 1 x 4k, both the student and the teacher keep
the GPU busy for about 35 of their 140-180 ms per step (H200, 2026-12-05). A replayed graph issues the step's
kernels in one call, so its time is the device's. Dense batches only: a packed batch's plan reads its sequence
bounds on the host. The optimizer must be built with ``capturable=True``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator

from t2r.models.cuda_graphs import capture_after_warmup


@contextlib.contextmanager
def dense_rows() -> Iterator[None]:
    """Tell transformers' mask builder, for a capture, what its host-side looks would find in the bench's rows
    (dense by construction: one unpadded sequence each). Under capture it cannot read tensors back, so it assumes
    packing (``find_packed_sequence_indices``) and, in 5.17 (not in 5.25), also refuses SDPA's causal skip whenever
    a stream is capturing (``_ignore_causal_mask_sdpa``). Either builds a [T, T] mask, which turns the teacher's
    causal flash kernel into a masked one (seen on an H200 with 5.17: 364 ms and 32.8 GB at 16k against 185 ms and
    17 GB eagerly). The skip is granted only where the newest transformers grants it under capture too: no padding
    mask, no local window, and a query as long as the keys, or of one token."""
    from transformers import masking_utils

    saved = {}
    if hasattr(masking_utils, "find_packed_sequence_indices"):
        saved["find_packed_sequence_indices"] = lambda position_ids: None
    original = getattr(masking_utils, "_ignore_causal_mask_sdpa", None)
    if original is not None:
        signature = inspect.signature(original)

        def causal_skip(*args, **kwargs):
            given = signature.bind(*args, **kwargs).arguments
            q_length, kv_length = given.get("q_length"), given.get("kv_length")
            plain = given.get("padding_mask") is None and given.get("local_attention_size") is None
            if plain and q_length is not None and q_length in (1, kv_length):
                return True
            return original(*args, **kwargs)

        saved["_ignore_causal_mask_sdpa"] = causal_skip
    saved = {name: (getattr(masking_utils, name), patched) for name, patched in saved.items()}
    for name, (_, patched) in saved.items():
        setattr(masking_utils, name, patched)
    try:
        yield
    finally:
        for name, (kept, _) in saved.items():
            setattr(masking_utils, name, kept)


def captured_step(
    forward_backward: Callable[[], None], zero_grad: Callable[[], None], warmup: int = 3
) -> Callable[[], None]:
    """Run ``warmup`` eager steps on a side stream (kernels compiled, the allocator and autocast warmed), then
    capture one (``forward_backward``: loss, backward and optimizer step, without zeroing) and return its replay.

    Gradients are set to None before the capture, so the captured backward writes them afresh in the graph's
    memory on every replay rather than adding to them."""
    zero_grad()
    with dense_rows():  # the warm-up takes the path the capture will
        graph, _ = capture_after_warmup(forward_backward, warmup, between=zero_grad)
    return graph.replay
