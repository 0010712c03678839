"""Entry points the model calls: pick the GSA implementation for the device and the call.

CUDA tensors go to the Triton kernels (``chunk``, ``decode``) when triton is installed and the shapes fit (power-of-two
head dims and slot counts of at least 16); everything else, and every CPU call, runs the PyTorch reference: the
recurrent form for a few tokens on top of a state (decoding), the chunked form otherwise.
``TUNING.impl`` (``T2R_GSA_IMPL``): ``reference`` forces the reference everywhere (comparisons, debugging);
``triton`` sends CPU tensors to the kernels too, which then needs ``TRITON_INTERPRET=1`` (the CPU tests do this).
"""

from __future__ import annotations

import torch

from .reference import State, gsa_chunk, gsa_decode_reference, gsa_recurrent
from .tuning import TUNING

try:
    from .chunk import gsa_chunk_triton, supports
    from .decode import gsa_decode_triton
except ImportError:  # no triton: CPU-only install
    gsa_chunk_triton = None

# At or below this many new tokens the token loop beats padding a whole chunk.
RECURRENT_MAX_TOKENS = 4


def use_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> bool:
    if TUNING.impl == "reference" or gsa_chunk_triton is None or not supports(q, k, v, s):
        return False
    return q.is_cuda or TUNING.impl == "triton"


def gsa(
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
    """Gated Slot Attention with the contract of :func:`reference.gsa_recurrent`."""
    if use_triton(q, k, v, s):
        return gsa_chunk_triton(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens)
    return _gsa_reference(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens)


@torch.compiler.disable
def _gsa_reference(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens):
    """The oracle, kept out of torch.compile graphs: its Python loops over chunks and documents would unroll into
    graphs as long as the sequence; a compiled model runs it as it is, between its graphs."""
    if cu_seqlens is None and q.shape[1] <= RECURRENT_MAX_TOKENS:
        return gsa_recurrent(q, k, v, s, g, scale, initial_state, output_final_state)
    return gsa_chunk(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens)


def gsa_decode_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    scale: float | None,
    state: State,
) -> torch.Tensor:
    """A few new tokens (no gradient) on top of ``state``, which is updated in place; returns the output. The fused
    Triton step reads and writes each memory once per token; elsewhere the reference (same contract)."""
    if use_triton(q, k, v, s) and state[0].is_contiguous() and state[1].is_contiguous():
        return gsa_decode_triton(q, k, v, s, g, scale, state)
    return gsa_decode_reference(q, k, v, s, g, scale, state)
