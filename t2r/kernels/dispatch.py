"""Entry points the model calls: pick the GSA implementation for the device and the call.

CUDA tensors go to the Triton kernels (``chunk``, ``decode``) when triton is installed and the shapes fit (power-of-two
head dims and slot counts of at least 16); everything else, and every CPU call, runs the PyTorch reference: the
recurrent form for a few tokens on top of a state (decoding), the chunked form otherwise.
``TUNING.impl`` (``T2R_GSA_IMPL``): ``reference`` forces the reference everywhere (comparisons, debugging);
``triton`` sends CPU tensors to the kernels too, which then needs ``TRITON_INTERPRET=1`` (the CPU tests do this).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import (
    State,
    Window,
    cross_entropy_sum_reference,
    grouped_linear_reference,
    gsa_chunk,
    gsa_decode_reference,
    gsa_prologue_reference,
    gsa_recurrent,
    kd_sum_reference,
    rms_norm_reference,
    rotary_reference,
    swiglu_reference,
    window_decode_reference,
)
from .tuning import TUNING

try:
    from .chunk import gsa_chunk_triton, supports
    from .cross_entropy import cross_entropy_sum_triton, kd_sum_triton
    from .decode import gsa_decode_fused_triton, gsa_decode_triton
    from .grouped_linear import MAX_ROWS, MAX_WEIGHTS, grouped_linear_triton
    from .norm import rms_norm_autograd_triton, rms_norm_triton
    from .prologue import gsa_prologue_triton
    from .rotary import rotary_triton
    from .swiglu import swiglu_triton
    from .window import window_decode_op, window_decode_triton
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


def gsa_decode_fused_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    f: torch.Tensor,
    scale: float | None,
    state: State,
    feature_map: str,
    normalizer: float,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """A few new tokens from a layer's projections (q/k feature map, silu values, gates from the logits f, padding
    ``keep`` [B, T]) on top of ``state``, updated in place; returns silu(o), as
    :func:`reference.gsa_decode_fused_reference`. One token per sequence on the GPU is a single Triton launch,
    where the steps apart take a dozen: a small model's decoding is bound by launches, not bytes."""
    contiguous = state[0].is_contiguous() and state[1].is_contiguous()
    if q.shape[1] == 1 and TUNING.decode_block and contiguous and use_triton(q, k, v, f):
        return gsa_decode_fused_triton(q, k, v, f, scale, state, feature_map, normalizer, keep)
    return F.silu(gsa_decode_(*gsa_prologue(q, k, v, f, feature_map, normalizer, keep), scale, state))


