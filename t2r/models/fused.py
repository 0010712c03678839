"""The converted model's teacher modules with fused forwards: Llama-family RMSNorms and SwiGLU MLPs keep their class
(isinstance), parameters and names, and gain a forward that calls our fused kernels (t2r.kernels.dispatch) where
they apply and the same math in PyTorch everywhere else. A module is swapped only where its forward is the Llama
module's own (by source), so a family with other math, or a forward a hub kernel replaced, is left alone."""

from __future__ import annotations

import functools
import inspect

from torch import nn
from transformers import activations
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from t2r.kernels.dispatch import rms_norm, swiglu

from .projections import project


class FusedRMSNorm:
    """Mixed in before a Llama-family RMSNorm class."""

    def forward(self, hidden_states):
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


class FusedMLP:
    """Mixed in before a Llama-family MLP class with a silu activation: gate and up as one GEMM where
    :func:`projections.project` merges them (or one grouped launch when decoding), silu(gate) * up in one launch
    where :func:`dispatch.swiglu` fuses it, down through :func:`projections.project` too (its grouped launch)."""

    def forward(self, x):
        gate, up = project(x, (self.gate_proj, self.up_proj))
        (out,) = project(swiglu(gate, up), (self.down_proj,))
        return out


def _silu(act: nn.Module | None) -> bool:
    """Whether an activation module is plain silu: torch's, or transformers' own (ACT2FN["silu"])."""
    return type(act) in (nn.SiLU, getattr(activations, "SiLUActivation", nn.SiLU))


@functools.cache
def _source(fn) -> str | None:
    try:
        return inspect.getsource(fn).strip()
    except (OSError, TypeError):  # no source to compare
        return None


@functools.cache
def _fused_class(cls: type, mixin: type, stock: type) -> type | None:
    """``cls`` with ``mixin``'s forward, or None where its forward is not ``stock``'s."""
    if issubclass(cls, mixin):
        return cls
    if _source(cls.forward) is None or _source(cls.forward) != _source(stock.forward):
        return None
    return type(f"Fused{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})


def fuse_modules(model: nn.Module) -> int:
    """Give every Llama-family RMSNorm and silu MLP in ``model`` the fused forward; returns how many."""
    count = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            fused = _fused_class(type(module), FusedRMSNorm, LlamaRMSNorm)
        elif name.endswith("MLP") and _silu(getattr(module, "act_fn", None)):
            fused = _fused_class(type(module), FusedMLP, LlamaMLP)
        else:
            continue
        if fused is not None:
            module.__class__ = fused
            count += 1
    return count
