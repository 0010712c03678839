"""A GSA layer's input maps in one launch each way (``TUNING.fused_prologue``, on by default): the q/k feature map, silu
values, log alpha = logsigmoid(f) / normalizer and the write weights 1 - alpha from the layer's projections, with
padding rows that neither write nor decay. In PyTorch these are about seven launches forward and eight backward per
layer, and autograd keeps fp32 copies of the gate logits; here the backward keeps only the projections.
Reference: :func:`reference.gsa_prologue_reference`."""

from __future__ import annotations

import torch

try:  # a try block, so that transformers' trust_remote_code import check does not demand triton on CPU machines
    import triton
    import triton.language as tl
except ImportError as err:
    raise ImportError("the GSA Triton kernels need triton (pip install 't2r[cuda]')") from err

from .decode import FEATURE_CODES
from .decode_jit import _feature, _log_gate, _one_minus
from .layout import flat_rows, next_pow2, row_warps


@triton.jit
def _feature_grad(x, FM: tl.constexpr):
    """d feature(x) / dx for decode_jit._feature's codes."""
    if FM == 1:
        sig = tl.sigmoid(x)
        d = sig * (1.0 + x * (1.0 - sig))
    elif FM == 2:
        d = tl.where(x > 0.0, 1.0, 0.0)
    else:
        d = tl.full(x.shape, 1.0, tl.float32)
    return d