def _triton_takes(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels may run: triton and CUDA tensors (or TUNING.impl == "triton")."""
    if gsa_chunk_triton is None or TUNING.impl == "reference":
        return False
    return tensors[0].is_cuda or TUNING.impl == "triton"


def _fusable(*tensors: torch.Tensor) -> bool:
    """Whether a Triton fusion may run: :func:`_triton_takes`, and no torch.compile trace (which differentiates and
    fuses the PyTorch form itself)."""
    return not torch.compiler.is_compiling() and _triton_takes(*tensors)


def _no_gradient(*tensors: torch.Tensor) -> bool:
    return not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors))


def _fused_inference(*tensors: torch.Tensor) -> bool:
    """Whether an elementwise fusion without a backward applies: :func:`_fusable`, and nothing to differentiate."""
    return _fusable(*tensors) and _no_gradient(*tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension: one Triton launch where :func:`_fused_inference` holds; under autograd, with
    ``TUNING.fused_norm_grad`` (T2R_GSA_FUSED_NORM_GRAD=1), one launch each way; the reference's eight otherwise."""
    if _fused_inference(x, weight):
        return rms_norm_triton(x, weight, eps)
    if TUNING.fused_norm_grad and _fusable(x, weight):
        return rms_norm_autograd_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def gsa_prologue(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: torch.Tensor, feature_map: str, normalizer: float,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """The GSA op's inputs (q, k, v, s, g) from a layer's projections (:func:`reference.gsa_prologue_reference`):
    one Triton launch each way where :func:`_fusable` holds and ``TUNING.fused_prologue`` is on
    (T2R_GSA_FUSED_PROLOGUE=1), about seven forward and eight backward otherwise."""
    if TUNING.fused_prologue and _fusable(q, k, v, f):
        return gsa_prologue_triton(q, k, v, f, feature_map, normalizer, keep)
    return gsa_prologue_reference(q, k, v, f, feature_map, normalizer, keep)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [B, T, H, D] and k [B, T, Hkv, D]: one Triton launch where :func:`_fused_inference`
    holds and ``TUNING.fused_rope`` is on (the default; T2R_GSA_FUSED_ROPE=0 turns it off), the reference's ten
    otherwise."""
    if TUNING.fused_rope and _fused_inference(q, k, cos, sin):
        return rotary_triton(q, k, cos, sin)
    return rotary_reference(q, k, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: one Triton launch each way where :func:`_fusable` holds and ``TUNING.fused_mlp`` is on
    (T2R_GSA_FUSED_MLP=1), the reference's two forward and three backward otherwise."""
    if TUNING.fused_mlp and _fusable(gate, up):
        return swiglu_triton(gate, up)
    return swiglu_reference(gate, up)


def grouped_takes(x: torch.Tensor, weights: tuple[torch.Tensor, ...], *extra: torch.Tensor) -> bool:
    """Whether :func:`grouped_linear` takes its Triton launch for these tensors (``extra``: the norm's weight, the
    residual): ``TUNING.grouped_projections`` on (T2R_GSA_GROUPED_PROJECTIONS, on by default),
    :func:`_fused_inference`, few rows (decoding), contiguous weights and the rest in the input's dtype, no
    autocast."""
    if not (TUNING.grouped_projections and len(weights) <= MAX_WEIGHTS and _fused_inference(x, *weights, *extra)):
        return False
    K = x.shape[-1]
    few = K > 0 and x.numel() // K <= MAX_ROWS
    fits = all(w.dtype == x.dtype and w.is_contiguous() for w in weights) and all(t.dtype == x.dtype for t in extra)
    return few and fits and not torch.is_autocast_enabled(x.device.type)


def grouped_linear(
    x: torch.Tensor, weights: tuple[torch.Tensor, ...], biases: tuple[torch.Tensor | None, ...], *,
    norm: tuple[torch.Tensor, float] | None = None, glu: bool = False, residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Linear maps of one input (:func:`reference.grouped_linear_reference`, with its optional norm, activation and
    residual): one Triton launch where :func:`grouped_takes`; otherwise a GEMM each."""
    extra = tuple(t for t in (residual, None if norm is None else norm[0]) if t is not None)
    if grouped_takes(x, weights, *extra):
        return grouped_linear_triton(x, weights, biases, norm=norm, glu=glu, residual=residual)
    return grouped_linear_reference(x, weights, biases, norm=norm, glu=glu, residual=residual)


def window_decode_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past: Window,
    keep: torch.Tensor | None,
    scale: float,
    o: torch.Tensor,
    mix_logits: torch.Tensor,
    mix_proj: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """A hybrid layer's decoding step past its GSA output ``o``: window attention, mix, and the ring ``past``
    updated in place (:func:`reference.window_decode_reference`). Two Triton launches where the kernels take the
    tensors (:func:`_triton_takes`), nothing is differentiated, ``TUNING.fused_window`` is on (the default;
    T2R_GSA_FUSED_WINDOW=0 turns it off) and the head dim is a power of two; under torch.compile (the compiled
    decoding step) as a custom op, so that the graph keeps them."""
    D = q.shape[-1]
    tensors = tuple(x for x in (q, k, v, o, mix_logits, mix_proj, hidden) if x is not None)
    if TUNING.fused_window and D & (D - 1) == 0 and _triton_takes(*tensors) and _no_gradient(*tensors):
        if torch.compiler.is_compiling():
            return window_decode_op(q, k, v, *past, keep, scale, o, mix_logits, mix_proj, hidden)
        return window_decode_triton(q, k, v, past, keep, scale, o, mix_logits, mix_proj, hidden)
    return window_decode_reference(q, k, v, past, keep, scale, o, mix_logits, mix_proj, hidden)


def fused_cross_entropy(logits: torch.Tensor) -> bool:
    """Whether :func:`cross_entropy_sum` and :func:`kd_sum` take the Triton kernels: ``TUNING.fused_ce`` (the
    default; T2R_GSA_FUSED_CE=0 turns it off) and :func:`_fusable`. Then the caller need not split the rows into
    chunks, nor select the labelled ones: nothing vocabulary-sized is made."""
    return TUNING.fused_ce and _fusable(logits)


def cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None, ignore_index: int
) -> torch.Tensor:
    """Summed (weighted) cross-entropy over rows (:func:`reference.cross_entropy_sum_reference`): one Triton
    launch each way where :func:`fused_cross_entropy` holds."""
    if fused_cross_entropy(logits):
        return cross_entropy_sum_triton(logits, labels, weights, ignore_index)
    return cross_entropy_sum_reference(logits, labels, weights, ignore_index)


def kd_sum(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """Summed (weighted) distillation KL over rows, times T^2 (:func:`reference.kd_sum_reference`): one Triton
    launch each way where :func:`fused_cross_entropy` holds."""
    if fused_cross_entropy(student):
        return kd_sum_triton(student, teacher, labels, weights, temperature, ignore_index)
    return kd_sum_reference(student, teacher, labels, weights, temperature, ignore_index)
