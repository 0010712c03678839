"""Several linear projections of one input as one GEMM (opt-in, ``TUNING.merged_projections``): a GSA layer's
q, k, v and slot gates, an MLP's gate and up. Under autograd this saves launches both ways (one GEMM for the
weights' gradients, one for the input's, and no sums of the input's partial gradients), which bounds a small
model's training step. The weights stay the modules' own parameters (checkpoints, optimizers and peft see no
change); they are concatenated at each call, so merging is for training, and decoding keeps the separate GEMMs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as nn_module

from t2r.kernels.tuning import TUNING


def _mergeable(modules: tuple[nn.Module, ...]) -> bool:
    """Plain nn.Linear modules (not peft's or a quantised layer) without hooks of their own or global ones (which
    a merged call would skip), on one device and dtype, with biases on all or none."""
    if getattr(nn_module, "_global_forward_hooks", None) or getattr(nn_module, "_global_forward_pre_hooks", None):
        return False
    for m in modules:
        if type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks:
            return False
    first = modules[0].weight
    same = all(m.weight.dtype == first.dtype and m.weight.device == first.device for m in modules)
    return same and len({m.bias is None for m in modules}) == 1


def project(x: torch.Tensor, modules: tuple[nn.Module, ...]) -> tuple[torch.Tensor, ...]:
    """Each module applied to ``x``: one GEMM over the concatenated weights (outputs are views of its result)
    where :func:`_mergeable` holds, autograd is on and ``TUNING.merged_projections``; else one call each."""
    if TUNING.merged_projections and torch.is_grad_enabled() and _mergeable(modules):
        weight = torch.cat([m.weight for m in modules])
        bias = None if modules[0].bias is None else torch.cat([m.bias for m in modules])
        return F.linear(x, weight, bias).split([m.out_features for m in modules], dim=-1)
    return tuple(m(x) for m in modules)
