"""Several linear projections of one input as one GEMM (``TUNING.merged_projections``, on by default): a GSA layer's
q, k, v and slot gates, an MLP's gate and up. Under autograd this saves launches both ways (one GEMM for the
weights' gradients, one for the input's, and no sums of the input's partial gradients), which bounds a small
model's training step. The weights stay the modules' own parameters (checkpoints, optimizers and peft see no
change); they are concatenated at each call, so merging is for training. Decoding may take one grouped launch over the
separate weights instead (``TUNING.grouped_projections``, t2r/kernels/grouped_linear.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as nn_module
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from t2r.kernels.dispatch import grouped_linear, grouped_takes, swiglu
from t2r.kernels.tuning import TUNING


def plain_linears(modules: tuple[nn.Module, ...]) -> bool:
    """Plain nn.Linear modules (not peft's or a quantised layer) without hooks of their own or global ones (which
    a merged or grouped call would skip), on one device and dtype."""
    if getattr(nn_module, "_global_forward_hooks", None) or getattr(nn_module, "_global_forward_pre_hooks", None):
        return False
    for m in modules:
        if type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks:
            return False
    first = modules[0].weight
    return all(m.weight.dtype == first.dtype and m.weight.device == first.device for m in modules)


def plain_rms_norm(norm: nn.Module) -> bool:
    """A Llama-family RMSNorm (transformers' forward, or t2r's fused one: models/fused.py) without hooks of its
    own, whose weight and epsilon a grouped launch may apply in its place."""
    forward = type(norm).forward
    llama = forward is LlamaRMSNorm.forward or getattr(type(norm), "llama_rms_norm", False)
    return llama and not (norm._forward_hooks or norm._forward_pre_hooks)


def _mergeable(modules: tuple[nn.Module, ...]) -> bool:
    """:func:`plain_linears`, with biases on all or none (one concatenated bias)."""
    return plain_linears(modules) and len({m.bias is None for m in modules}) == 1


class _MergedLinear(torch.autograd.Function):
    """x @ cat(weights).T (+ cat(biases)) with one GEMM each way. The concatenated weights are not kept for the
    backward, which concatenates them again: keeping them would hold a second copy of every merged weight until
    the backward (~7.5 GB of MLP weights at 7B without checkpointing). Gradients take the output gradient's dtype,
    the one the forward ran in (autocast's), and are returned in each input's own."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, n: int, *params: torch.Tensor | None) -> torch.Tensor:
        weights, biases = params[:n], params[n:]
        bias = None if biases[0] is None else torch.cat(biases)
        ctx.n = n
        ctx.save_for_backward(x, *weights)
        ctx.bias_dtype = None if bias is None else biases[0].dtype
        return F.linear(x, torch.cat(weights), bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, *weights = ctx.saved_tensors
        need_x, _, *need = ctx.needs_input_grad
        dt, sizes = dy.dtype, [w.shape[0] for w in weights]
        rows = dy.reshape(-1, dy.shape[-1])
        dx = None
        if need_x:
            dx = (dy @ torch.cat(weights).to(dt)).to(x.dtype)
        dws: list[torch.Tensor | None] = [None] * ctx.n
        if any(need[: ctx.n]):
            dw = rows.T @ x.reshape(-1, x.shape[-1]).to(dt)
            dws = [
                g.to(w.dtype) if req else None
                for g, w, req in zip(dw.split(sizes), weights, need[: ctx.n], strict=True)
            ]
        dbs: list[torch.Tensor | None] = [None] * ctx.n
        if ctx.bias_dtype is not None and any(need[ctx.n :]):
            db = rows.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
            dbs = [g if req else None for g, req in zip(db.split(sizes), need[ctx.n :], strict=True)]
        return dx, None, *dws, *dbs


# The widest input whose RMSNorm folds into the grouped launch. Every program there recomputes the norm over its
# rows (16, padded) and the whole input: at SmolLM2-135M's 576 that cost about the norm's own launch (0.99-1.06x
# the two launches), at Mistral-7B's 4,096 far more (0.69-0.73x; H100, 2026-12-06, docs/benchmarks.md,
# benchmarks/gpu/grouped_neighbours.py).
FOLDED_NORM_MAX = 2048


def project(
    x: torch.Tensor, modules: tuple[nn.Module, ...], *, norm: nn.Module | None = None, glu: bool = False,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Each module applied to ``x``: one GEMM over the concatenated weights each way (outputs are views of its
    result) where :func:`_mergeable` holds, autograd is on and ``TUNING.merged_projections``; without autograd and
    with ``TUNING.grouped_projections``, the grouped launch over the separate weights (decoding; for one module too,
    in place of cuBLAS's launch, which costs more at a few rows); else one call each.

    Neighbours: ``x`` through ``norm`` (an RMSNorm module) first; ``glu``, of two modules (an MLP's gate and up)
    only silu(gate) * up; ``residual`` added to the (one) output. With ``TUNING.fused_maps`` they go inside the
    grouped launch where it runs (:func:`dispatch.grouped_takes`; the norm up to ``FOLDED_NORM_MAX`` inputs);
    otherwise each is its own call, the module's or the fused kernel's, as transformers' decoder layer makes them."""
    if norm is not None or glu or residual is not None:
        if TUNING.fused_maps and _groupable(modules):
            if norm is not None and not (plain_rms_norm(norm) and x.shape[-1] <= FOLDED_NORM_MAX):
                x, norm = norm(x), None  # its own launch; the rest still folds
            weights, biases = tuple(m.weight for m in modules), tuple(m.bias for m in modules)
            extra = [t for t in (residual, None if norm is None else norm.weight) if t is not None]
            if grouped_takes(x, weights, *extra):
                nw = None if norm is None else (norm.weight, norm.variance_epsilon)
                return grouped_linear(x, weights, biases, norm=nw, glu=glu, residual=residual)
        out = project(x if norm is None else norm(x), modules)
        if glu:
            out = (swiglu(*out),)
        return out if residual is None else (residual + out[0], *out[1:])
    if TUNING.merged_projections and len(modules) > 1 and torch.is_grad_enabled() and _mergeable(modules):
        params = [m.weight for m in modules] + [m.bias for m in modules]
        y = _MergedLinear.apply(x, len(modules), *params)
        return y.split([m.out_features for m in modules], dim=-1)
    if _groupable(modules):
        return grouped_linear(x, tuple(m.weight for m in modules), tuple(m.bias for m in modules))
    return tuple(m(x) for m in modules)


def _groupable(modules: tuple[nn.Module, ...]) -> bool:
    return TUNING.grouped_projections and not torch.is_grad_enabled() and plain_linears(modules)