@triton.jit
def _keeps(keep_ptr, row, T, keep_sb, keep_st, HAS_KEEP: tl.constexpr):
    """Whether token ``row`` (of the flattened [B, T]) is kept: not padding."""
    return tl.load(keep_ptr + (row // T) * keep_sb + (row % T) * keep_st) != 0 if HAS_KEEP else True


@triton.jit
def _prologue_kernel(
    q_ptr, k_ptr, v_ptr, f_ptr, keep_ptr, qo_ptr, ko_ptr, vo_ptr, s_ptr, g_ptr, sq, sk, sv, sf, T, keep_sb,
    keep_st, normalizer, NQ: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr, NF: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_F: tl.constexpr, FM: tl.constexpr,
    HAS_KEEP: tl.constexpr,
):  # fmt: skip
    """One token: its query, key, value and gate-logit rows (row strides sq..sf, each row contiguous) to the GSA
    op's inputs (contiguous rows)."""
    row = tl.program_id(0).to(tl.int64)
    rq, rk, rv, rf = tl.arange(0, BLOCK_Q), tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_V), tl.arange(0, BLOCK_F)
    q = tl.load(q_ptr + row * sq + rq, mask=rq < NQ, other=0.0).to(tl.float32)
    tl.store(qo_ptr + row * NQ + rq, _feature(q, FM).to(qo_ptr.dtype.element_ty), mask=rq < NQ)
    k = tl.load(k_ptr + row * sk + rk, mask=rk < NK, other=0.0).to(tl.float32)
    tl.store(ko_ptr + row * NK + rk, _feature(k, FM).to(ko_ptr.dtype.element_ty), mask=rk < NK)
    v = tl.load(v_ptr + row * sv + rv, mask=rv < NV, other=0.0).to(tl.float32)
    tl.store(vo_ptr + row * NV + rv, (v * tl.sigmoid(v)).to(vo_ptr.dtype.element_ty), mask=rv < NV)
    g = _log_gate(tl.load(f_ptr + row * sf + rf, mask=rf < NF, other=0.0).to(tl.float32), normalizer)
    g = tl.where(_keeps(keep_ptr, row, T, keep_sb, keep_st, HAS_KEEP), g, 0.0)
    tl.store(g_ptr + row * NF + rf, g, mask=rf < NF)
    tl.store(s_ptr + row * NF + rf, _one_minus(tl.exp(g), g), mask=rf < NF)


@triton.jit
def _prologue_bwd_kernel(
    q_ptr, k_ptr, v_ptr, f_ptr, keep_ptr, dqo_ptr, dko_ptr, dvo_ptr, ds_ptr, dg_ptr, dq_ptr, dk_ptr, dv_ptr, df_ptr,
    sq, sk, sv, sf, T, keep_sb, keep_st, normalizer, NQ: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr,
    NF: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_F: tl.constexpr,
    FM: tl.constexpr, HAS_KEEP: tl.constexpr,
):  # fmt: skip
    """One token's gradients: through the feature maps and silu, and into the gate logits through both log alpha
    and 1 - alpha: df = (dg - ds * alpha) * sigmoid(-f) / normalizer on kept tokens, 0 on padding."""
    row = tl.program_id(0).to(tl.int64)
    rq, rk, rv, rf = tl.arange(0, BLOCK_Q), tl.arange(0, BLOCK_K), tl.arange(0, BLOCK_V), tl.arange(0, BLOCK_F)
    q = tl.load(q_ptr + row * sq + rq, mask=rq < NQ, other=0.0).to(tl.float32)
    dq = tl.load(dqo_ptr + row * NQ + rq, mask=rq < NQ, other=0.0).to(tl.float32) * _feature_grad(q, FM)
    tl.store(dq_ptr + row * NQ + rq, dq.to(dq_ptr.dtype.element_ty), mask=rq < NQ)
    k = tl.load(k_ptr + row * sk + rk, mask=rk < NK, other=0.0).to(tl.float32)
    dk = tl.load(dko_ptr + row * NK + rk, mask=rk < NK, other=0.0).to(tl.float32) * _feature_grad(k, FM)
    tl.store(dk_ptr + row * NK + rk, dk.to(dk_ptr.dtype.element_ty), mask=rk < NK)
    v = tl.load(v_ptr + row * sv + rv, mask=rv < NV, other=0.0).to(tl.float32)
    dv = tl.load(dvo_ptr + row * NV + rv, mask=rv < NV, other=0.0).to(tl.float32) * _feature_grad(v, 1)
    tl.store(dv_ptr + row * NV + rv, dv.to(dv_ptr.dtype.element_ty), mask=rv < NV)
    f = tl.load(f_ptr + row * sf + rf, mask=rf < NF, other=0.0).to(tl.float32)
    alpha = tl.exp(_log_gate(f, normalizer))
    dg = tl.load(dg_ptr + row * NF + rf, mask=rf < NF, other=0.0).to(tl.float32)
    ds = tl.load(ds_ptr + row * NF + rf, mask=rf < NF, other=0.0).to(tl.float32)
    df = (dg - ds * alpha) * tl.sigmoid(-f) / normalizer
    df = tl.where(_keeps(keep_ptr, row, T, keep_sb, keep_st, HAS_KEEP), df, 0.0)
    tl.store(df_ptr + row * NF + rf, df.to(df_ptr.dtype.element_ty), mask=rf < NF)


def _launch_args(shapes, keep: torch.Tensor | None, feature_map: str, T: int):
    blocks = [next_pow2(n) for n in shapes]
    keep_strides = (0, 0) if keep is None else keep.stride()
    names = ("NQ", "NK", "NV", "NF", "BLOCK_Q", "BLOCK_K", "BLOCK_V", "BLOCK_F")
    consts = dict(zip(names, (*shapes, *blocks), strict=True))
    warps = row_warps(max(blocks), most=8)
    return (T, *keep_strides), dict(consts, FM=FEATURE_CODES[feature_map], HAS_KEEP=keep is not None,
                                    num_warps=warps)  # fmt: skip


def _forward(q, k, v, f, feature_map: str, normalizer: float, keep: torch.Tensor | None):
    """The outputs, and the inputs as the kernels read them ([B, T, heads x dim] rows) with their row strides."""
    B, T = q.shape[:2]
    shapes = [x.shape for x in (q, k, v, f)]
    (q, sq), (k, sk), (v, sv), (f, sf) = (flat_rows(x.flatten(2)) for x in (q, k, v, f))
    outs = [torch.empty(shape, dtype=x.dtype, device=x.device) for shape, x in zip(shapes[:3], (q, k, v), strict=True)]
    s, g = (torch.empty(shapes[3], dtype=torch.float32, device=f.device) for _ in range(2))
    scalars, consts = _launch_args([x.shape[2] for x in (q, k, v, f)], keep, feature_map, T)
    if B * T:
        _prologue_kernel[(B * T,)](q, k, v, f, q if keep is None else keep, *outs, s, g, sq, sk, sv, sf, *scalars,
                                   float(normalizer), **consts)  # fmt: skip
    return (*outs, s, g), (q, k, v, f), (sq, sk, sv, sf)


class _PrologueFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, f, feature_map: str, normalizer: float, keep):
        ctx.shapes = [x.shape for x in (q, k, v, f)]
        outputs, inputs, strides = _forward(q, k, v, f, feature_map, normalizer, keep)
        ctx.save_for_backward(*inputs, keep)
        ctx.strides, ctx.feature_map, ctx.normalizer = strides, feature_map, normalizer
        return outputs

    @staticmethod
    def backward(ctx, dqo, dko, dvo, ds, dg):
        q, k, v, f, keep = ctx.saved_tensors
        B, T = q.shape[:2]
        grads = [
            torch.empty(shape, dtype=x.dtype, device=x.device)
            for shape, x in zip(ctx.shapes, (q, k, v, f), strict=True)
        ]
        scalars, consts = _launch_args([x.shape[2] for x in (q, k, v, f)], keep, ctx.feature_map, T)
        ups = (x.contiguous() for x in (dqo, dko, dvo, ds, dg))
        if B * T:
            _prologue_bwd_kernel[(B * T,)](q, k, v, f, q if keep is None else keep, *ups, *grads, *ctx.strides,
                                           *scalars, float(ctx.normalizer), **consts)  # fmt: skip
        return (*grads, None, None, None)


def gsa_prologue_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, f: torch.Tensor, feature_map: str, normalizer: float,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """(q, k, v, s, g) for the GSA op from a layer's projections q [B, T, H, K], k [B, T, Hkv, K], v [B, T, Hkv, V],
    f [B, T, Hkv, M] and padding ``keep`` [B, T]; differentiable. The contract of
    :func:`reference.gsa_prologue_reference`."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, f)):
        return _PrologueFunction.apply(q, k, v, f, feature_map, float(normalizer), keep)
    return _forward(q, k, v, f, feature_map, normalizer, keep)[0]
