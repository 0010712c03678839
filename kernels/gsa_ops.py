"""Entry point the model calls: picks the GSA implementation for the device and input shape.

On CPU (and until a fused kernel exists for the device) it runs the PyTorch reference: the recurrent form for
a few tokens on top of a state (decoding), the chunked form otherwise.
"""

from __future__ import annotations

import torch

from .gsa_reference import State, gsa_chunk, gsa_recurrent

# At or below this many new tokens the token loop beats padding a whole chunk.
RECURRENT_MAX_TOKENS = 4


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
    """Gated Slot Attention with the contract of :func:`gsa_reference.gsa_recurrent`."""
    if cu_seqlens is None and q.shape[1] <= RECURRENT_MAX_TOKENS:
        return gsa_recurrent(q, k, v, s, g, scale, initial_state, output_final_state)
    return gsa_chunk(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens)
